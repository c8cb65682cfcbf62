//! LayerNorm over the last dimension, y = (x − μ)/√(σ² + ε) · w + b, with or without the affine
//! w, b. Backward (x̂ = (x − μ)·r, r = 1/√(σ² + ε), g = dy·w):
//!   dx = r · (g − mean(g) − x̂ · mean(g·x̂)),  dw = Σ_rows dy·x̂,  db = Σ_rows dy.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{as_rows, f32_data, fused, math, par_rows, rows_of, rows_per_task, Rows};

/// LayerNorm over the last dimension; fused for f32 (CPU, and CUDA with the `cuda` feature), else
/// [`layer_norm_plain`].
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if !fused(x) {
        return layer_norm_plain(x, weight, bias, eps);
    }
    let x = as_rows(x)?;
    match (weight, bias) {
        (Some(w), Some(b)) => {
            x.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormAffine { eps })
        }
        (None, None) => x.apply_op1(LayerNormPlain { eps }),
        _ => layer_norm_plain(&x, weight, bias, eps),
    }
}

/// The plain composition of candle ops (the reference for the tests).
pub fn layer_norm_plain(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// (μ, r) of one row.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = math::sum(x) / n;
    let var = math::sum_sq_dev(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_rows(
    x: &[f32],
    xr: Rows,
    wb: Option<(&[f32], &[f32])>,
    eps: f32,
    first: usize,
    out: &mut [f32],
) {
    for (i, o) in out.chunks_exact_mut(xr.cols).enumerate() {
        let row = xr.row(x, first + i);
        let (mean, r) = moments(row, eps);
        match wb {
            Some((w, b)) => {
                for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (v - mean) * r * w + b;
                }
            }
            None => {
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - mean) * r;
                }
            }
        }
    }
}

/// dx for a block of rows, and (when `w` is given) this block's partial Σ dy·x̂ and Σ dy.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_rows(
    x: &[f32],
    xr: Rows,
    dy: &[f32],
    dyr: Rows,
    w: Option<&[f32]>,
    eps: f32,
    first: usize,
    dx: &mut [f32],
    dwb: Option<(&mut [f32], &mut [f32])>,
) {
    let c = xr.cols;
    let mut g = vec![0f32; c];
    let mut xhat = vec![0f32; c];
    let (mut dw, mut db) = match dwb {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    for (i, dxr) in dx.chunks_exact_mut(c).enumerate() {
        let row = xr.row(x, first + i);
        let dyrow = dyr.row(dy, first + i);
        let (mean, r) = moments(row, eps);
        for (xh, &v) in xhat.iter_mut().zip(row) {
            *xh = (v - mean) * r;
        }
        match w {
            Some(w) => {
                // zipped slices, not indices: indexing w, of a length the compiler could not tie
                // to the row's, kept this loop scalar with a bounds check per value
                for ((g, &d), &w) in g.iter_mut().zip(dyrow).zip(w) {
                    *g = d * w;
                }
            }
            None => g.copy_from_slice(dyrow),
        }
        let mg = math::sum(&g) / c as f32;
        let mgx = math::dot(&g, &xhat) / c as f32;
        for ((dx, &g), &xh) in dxr.iter_mut().zip(&g).zip(&xhat) {
            *dx = r * (g - mg - xh * mgx);
        }
        if let (Some(dw), Some(db)) = (dw.as_deref_mut(), db.as_deref_mut()) {
            for (((dw, db), &d), &xh) in dw.iter_mut().zip(db.iter_mut()).zip(dyrow).zip(&xhat) {
                *dw += d * xh;
                *db += d;
            }
        }
    }
}

fn forward(
    x: &CpuStorage,
    xl: &Layout,
    wb: Option<(&[f32], &[f32])>,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let xs = f32_data(x, "layer_norm")?;
    let xr = rows_of(xl, "layer_norm")?;
    let out = par_rows(xr.rows, xr.cols, |first, block| {
        forward_rows(xs, xr, wb, eps as f32, first, block)
    });
    Ok((CpuStorage::F32(out), xl.shape().clone()))
}

/// dx, and with the affine the column sums (Σ dy·x̂, Σ dy).
type LayerNormGrads = (Vec<f32>, Option<(Vec<f32>, Vec<f32>)>);

/// (dx, Σ dy·x̂, Σ dy) on the CPU; the sums only when `w` is given.
fn backward(
    xv: &[f32],
    xr: Rows,
    w: Option<&[f32]>,
    dyv: &[f32],
    dyr: Rows,
    eps: f64,
) -> LayerNormGrads {
    let c = xr.cols;
    let per = rows_per_task(c);
    if c == 0 {
        return (Vec::new(), w.map(|_| (Vec::new(), Vec::new())));
    }
    let n = xr.rows * c;
    // room for dw and db after dx, where the affine backward op returns them
    let mut dx = Vec::with_capacity(n + if w.is_some() { 2 * c } else { 0 });
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx.spare_capacity_mut()[..n]
        .par_chunks_mut(per * c)
        .enumerate()
        .map(|(i, block)| {
            let block = super::zeroed(block);
            let mut dw = vec![0f32; if w.is_some() { c } else { 0 }];
            let mut db = vec![0f32; dw.len()];
            let dwb = w.map(|_| (&mut dw[..], &mut db[..]));
            backward_rows(xv, xr, dyv, dyr, w, eps as f32, i * per, block, dwb);
            (dw, db)
        })
        .collect();
    // SAFETY: the blocks above covered all n values, each zeroed before it was written
    unsafe { dx.set_len(n) };
    let sums = w.map(|_| {
        let mut dw = vec![0f32; c];
        let mut db = vec![0f32; c];
        for (pw, pb) in &partials {
            for j in 0..c {
                dw[j] += pw[j];
                db[j] += pb[j];
            }
        }
        (dw, db)
    });
    (dx, sums)
}

struct LayerNormPlain {
    eps: f64,
}

impl CustomOp1 for LayerNormPlain {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(x, xl, None, self.eps)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_forward(x, xl, None, self.eps)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = LayerNormBackward { eps: self.eps };
        Ok(Some(as_rows(x)?.apply_op2_no_bwd(&as_rows(dy)?, &op)?))
    }
}

