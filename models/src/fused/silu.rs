//! SiLU, y = x·σ(x), dy/dx = σ(x)·(1 + x·(1 − σ(x))) (the Diffusion Loss MLP's activation).
use candle_core::{Result, Tensor};
use multiversion::multiversion;

use super::{fused, math, Elementwise, Unary};

/// SiLU; fused for f32 (CPU, and CUDA with the `cuda` feature), else [`silu_plain`].
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        Unary::<Silu>::apply(x)
    } else {
        silu_plain(x)
    }
}

/// candle's own SiLU, whose backward is a composition of candle ops.
pub fn silu_plain(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + math::exp(-x))
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * sigmoid(x);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        let s = sigmoid(x);
        *dx = dy * s * (1.0 + x * (1.0 - s));
    }
}

struct Silu;

impl Elementwise for Silu {
    const NAME: &'static str = "fused-silu";
    const CUDA_FWD: &'static str = "fused_silu_fwd";
    const CUDA_BWD: &'static str = "fused_silu_bwd";
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
        let x = (randn(&[5, 41], 3)? * 4.0)?;
        let seed = randn(&[5, 41], 4)?;
        let (yf, gf) = grads(std::slice::from_ref(&x), |t| silu(&t[0]), &seed)?;
        let (yp, gp) = grads(&[x], |t| silu_plain(&t[0]), &seed)?;
        assert!(max_diff(&yf, &yp)? < 2e-6);
        assert!(max_diff(&gf[0], &gp[0])? < 2e-5);
        Ok(())
    }
}
