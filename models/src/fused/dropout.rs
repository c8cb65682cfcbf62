//! Dropout (Srivastava et al. 2014) with its mask drawn from a 64-bit key: value i is kept when the
//! 24-bit uniform of SplitMix64(key + (i+1)·γ) is at least p, and kept values are scaled by
//! 1/(1−p). The mask is a function of (key, i) alone, so it is the same on every device, costs
//! no host work, needs no storage for the backward pass, and the backward pass is the same op on
//! dy with the same key: dx = dy · mask/(1−p).
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{f32_data, fused, noise};

/// `x` with a fraction `p` of its values zeroed (chosen by `key`) and the rest scaled by 1/(1−p);
/// `x` itself when p is 0. Fused for f32 (CPU, and CUDA with the `cuda` feature), else
/// [`dropout_plain`].
pub fn dropout(x: &Tensor, p: f32, key: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p.is_nan() || p >= 1.0 {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}")
    }
    if !fused(x) {
        return dropout_plain(x, p, key);
    }
    x.contiguous()?.apply_op1(Dropout { p, key })
}

/// The same mask as a tensor of 0/1 and a product (the test's reference).
pub fn dropout_plain(x: &Tensor, p: f32, key: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n)
        .map(|i| if kept(key, i as u64, p) { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    (x * mask)? * (1.0 / (1.0 - p as f64))
}

/// The 24-bit threshold below which a value is dropped.
pub(super) fn threshold(p: f32) -> u32 {
    (p as f64 * (1u32 << 24) as f64).round() as u32
}

#[inline(always)]
fn kept(key: u64, i: u64, p: f32) -> bool {
    noise::uniform24(key, i) >= threshold(p)
}

/// out[k] = x[k]·scale where value first + k is kept, else 0. Compiled for AVX-512 too, whose
/// 64-bit multiplies let the mask's hash run 8 values at a time (scalar, it was 4% of a CPU
/// training step).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub(super) fn apply_mask(
    key: u64,
    threshold: u32,
    scale: f32,
    first: u64,
    x: &[f32],
    out: &mut [f32],
) {
    let mut uniform = noise::Uniform24::from(key, first);
    for (o, &x) in out.iter_mut().zip(x) {
        let kept = uniform.next_value() >= threshold;
        *o = if kept { x * scale } else { 0.0 };
    }
}

#[derive(Debug, Clone, Copy)]
struct Dropout {
    p: f32,
    key: u64,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, self.name())?;
        let n = l.shape().elem_count();
        let x = &x[l.start_offset()..l.start_offset() + n];
        let (t, scale) = (threshold(self.p), 1.0 / (1.0 - self.p));
        const CHUNK: usize = 1 << 14;
        let out = super::par_fill(n, CHUNK, |first, o| {
            apply_mask(
                self.key,
                t,
                scale,
                first as u64,
                &x[first..first + o.len()],
                o,
            )
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let scale = 1.0 / (1.0 - self.p);
        let out = super::cuda::dropout(self.key, threshold(self.p), scale, n, (s, l))?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition_and_drops_about_p() -> Result<()> {
        let x = randn(&[64, 129], 1)?;
        let seed = randn(&[64, 129], 2)?;
        let (yf, gf) = grads(std::slice::from_ref(&x), |t| dropout(&t[0], 0.1, 5), &seed)?;
        let (yp, gp) = grads(
            std::slice::from_ref(&x),
            |t| dropout_plain(&t[0], 0.1, 5),
            &seed,
        )?;
        assert!(max_diff(&yf, &yp)? < 1e-6);
        assert!(max_diff(&gf[0], &gp[0])? < 1e-6);
        let zeros = yf.eq(0.0)?.to_dtype(candle_core::DType::F32)?.mean_all()?;
        let share = zeros.to_scalar::<f32>()?;
        assert!((share - 0.1).abs() < 0.01, "dropped share {share}");
        // another key, another mask; p = 0 is the identity
        assert!(max_diff(&yf, &dropout(&x, 0.1, 6)?)? > 0.0);
        assert_eq!(max_diff(&dropout(&x, 0.0, 5)?, &x)?, 0.0);
        assert!(dropout(&x, 1.0, 5).is_err());
        Ok(())
    }
}
