//! One AdamW update of a parameter (Loshchilov & Hutter 2019, Algorithm 2) in one pass:
//!   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ·(1 − lr·λ) − lr · (m/c₁) / (√(v/c₂) + ε)
//! where g is the gradient times the clipping factor (`grad_scale`, 1 without clipping), so that
//! clipping needs no pass of its own over the gradients.
//! with the bias corrections c₁ = 1 − β₁ᵗ, c₂ = 1 − β₂ᵗ. The plain composition is ten candle ops
//! per parameter, each a kernel and an allocation; on a GPU, launching those for a few hundred
//! parameters took longer than the arithmetic. The moments of a parameter are kept stacked,
//! `[m; v]`, so that the op has three inputs (θ, moments, g) and one output `[θ'; m'; v']`.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;

use super::{f32_data, fused};

/// The constants of one update, in f32 as the composition's affine ops use them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    /// 1/c₁ and 1/c₂, the inverse bias corrections
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    pub lr: f32,
    /// θ's factor before the step: 1 − lr·λ with weight decay λ, else 1
    pub decay: f32,
    /// the gradient's factor: clipping's max_norm / norm, else 1
    pub grad_scale: f32,
}

impl AdamWStep {
    /// Update `t` (1-based) at learning rate `lr`; `weight_decay` 0 for parameters without decay.
    pub fn new(beta1: f64, beta2: f64, eps: f64, lr: f64, weight_decay: f64, t: usize) -> Self {
        let t = t as i32;
        AdamWStep {
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            inv_bc1: (1.0 / (1.0 - beta1.powi(t))) as f32,
            inv_bc2: (1.0 / (1.0 - beta2.powi(t))) as f32,
            eps: eps as f32,
            lr: lr as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            grad_scale: 1.0,
        }
    }

    /// The same update of the gradient times `scale` (gradient clipping).
    pub fn with_grad_scale(self, scale: f64) -> Self {
        AdamWStep {
            grad_scale: scale as f32,
            ..self
        }
    }
}

/// (θ', [m'; v']) after one update of θ with gradient `g`; `moments` is `[m; v]`, shape (2, …θ).
/// Fused for f32 (CPU, and CUDA with the `cuda` feature), else [`adamw_plain`].
pub fn adamw(
    theta: &Tensor,
    moments: &Tensor,
    g: &Tensor,
    step: &AdamWStep,
) -> Result<(Tensor, Tensor)> {
    if !(fused(theta) && fused(moments) && fused(g)) {
        return adamw_plain(theta, moments, g, step);
    }
    let out = theta.contiguous()?.apply_op3_no_bwd(
        &moments.contiguous()?,
        &g.contiguous()?,
        &AdamW(*step),
    )?;
    Ok((out.get(0)?, out.narrow(0, 1, 2)?))
}