struct LayerNormAffine {
    eps: f64,
}

impl CustomOp3 for LayerNormAffine {
    fn name(&self) -> &'static str {
        "fused-layer-norm-affine"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = *xl.dims().last().unwrap_or(&0);
        let w = f32_data(w, "layer_norm weight")?;
        let b = f32_data(b, "layer_norm bias")?;
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!("layer_norm: weight and bias need {c} values")
        }
        let w = &w[wl.start_offset()..wl.start_offset() + c];
        let b = &b[bl.start_offset()..bl.start_offset() + c];
        forward(x, xl, Some((w, b)), self.eps)
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
        cuda_forward(x, xl, Some((w, wl, b, bl)), self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = LayerNormBackward { eps: self.eps };
        // [dx; dw; db], flat
        let out = as_rows(x)?.apply_op3_no_bwd(&w.contiguous()?, &as_rows(dy)?, &op)?;
        let (n, c) = (x.elem_count(), w.elem_count());
        let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = out.narrow(0, n, c)?.reshape(w.shape())?;
        let db = out.narrow(0, n + c, c)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward pass of the layer norm, without the affine (a [`CustomOp2`] of x and dy, giving
/// dx) and with it (a [`CustomOp3`] of x, w and dy, giving dx, Σ dy·x̂ and Σ dy one after the
/// other in one flat tensor).
struct LayerNormBackward {
    eps: f64,
}

impl CustomOp2 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        let (xv, xr) = (f32_data(x, name)?, rows_of(xl, name)?);
        let (dyv, dyr) = (f32_data(dy, name)?, rows_of(dyl, name)?);
        let (dx, _) = backward(xv, xr, None, dyv, dyr, self.eps);
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = x.device();
        let (xv, xr) = cuda::rows_view(x, xl, CustomOp2::name(self))?;
        let (dyv, dyr) = cuda::rows_view(dy, dyl, CustomOp2::name(self))?;
        if (xr.rows, xr.cols) != (dyr.rows, dyr.cols) {
            candle_core::bail!("{}: x and dy of different shapes", CustomOp2::name(self))
        }
        let n = xr.rows * xr.cols;
        if n == 0 {
            return Ok((
                cuda::wrap(dev.alloc_zeros::<f32>(0)?, dev),
                xl.shape().clone(),
            ));
        }
        let dx = cuda::alloc(dev, n)?;
        let kernel = cuda::Kernel::load(dev, "fused_layer_norm_bwd")?;
        let mut b = kernel.builder();
        let eps = self.eps as f32;
        b.arg(&xr.rows)
            .arg(&xr.cols)
            .arg(&xv)
            .arg(&xr.stride)
            .arg(&dyv)
            .arg(&dyr.stride);
        b.arg(&eps).arg(&dx);
        cuda::launch(b, cuda::row_cfg(xr.rows, xr.cols))?;
        Ok((cuda::wrap(dx, dev), xl.shape().clone()))
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-affine-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp3::name(self);
        let (xv, xr) = (f32_data(x, name)?, rows_of(xl, name)?);
        let (dyv, dyr) = (f32_data(dy, name)?, rows_of(dyl, name)?);
        let c = xr.cols;
        if wl.shape().elem_count() != c {
            candle_core::bail!("{name}: the weight needs {c} values")
        }
        let w = &f32_data(w, name)?[wl.start_offset()..wl.start_offset() + c];
        let (mut out, sums) = backward(xv, xr, Some(w), dyv, dyr, self.eps);
        let Some((dw, db)) = sums else {
            candle_core::bail!("{name}: affine sums missing")
        };
        out.extend_from_slice(&dw);
        out.extend_from_slice(&db);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    /// dx in a warp or a block per row (`fused_layer_norm_affine_bwd`, which also keeps each
    /// row's (μ, r)); the column sums Σ dy·x̂ and Σ dy in two more kernels without atomics (the
    /// same sums on every run): `fused_layer_norm_dwdb_partial` over chunks of rows, then
    /// `col_sum_finalize`.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let name = CustomOp3::name(self);
        let dev = x.device();
        let (xv, xr) = cuda::rows_view(x, xl, name)?;
        let (dyv, dyr) = cuda::rows_view(dy, dyl, name)?;
        let (rows, c) = (xr.rows, xr.cols);
        if (rows, c) != (dyr.rows, dyr.cols) {
            candle_core::bail!("{name}: x and dy of different shapes")
        }
        if wl.shape().elem_count() != c {
            candle_core::bail!("{name}: the weight needs {c} values")
        }
        let wv = w.as_cuda_slice::<f32>()?.slice(wl.start_offset()..);
        let n = rows * c;
        let shape = Shape::from(n + 2 * c);
        if n == 0 {
            return Ok((cuda::wrap(dev.alloc_zeros::<f32>(n + 2 * c)?, dev), shape));
        }
        let eps = self.eps as f32;
        // [dx; dw; db]
        let mut out = cuda::alloc(dev, n + 2 * c)?;
        // (μ, r) per row
        let stats = cuda::alloc(dev, 2 * rows)?;
        let kernel = cuda::Kernel::load(dev, "fused_layer_norm_affine_bwd")?;
        let mut b = kernel.builder();
        b.arg(&rows)
            .arg(&c)
            .arg(&xv)
            .arg(&xr.stride)
            .arg(&wv)
            .arg(&dyv)
            .arg(&dyr.stride);
        b.arg(&eps).arg(&out).arg(&stats);
        cuda::launch(b, cuda::row_cfg(rows, c))?;

        let (per, chunks) = cuda::col_sum_chunks(rows);
        let partial = cuda::alloc(dev, chunks * 2 * c)?;
        let kernel = cuda::Kernel::load(dev, "fused_layer_norm_dwdb_partial")?;
        let mut b = kernel.builder();
        b.arg(&rows)
            .arg(&c)
            .arg(&xv)
            .arg(&xr.stride)
            .arg(&dyv)
            .arg(&dyr.stride);
        b.arg(&stats).arg(&per).arg(&partial);
        cuda::launch(b, cuda::col_sum_cfg(c, chunks))?;
        cuda::col_sum_finalize(dev, &partial, chunks, 2 * c, &mut out.slice_mut(n..))?;
        Ok((cuda::wrap(out, dev), shape))
    }
}

