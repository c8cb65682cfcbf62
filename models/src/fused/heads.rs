//! Attention's heads: the (B, L, H·hd) output of a projection as (B, H, L, hd) for the per-head
//! products, and back. As candle ops each way is a transpose copy and, with bf16 products, a
//! cast: two passes (session 6's H200 profile had the transposes at 15.6 ms a step and the
//! casts beside them). On CUDA each is one kernel that moves and casts at once; on the CPU, where
//! they are cheap beside the products, they are the composition, [`split_heads_plain`] and
//! [`merge_heads_plain`].
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// x (B, L, H·hd) f32 → (B, H, L, hd) in `dtype` (F32, or BF16 for bf16 products).
pub fn split_heads(x: &Tensor, heads: usize, dtype: DType) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("split_heads: {c} features do not split into {heads} heads")
    }
    if !super::on_cuda(x) || !matches!(dtype, DType::F32 | DType::BF16) {
        return split_heads_plain(x, heads, dtype);
    }
    let op = SplitHeads {
        dims: (b, l, heads, c / heads),
        out: dtype,
    };
    super::as_rows(x)?.apply_op1(op)
}

/// The composition: reshape, transpose, a contiguous copy, the cast.
pub fn split_heads_plain(x: &Tensor, heads: usize, dtype: DType) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    x.reshape((b, l, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .to_dtype(dtype)
}

/// y (B, H, L, hd) in any float dtype → (B, L, H·hd) f32.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, h, l, hd) = y.dims4()?;
    if !(super::on_cuda(y) && matches!(y.dtype(), DType::F32 | DType::BF16)) {
        return merge_heads_plain(y);
    }
    y.contiguous()?.apply_op1(MergeHeads {
        dims: (b, l, h, hd),
    })
}

/// The composition: transpose, reshape (a copy), the cast to f32.
pub fn merge_heads_plain(y: &Tensor) -> Result<Tensor> {
    let (b, h, l, hd) = y.dims4()?;
    y.transpose(1, 2)?
        .reshape((b, l, h * hd))?
        .to_dtype(DType::F32)
}

/// (B, L, H·hd) f32 rows → (B, H, L, hd) in `out`; `dims` = (B, L, H, hd).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct SplitHeads {
    dims: (usize, usize, usize, usize),
    out: DType,
}

/// (B, H, L, hd) contiguous, F32 or BF16 → (B, L, H·hd) f32; `dims` = (B, L, H, hd).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct MergeHeads {
    dims: (usize, usize, usize, usize),
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "fused-split-heads"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(super::cuda_only(self.name()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, l, h, hd) = self.dims;
        let out = super::cuda::split_heads((x, xl), self.dims, self.out)?;
        Ok((out, Shape::from((b, h, l, hd))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = MergeHeads { dims: self.dims };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "fused-merge-heads"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(super::cuda_only(self.name()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, l, h, hd) = self.dims;
        let out = super::cuda::merge_heads((y, yl), self.dims)?;
        Ok((out, Shape::from((b, l, h * hd))))
    }

    fn bwd(&self, y: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let op = SplitHeads {
            dims: self.dims,
            out: y.dtype(),
        };
        Ok(Some(super::as_rows(dout)?.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::randn;
    use super::*;

    #[test]
    fn split_then_merge_is_the_identity_and_split_is_per_head() -> Result<()> {
        let x = randn(&[2, 5, 12], 1)?;
        let s = split_heads(&x, 3, DType::F32)?;
        assert_eq!(s.dims(), &[2, 3, 5, 4]);
        // head 1 of position 2 of image 1: features 4..8
        assert_eq!(
            s.get(1)?.get(1)?.get(2)?.to_vec1::<f32>()?,
            x.get(1)?.get(2)?.narrow(0, 4, 4)?.to_vec1::<f32>()?
        );
        let back = merge_heads(&s)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(split_heads(&x, 3, DType::BF16)?.dtype(), DType::BF16);
        assert!(
            split_heads(&x, 5, DType::F32).is_err(),
            "12 features in 5 heads"
        );
        Ok(())
    }
}
