//! The softmax of scaled dot-product attention: p = softmax(s·scale + mask) over the keys, with
//! the mask either absent or causal (query i of the last Lq positions sees keys j ≤ i + Lk − Lq).
//! Backward: ds = scale · p ⊙ (dp − Σ_j dp·p); masked keys have p = 0 and get no gradient.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use multiversion::multiversion;

use super::{as_rows, f32_data, fused, math, par_rows, rows_of};

/// softmax(scores·scale [+ causal mask]) over the last dimension of (…, queries, keys) scores;
/// fused for f32 (CPU, and CUDA with the `cuda` feature), else [`attention_softmax_plain`].
pub fn attention_softmax(scores: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    if fused(scores) {
        as_rows(scores)?.apply_op1(AttentionSoftmax { scale, causal })
    } else {
        attention_softmax_plain(scores, scale, causal)
    }
}

/// The plain composition of candle ops (the reference for the tests).
pub fn attention_softmax_plain(scores: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let mut s = (scores * scale)?;
    if causal {
        let (q, k) = (s.dim(D::Minus2)?, s.dim(D::Minus1)?);
        s = s.broadcast_add(&causal_mask(q, k, s.device())?)?;
    }
    candle_nn::ops::softmax(&s, D::Minus1)
}

/// Additive causal mask for `queries` new positions at the end of `keys` positions.
pub fn causal_mask(queries: usize, keys: usize, device: &candle_core::Device) -> Result<Tensor> {
    let offset = keys - queries;
    let data: Vec<f32> = (0..queries)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j <= i + offset {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (queries, keys), device)
}

/// Keys visible to query row `r` of a (…, queries, keys) tensor.
fn visible(r: usize, queries: usize, keys: usize, causal: bool) -> usize {
    if causal {
        (r % queries + 1 + keys - queries).min(keys)
    } else {
        keys
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_row(s: &[f32], scale: f32, visible: usize, p: &mut [f32]) {
    let (sv, pv) = (&s[..visible], &mut p[..visible]);
    let m = math::max(sv) * scale;
    for j in 0..visible {
        pv[j] = math::exp(sv[j] * scale - m);
    }
    let inv = 1.0 / math::sum(pv);
    for v in pv.iter_mut() {
        *v *= inv;
    }
    // masked keys stay 0 (the output starts zeroed)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_row(p: &[f32], dp: &[f32], scale: f32, ds: &mut [f32]) {
    let inner = math::dot(p, dp);
    for j in 0..ds.len() {
        ds[j] = scale * p[j] * (dp[j] - inner);
    }
}

struct AttentionSoftmax {
    scale: f64,
    causal: bool,
}

impl AttentionSoftmax {
    /// The number of queries (second-to-last dimension) of scores laid out as `sl`, checked
    /// against the number of keys when the mask is causal.
    fn queries(&self, sl: &Layout) -> Result<usize> {
        let dims = sl.dims();
        let keys = dims.last().copied().unwrap_or(1);
        let queries = if dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            1
        };
        if self.causal && queries > keys {
            candle_core::bail!("causal attention: {queries} queries but only {keys} keys")
        }
        Ok(queries)
    }
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        let ss = f32_data(s, self.name())?;
        let sr = rows_of(sl, self.name())?;
        let queries = self.queries(sl)?;
        let out = par_rows(sr.rows, sr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(sr.cols).enumerate() {
                let r = first + i;
                let vis = visible(r, queries, sr.cols, self.causal);
                forward_row(sr.row(ss, r), self.scale as f32, vis, o);
            }
        });
        Ok((CpuStorage::F32(out), sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = s.device();
        let (sv, sr) = cuda::rows_view(s, sl, self.name())?;
        let queries = self.queries(sl)?;
        let n = sr.rows * sr.cols;
        if n == 0 {
            return Ok((
                cuda::wrap(dev.alloc_zeros::<f32>(0)?, dev),
                sl.shape().clone(),
            ));
        }
        let p = cuda::alloc(dev, n)?;
        let kernel = cuda::Kernel::load(dev, "fused_softmax_fwd")?;
        let mut b = kernel.builder();
        let (scale, causal) = (self.scale as f32, self.causal as i32);
        b.arg(&sr.rows).arg(&sr.cols).arg(&sv).arg(&sr.stride);
        b.arg(&scale);
        b.arg(&causal).arg(&queries).arg(&p);
        cuda::launch(b, cuda::row_cfg(sr.rows, sr.cols))?;
        Ok((cuda::wrap(p, dev), sl.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        let op = AttentionSoftmaxBackward { scale: self.scale };
        Ok(Some(as_rows(p)?.apply_op2_no_bwd(&as_rows(dp)?, &op)?))
    }
}

/// ds of [`AttentionSoftmax`] from (p, dp).
struct AttentionSoftmaxBackward {
    scale: f64,
}

impl CustomOp2 for AttentionSoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-attention-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        dp: &CpuStorage,
        dpl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ps, pr) = (f32_data(p, self.name())?, rows_of(pl, self.name())?);
        let (dps, dpr) = (f32_data(dp, self.name())?, rows_of(dpl, self.name())?);
        let ds = par_rows(pr.rows, pr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(pr.cols).enumerate() {
                let r = first + i;
                backward_row(pr.row(ps, r), dpr.row(dps, r), self.scale as f32, o);
            }
        });
        Ok((CpuStorage::F32(ds), pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        dp: &candle_core::CudaStorage,
        dpl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = p.device();
        let (pv, pr) = cuda::rows_view(p, pl, self.name())?;
        let (dpv, dpr) = cuda::rows_view(dp, dpl, self.name())?;
        if (pr.rows, pr.cols) != (dpr.rows, dpr.cols) {
            candle_core::bail!("{}: p and dp of different shapes", self.name())
        }
        let n = pr.rows * pr.cols;
        if n == 0 {
            return Ok((
                cuda::wrap(dev.alloc_zeros::<f32>(0)?, dev),
                pl.shape().clone(),
            ));
        }
        let ds = cuda::alloc(dev, n)?;
        let kernel = cuda::Kernel::load(dev, "fused_softmax_bwd")?;
        let mut b = kernel.builder();
        let scale = self.scale as f32;
        b.arg(&pr.rows)
            .arg(&pr.cols)
            .arg(&pv)
            .arg(&pr.stride)
            .arg(&dpv)
            .arg(&dpr.stride);
        b.arg(&scale).arg(&ds);
        cuda::launch(b, cuda::row_cfg(pr.rows, pr.cols))?;
        Ok((cuda::wrap(ds, dev), pl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition_with_and_without_the_causal_mask() -> Result<()> {
        let s = (randn(&[2, 3, 5, 7], 1)? * 4.0)?;
        let seed = randn(&[2, 3, 5, 7], 2)?;
        for causal in [false, true] {
            let (yf, gf) = grads(
                std::slice::from_ref(&s),
                |t| attention_softmax(&t[0], 0.3, causal),
                &seed,
            )?;
            let (yp, gp) = grads(
                std::slice::from_ref(&s),
                |t| attention_softmax_plain(&t[0], 0.3, causal),
                &seed,
            )?;
            assert!(max_diff(&yf, &yp)? < 1e-6, "forward, causal={causal}");
            assert!(
                max_diff(&gf[0], &gp[0])? < 1e-6,
                "gradient, causal={causal}"
            );
        }
        Ok(())
    }
}
