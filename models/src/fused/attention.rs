//! The softmax of scaled dot-product attention: p = softmax(s·scale + mask) over the keys, with
//! the mask either absent or causal (query i of the last Lq positions sees keys j ≤ i + Lk − Lq).
//! Backward: ds = scale · p ⊙ (dp − Σ_j dp·p); masked keys have p = 0 and get no gradient.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use multiversion::multiversion;

use super::{as_rows, f32_data, fused_cpu, math, par_rows, rows_of, with_cpu_rows};

/// softmax(scores·scale [+ causal mask]) over the last dimension of (…, queries, keys) scores;
/// fused on the CPU for f32, else [`attention_softmax_plain`].
pub fn attention_softmax(scores: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    if fused_cpu(scores) {
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
        s = s.broadcast_add(&crate::nn::causal_mask(q, k, s.device())?)?;
    }
    candle_nn::ops::softmax(&s, D::Minus1)
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

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        let ss = f32_data(s, self.name())?;
        let sr = rows_of(sl, self.name())?;
        let dims = sl.dims();
        let queries = if dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            1
        };
        if self.causal && queries > sr.cols {
            candle_core::bail!(
                "causal attention: {queries} queries but only {} keys",
                sr.cols
            )
        }
        let out = par_rows(sr.rows, sr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(sr.cols).enumerate() {
                let r = first + i;
                let vis = visible(r, queries, sr.cols, self.causal);
                forward_row(sr.row(ss, r), self.scale as f32, vis, o);
            }
        });
        Ok((CpuStorage::F32(out), sl.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        let ds = with_cpu_rows(p, self.name(), |ps, pr| {
            with_cpu_rows(dp, self.name(), |dps, dpr| {
                Ok(par_rows(pr.rows, pr.cols, |first, block| {
                    for (i, o) in block.chunks_exact_mut(pr.cols).enumerate() {
                        let r = first + i;
                        backward_row(pr.row(ps, r), dpr.row(dps, r), self.scale as f32, o);
                    }
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(ds, p.shape(), p.device())?))
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
                &[s.clone()],
                |t| attention_softmax(&t[0], 0.3, causal),
                &seed,
            )?;
            let (yp, gp) = grads(
                &[s.clone()],
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