/// The layer norm forward on CUDA, with the affine (w, b) or without.
#[cfg(feature = "cuda")]
fn cuda_forward(
    x: &candle_core::CudaStorage,
    xl: &Layout,
    wb: Option<(
        &candle_core::CudaStorage,
        &Layout,
        &candle_core::CudaStorage,
        &Layout,
    )>,
    eps: f64,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use super::cuda;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    let dev = x.device();
    let (xv, xr) = cuda::rows_view(x, xl, "layer_norm")?;
    let c = xr.cols;
    let n = xr.rows * c;
    let wb = match wb {
        Some((w, wl, b, bl)) => {
            if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
                candle_core::bail!("layer_norm: weight and bias need {c} values")
            }
            let w = w.as_cuda_slice::<f32>()?.slice(wl.start_offset()..);
            let b = b.as_cuda_slice::<f32>()?.slice(bl.start_offset()..);
            Some((w, b))
        }
        None => None,
    };
    if n == 0 {
        return Ok((
            cuda::wrap(dev.alloc_zeros::<f32>(0)?, dev),
            xl.shape().clone(),
        ));
    }
    let y = cuda::alloc(dev, n)?;
    let eps = eps as f32;
    let name = if wb.is_some() {
        "fused_layer_norm_affine_fwd"
    } else {
        "fused_layer_norm_fwd"
    };
    let kernel = cuda::Kernel::load(dev, name)?;
    let mut b = kernel.builder();
    b.arg(&xr.rows).arg(&c).arg(&xv).arg(&xr.stride);
    if let Some((wv, bv)) = &wb {
        b.arg(wv).arg(bv);
    }
    b.arg(&eps).arg(&y);
    cuda::launch(b, cuda::row_cfg(xr.rows, c))?;
    Ok((cuda::wrap(y, dev), xl.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition_with_and_without_affine() -> Result<()> {
        let x = (randn(&[3, 7, 40], 1)? * 3.0)?.affine(1.0, 0.5)?;
        let w = randn(&[40], 2)?;
        let b = randn(&[40], 3)?;
        let seed = randn(&[3, 7, 40], 4)?;
        for affine in [true, false] {
            let inputs: Vec<Tensor> = if affine {
                vec![x.clone(), w.clone(), b.clone()]
            } else {
                vec![x.clone()]
            };
            let run = |fused: bool| {
                grads(
                    &inputs,
                    |t| {
                        let (w, b) = if affine {
                            (Some(&t[1]), Some(&t[2]))
                        } else {
                            (None, None)
                        };
                        if fused {
                            layer_norm(&t[0], w, b, 1e-6)
                        } else {
                            layer_norm_plain(&t[0], w, b, 1e-6)
                        }
                    },
                    &seed,
                )
            };
            let (yf, gf) = run(true)?;
            let (yp, gp) = run(false)?;
            assert!(max_diff(&yf, &yp)? < 2e-5, "forward, affine={affine}");
            for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
                let d = max_diff(a, b)?;
                assert!(d < 2e-4, "gradient of input {i}, affine={affine}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn column_slices_are_read_in_place() -> Result<()> {
        // one chunk of a wider tensor, as an adaLN projection's chunks are
        let wide = randn(&[5, 24], 7)?;
        let x = wide.narrow(1, 8, 8)?;
        let y = layer_norm(&x, None, None, 1e-6)?;
        let r = layer_norm_plain(&x.contiguous()?, None, None, 1e-6)?;
        assert!(max_diff(&y, &r)? < 1e-5);
        Ok(())
    }
}
