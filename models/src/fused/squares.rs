//! The sum of squares of many tensors, Σ_t Σ x², for gradient clipping's global norm.
//!
//! As candle ops it is three ops per tensor (square, sum, cast to f64) and a stack: for a few
//! hundred gradients on a GPU, over a thousand launches and allocations, where the reference
//! makes one multi-tensor pass (session 6 measured 15 ms for clipping on the H200 against the
//! reference's 3.9). Fused on CUDA: one kernel over pieces of at most [`PIECE`] values of all the
//! tensors at once, an f64 partial sum per piece added on the host in order, so every run gives
//! the same norm. On the CPU it is the composition, [`sum_of_squares_plain`]: its f32 sums are
//! what trained results so far were clipped with, and clipping is a small part of a CPU step.
use candle_core::{DType, Result, Tensor};

/// Values per piece of the CUDA kernel (one block each).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const PIECE: usize = 1 << 16;

/// Σ over `tensors` of Σ x², in f64; 0 for none.
pub fn sum_of_squares(tensors: &[Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(first) = tensors.first() {
        if let candle_core::Device::Cuda(dev) = first.device() {
            let same =
                |t: &Tensor| t.dtype() == DType::F32 && t.device().same_device(first.device());
            if tensors.iter().all(same) {
                return cuda_sum_of_squares(dev, tensors);
            }
        }
    }
    sum_of_squares_plain(tensors)
}

/// The composition: each tensor's Σ x² in its own dtype, then their sum in f64.
pub fn sum_of_squares_plain(tensors: &[Tensor]) -> Result<f64> {
    let squares = tensors
        .iter()
        .map(|t| t.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<Result<Vec<_>>>()?;
    match squares.is_empty() {
        true => Ok(0.0),
        false => Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>(),
    }
}

/// Pieces of at most [`PIECE`] values covering `lens` values of each tensor in turn, as
/// (tensor, offset, length).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn pieces(lens: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (t, &n) in lens.iter().enumerate() {
        for offset in (0..n).step_by(PIECE) {
            out.push((t, offset, PIECE.min(n - offset)));
        }
    }
    out
}

#[cfg(feature = "cuda")]
fn cuda_sum_of_squares(dev: &candle_core::CudaDevice, tensors: &[Tensor]) -> Result<f64> {
    use candle_core::Storage;
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cuda(s) = &**storage else {
            candle_core::bail!("sum_of_squares: a tensor left the GPU")
        };
        views.push((s, layout.start_offset(), layout.shape().elem_count()));
    }
    super::cuda::sum_of_squares(dev, &views)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::randn;
    use super::*;

    #[test]
    fn pieces_cover_every_value_once_in_order() {
        let p = pieces(&[3, 0, 2 * PIECE + 1, PIECE]);
        assert_eq!(
            p,
            vec![
                (0, 0, 3),
                (2, 0, PIECE),
                (2, PIECE, PIECE),
                (2, 2 * PIECE, 1),
                (3, 0, PIECE)
            ]
        );
    }

    #[test]
    fn sums_the_squares_of_every_tensor() -> Result<()> {
        let ts = [randn(&[30, 7], 1)?, randn(&[5], 2)?];
        let want: f64 = ts
            .iter()
            .flat_map(|t| t.flatten_all().and_then(|f| f.to_vec1::<f32>()).unwrap())
            .map(|v| (v as f64) * (v as f64))
            .sum();
        let got = sum_of_squares(&ts)?;
        assert!((got - want).abs() < 1e-4 * want, "{got} against {want}");
        assert_eq!(sum_of_squares(&[])?, 0.0);
        Ok(())
    }
}
