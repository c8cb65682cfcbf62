//! The bf16 linear layer with f32 master weights, y = bf16(x)·bf16(W)ᵀ + b: the product in bf16
//! with f32 accumulation and an f32 result (as PyTorch's autocast does for `F.linear`), the bias
//! added in f32.
//!
//! As candle ops it is five ops forward (two casts, the product, a cast back, the bias) and about
//! eight backward, each a kernel launch, an allocation and a pass over memory on a GPU. Fused on
//! CUDA: one op forward (casts, one cuBLAS GemmEx with bf16 inputs and f32 output, bias) and two
//! backward (dx = dy·W, and [dW; db] = [dyᵀ·x; Σ_rows dy], both products bf16 with f32 results,
//! from one bf16 copy of dy), two so that dx's buffer is freed when the pass no longer needs it
//! while dW lives on to the optimizer. The products' f32 results are not rounded to bf16 as the composition's are. On the
//! CPU (where training runs in f32) and without the `cuda` feature it is the composition,
//! [`linear_bf16_plain`].
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
use super::out_shape;

/// y = x·Wᵀ (+ b) with the product in bf16 and f32 in and out: `x` (…, in), `w` (out, in), `b` (out).
pub fn linear_bf16(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let fused = super::on_cuda(x)
        && [Some(x), Some(w), b]
            .iter()
            .flatten()
            .all(|t| t.dtype() == DType::F32);
    if !fused {
        return linear_bf16_plain(x, w, b);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBf16),
        None => x.apply_op2(&w, LinearBf16),
    }
}

/// The composition (the test's reference, and the CPU's path): casts, a bf16 product, a cast
/// back, the bias in f32.
pub fn linear_bf16_plain(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x
        .to_dtype(DType::BF16)?
        .broadcast_matmul(&w.to_dtype(DType::BF16)?.t()?)?
        .to_dtype(DType::F32)?;
    match b {
        Some(b) => super::bias_add(&y, b),
        None => Ok(y),
    }
}

/// (rows of x, in, out) of x (…, in) and w (out, in), checked.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn dims(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    let (out, k) = wl.shape().dims2()?;
    let Some(&xk) = xl.dims().last() else {
        candle_core::bail!("linear_bf16: x is a scalar")
    };
    if xk != k {
        candle_core::bail!("linear_bf16: x has {xk} features, the weight {k}")
    }
    Ok((xl.shape().elem_count() / k.max(1), k, out))
}

struct LinearBf16;

/// The forward pass of both arities (with and without a bias).
#[cfg(feature = "cuda")]
fn forward_cuda(
    x: (&candle_core::CudaStorage, &Layout),
    w: (&candle_core::CudaStorage, &Layout),
    b: Option<(&candle_core::CudaStorage, &Layout)>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    let (n, k, out) = dims(x.1, w.1)?;
    if let Some((_, bl)) = b {
        if bl.shape().elem_count() != out {
            candle_core::bail!("fused-linear-bf16: the bias needs {out} values")
        }
    }
    let y = super::cuda::linear_bf16(x, w, b, (n, k, out))?;
    Ok((y, out_shape(x.1, out)))
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "fused-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(super::cuda_only(CustomOp2::name(self)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward_cuda((x, xl), (w, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, dy, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearBf16 {
    fn name(&self) -> &'static str {
        "fused-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(super::cuda_only(CustomOp3::name(self)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward_cuda((x, xl), (w, wl), Some((b, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(x, w, dy, true)?;
        Ok((
            Some(dx),
            Some(dw),
            db.map(|d| d.reshape(b.shape())).transpose()?,
        ))
    }
}

/// (dx, dW, db when `bias`): dx by [`GradInput`], [dW; db] by [`GradWeight`] in one buffer,
/// both products from one bf16 copy of dy.
fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    let dyb = dy.to_dtype(DType::BF16)?;
    let dx = dyb.apply_op2_no_bwd(w, &GradInput)?.reshape(x.shape())?;
    let g = dy.apply_op3_no_bwd(x, &dyb, &GradWeight { bias })?;
    let (dw, db) = super::weight_and_bias_grads(&g, w.dims2()?, bias)?;
    Ok((dx, dw, db))
}

/// dx = dyb·bf16(W), f32, of x's shape (flattened to (rows, in)), from dyb = bf16(dy).
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "fused-linear-bf16-grad-input"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(super::cuda_only(self.name()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dyb: &candle_core::CudaStorage,
        dyl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, k) = wl.shape().dims2()?;
        let n = dyl.shape().elem_count() / out.max(1);
        let dx = super::cuda::linear_bf16_grad_input((dyb, dyl), (w, wl), (n, k, out))?;
        Ok((dx, Shape::from((n, k))))
    }
}

/// [dW; db] = [dybᵀ·bf16(x); Σ_rows dy] as one vector of out·in (+ out) f32 values, from dy,
/// x and dyb = bf16(dy).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GradWeight {
    bias: bool,
}

impl CustomOp3 for GradWeight {
    fn name(&self) -> &'static str {
        "fused-linear-bf16-grad-weight"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(super::cuda_only(self.name()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dyb: &candle_core::CudaStorage,
        dybl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let k = *xl.dims().last().unwrap_or(&0);
        let n = xl.shape().elem_count() / k.max(1);
        let out = dyl.shape().elem_count() / n.max(1);
        let g = super::cuda::linear_bf16_grad_weight(
            (dy, dyl),
            (x, xl),
            (dyb, dybl),
            (n, k, out),
            self.bias,
        )?;
        Ok((g, Shape::from(out * k + if self.bias { out } else { 0 })))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::randn;
    use super::*;

    #[test]
    fn on_the_cpu_it_is_the_composition() -> Result<()> {
        let (x, w, b) = (randn(&[2, 5, 8], 1)?, randn(&[3, 8], 2)?, randn(&[3], 3)?);
        let y = linear_bf16(&x, &w, Some(&b))?;
        assert_eq!(y.dims(), &[2, 5, 3]);
        let p = linear_bf16_plain(&x, &w, Some(&b))?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            p.flatten_all()?.to_vec1::<f32>()?
        );
        // and close to the f32 product
        let f = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let err = super::super::test_util::max_diff(&y, &f)?;
        assert!(err < 0.1, "bf16 error {err}");
        Ok(())
    }
}
