//! GELU with the exact (erf) form, as timm's `Mlp` uses (`nn.GELU()`):
//!   y = x·Φ(x) = ½x(1 + erf(x/√2)),  dy/dx = Φ(x) + x·φ(x),  φ(x) = e^(−x²/2)/√(2π).
use candle_core::{Result, Tensor};
use multiversion::multiversion;

use super::{fused, math, Elementwise, Unary};

/// GELU (erf form); fused for f32 (CPU, and CUDA with the `cuda` feature), else [`gelu_erf_plain`].
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        Unary::<Gelu>::apply(x)
    } else {
        gelu_erf_plain(x)
    }
}

/// candle's own GELU (erf), whose backward is a composition of candle ops.
pub fn gelu_erf_plain(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + math::erf(x * FRAC_1_SQRT_2));
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        let cdf = 0.5 * (1.0 + math::erf(x * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * math::exp(-0.5 * x * x);
        *dx = dy * (cdf + x * pdf);
    }
}

struct Gelu;

impl Elementwise for Gelu {
    const NAME: &'static str = "fused-gelu-erf";
    const CUDA_FWD: &'static str = "fused_gelu_fwd";
    const CUDA_BWD: &'static str = "fused_gelu_bwd";
    fn forward(x: &[f32], y: &mut [f32]) {
        forward(x, y)
    }
    fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        backward(x, dy, dx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition() -> Result<()> {
        let x = (randn(&[6, 33], 1)? * 3.0)?;
        let seed = randn(&[6, 33], 2)?;
        let (yf, gf) = grads(std::slice::from_ref(&x), |t| gelu_erf(&t[0]), &seed)?;
        let (yp, gp) = grads(&[x], |t| gelu_erf_plain(&t[0]), &seed)?;
        assert!(max_diff(&yf, &yp)? < 2e-6);
        assert!(max_diff(&gf[0], &gp[0])? < 2e-5);
        Ok(())
    }
}