/// The update as candle ops, in the order the fused kernels compute it.
pub fn adamw_plain(
    theta: &Tensor,
    moments: &Tensor,
    g: &Tensor,
    s: &AdamWStep,
) -> Result<(Tensor, Tensor)> {
    let f = |x: f32| x as f64;
    let g = &(g * f(s.grad_scale))?;
    let m = ((moments.get(0)? * f(s.beta1))? + (g * f(1.0 - s.beta1))?)?;
    let v = ((moments.get(1)? * f(s.beta2))? + (g.sqr()? * f(1.0 - s.beta2))?)?;
    let update = ((&m * f(s.inv_bc1))? / ((&v * f(s.inv_bc2))?.sqrt()? + f(s.eps))?)?;
    let theta = ((theta * f(s.decay))? - (update * f(s.lr))?)?;
    Ok((theta, Tensor::stack(&[m, v], 0)?))
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn update(
    s: &AdamWStep,
    theta: &[f32],
    m: &[f32],
    v: &[f32],
    g: &[f32],
    theta_out: &mut [f32],
    m_out: &mut [f32],
    v_out: &mut [f32],
) {
    let (c1, c2) = (1.0 - s.beta1, 1.0 - s.beta2);
    for i in 0..theta.len() {
        let g = g[i] * s.grad_scale;
        let m1 = m[i] * s.beta1 + g * c1;
        let v1 = v[i] * s.beta2 + (g * g) * c2;
        let u = (m1 * s.inv_bc1) / ((v1 * s.inv_bc2).sqrt() + s.eps);
        theta_out[i] = theta[i] * s.decay - u * s.lr;
        m_out[i] = m1;
        v_out[i] = v1;
    }
}

struct AdamW(AdamWStep);

impl CustomOp3 for AdamW {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        theta: &CpuStorage,
        tl: &Layout,
        moments: &CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let name = self.name();
        let n = tl.shape().elem_count();
        if ml.shape().elem_count() != 2 * n || gl.shape().elem_count() != n {
            candle_core::bail!("{name}: moments must be (2, …θ) and g like θ")
        }
        let slice = |s: &'_ CpuStorage, l: &Layout, len: usize| -> Result<Vec<f32>> {
            let d = f32_data(s, name)?;
            Ok(d[l.start_offset()..l.start_offset() + len].to_vec())
        };
        let (theta, moments, g) = (
            slice(theta, tl, n)?,
            slice(moments, ml, 2 * n)?,
            slice(g, gl, n)?,
        );
        let (m, v) = moments.split_at(n);
        let mut out = vec![0f32; 3 * n];
        let (t_out, rest) = out.split_at_mut(n);
        let (m_out, v_out) = rest.split_at_mut(n);
        const CHUNK: usize = 1 << 14;
        t_out
            .par_chunks_mut(CHUNK)
            .zip(m_out.par_chunks_mut(CHUNK))
            .zip(v_out.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(k, ((to, mo), vo))| {
                let r = k * CHUNK..k * CHUNK + to.len();
                update(
                    &self.0,
                    &theta[r.clone()],
                    &m[r.clone()],
                    &v[r.clone()],
                    &g[r],
                    to,
                    mo,
                    vo,
                );
            });
        let mut dims = vec![3];
        dims.extend_from_slice(tl.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        theta: &candle_core::CudaStorage,
        tl: &Layout,
        moments: &candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = tl.shape().elem_count();
        if ml.shape().elem_count() != 2 * n || gl.shape().elem_count() != n {
            candle_core::bail!("{}: moments must be (2, …θ) and g like θ", self.name())
        }
        let out = super::cuda::adamw(&self.0, n, (theta, tl), (moments, ml), (g, gl))?;
        let mut dims = vec![3];
        dims.extend_from_slice(tl.dims());
        Ok((out, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition() -> Result<()> {
        let theta = randn(&[37, 29], 1)?;
        let moments = Tensor::stack(&[randn(&[37, 29], 2)?, randn(&[37, 29], 3)?.sqr()?], 0)?;
        let g = randn(&[37, 29], 4)?;
        for (decay, t, clip) in [(0.0, 1, 1.0), (0.05, 7, 1.0), (0.05, 7, 0.3)] {
            let s = AdamWStep::new(0.9, 0.95, 1e-8, 1e-3, decay, t).with_grad_scale(clip);
            let (tf, mf) = adamw(&theta, &moments, &g, &s)?;
            let (tp, mp) = adamw_plain(&theta, &moments, &g, &s)?;
            assert_eq!(tf.dims(), theta.dims());
            assert_eq!(mf.dims(), moments.dims());
            assert!(max_diff(&tf, &tp)? < 1e-6, "θ differs");
            assert!(max_diff(&mf, &mp)? < 1e-6, "moments differ");
            assert!(max_diff(&tf, &theta)? > 1e-4, "θ did not move");
        }
        Ok(())
    }

    /// Clipping folded into the update gives what scaling the gradient first gave, bit for bit
    /// (the training loop scaled each gradient by a separate op before).
    #[test]
    fn a_grad_scale_is_the_scaled_gradient() -> Result<()> {
        let theta = randn(&[300, 7], 1)?;
        let moments = Tensor::stack(&[randn(&[300, 7], 2)?, randn(&[300, 7], 3)?.sqr()?], 0)?;
        let g = randn(&[300, 7], 4)?;
        let s = AdamWStep::new(0.9, 0.95, 1e-8, 1e-3, 0.05, 3);
        let scale = 3.0 / 17.3;
        let (t1, m1) = adamw(&theta, &moments, &g, &s.with_grad_scale(scale))?;
        let (t2, m2) = adamw(&theta, &moments, &(&g * scale)?, &s)?;
        assert_eq!(t1.to_vec2::<f32>()?, t2.to_vec2::<f32>()?);
        assert_eq!(
            m1.flatten_all()?.to_vec1::<f32>()?,
            m2.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
