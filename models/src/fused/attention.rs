//! The probabilities of scaled dot-product attention: p = softmax(s·scale + mask) over the keys,
//! with the mask either absent or causal (query i of the last Lq positions sees keys j ≤ i + Lk −
//! Lq), then dropout, in the dtype of the product that takes them (f32, or bf16 with bf16
//! products). Backward: ds = scale · p ⊙ (dp − Σ_j dp·p), dp the gradient of the dropped-out
//! probabilities times the dropout mask; masked keys have p = 0 and get no gradient.
//!
//! As candle ops, softmax, dropout and the cast are three passes over a (batch, heads, queries,
//! keys) tensor forward and three backward, and keep three such tensors for the backward pass.
//! On CUDA they are one op: one pass each way, and the backward recomputes p from the scores
//! (which the product before keeps anyway) instead of keeping it, with the mask redrawn from its
//! key; without dropout in f32 the backward reads the kept result p instead. On the CPU, where
//! arithmetic rather than memory is the limit, the fused softmax keeps p for its backward and
//! dropout is the fused dropout op, as before this op existed.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use multiversion::multiversion;

use super::{as_rows, dropout, f32_data, fused, math, par_rows, rows_of};

/// Dropout of the probabilities: value i of the result is kept (and scaled by 1/(1 − p)) when
/// its 24-bit uniform under `key` is at least p's threshold, as [`super::dropout`] draws it.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDropout {
    pub p: f32,
    pub key: u64,
}

/// The mask's integers: kept when uniform24(key, i) ≥ threshold, scaled by keep_scale; threshold
/// 0 and keep_scale 1 keep every value.
#[derive(Debug, Clone, Copy)]
struct Mask {
    key: u64,
    threshold: u32,
    keep_scale: f32,
}

impl Mask {
    fn of(d: Option<AttentionDropout>) -> Option<Mask> {
        d.filter(|d| d.p > 0.0).map(|d| Mask {
            key: d.key,
            threshold: dropout::threshold(d.p),
            keep_scale: 1.0 / (1.0 - d.p),
        })
    }

    /// The kernels' arguments: (key, threshold, keep_scale), keeping all without a mask.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn args(m: Option<Mask>) -> (u64, u32, f32) {
        m.map_or((0, 0, 1.0), |m| (m.key, m.threshold, m.keep_scale))
    }
}

/// softmax(scores·scale [+ causal mask]) over the last dimension of (…, queries, keys) scores;
/// fused for f32 (CPU, and CUDA with the `cuda` feature), else [`attention_softmax_plain`].
pub fn attention_softmax(scores: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    attention_probs(scores, scale, causal, None, DType::F32)
}

/// dropout(softmax(scores·scale [+ causal mask])) as `dtype` (F32, or BF16 for a bf16 product):
/// fused for f32 scores (CPU, and CUDA with the `cuda` feature), else [`attention_probs_plain`].
pub fn attention_probs(
    scores: &Tensor,
    scale: f64,
    causal: bool,
    dropout: Option<AttentionDropout>,
    dtype: DType,
) -> Result<Tensor> {
    if let Some(d) = dropout {
        if d.p.is_nan() || !(0.0..1.0).contains(&d.p) {
            candle_core::bail!("attention dropout must be in [0, 1), got {}", d.p)
        }
    }
    if !fused(scores) {
        return attention_probs_plain(scores, scale, causal, dropout, dtype);
    }
    let on_cuda = scores.device().is_cuda();
    let op = AttentionProbs {
        scale,
        causal,
        mask: Mask::of(dropout).filter(|_| on_cuda),
        // CUDA writes bf16 itself; the CPU casts
        out: if on_cuda { dtype } else { DType::F32 },
    };
    let p = as_rows(scores)?.apply_op1(op)?;
    let p = match dropout {
        Some(d) if !on_cuda => super::dropout(&p, d.p, d.key)?,
        _ => p,
    };
    p.to_dtype(dtype)
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

/// [`attention_probs`] as candle ops: softmax, dropout, cast.
pub fn attention_probs_plain(
    scores: &Tensor,
    scale: f64,
    causal: bool,
    dropout: Option<AttentionDropout>,
    dtype: DType,
) -> Result<Tensor> {
    let p = attention_softmax_plain(scores, scale, causal)?;
    let p = match dropout {
        Some(d) => super::dropout_plain(&p.contiguous()?, d.p, d.key)?,
        None => p,
    };
    p.to_dtype(dtype)
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
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_row(p: &[f32], dp: &[f32], scale: f32, ds: &mut [f32]) {
    let inner = math::dot(p, dp);
    for j in 0..ds.len() {
        ds[j] = scale * p[j] * (dp[j] - inner);
    }
}

/// The fused op: (…, queries, keys) f32 scores to probabilities in `out` (F32, or BF16 on CUDA).
struct AttentionProbs {
    scale: f64,
    causal: bool,
    mask: Option<Mask>,
    out: DType,
}

/// The number of queries (second-to-last dimension) of scores laid out as `sl`, checked against
/// the number of keys when the mask is causal.
fn queries(sl: &Layout, causal: bool) -> Result<usize> {
    let dims = sl.dims();
    let keys = dims.last().copied().unwrap_or(1);
    let queries = if dims.len() >= 2 {
        dims[dims.len() - 2]
    } else {
        1
    };
    if causal && queries > keys {
        candle_core::bail!("causal attention: {queries} queries but only {keys} keys")
    }
    Ok(queries)
}

impl CustomOp1 for AttentionProbs {
    fn name(&self) -> &'static str {
        "fused-attention-probs"
    }

    /// The softmax alone: on the CPU, dropout is its own op ([`attention_probs`]).
    fn cpu_fwd(&self, s: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.mask.is_some() || self.out != DType::F32 {
            candle_core::bail!("{}: on the CPU, f32 and without dropout", self.name())
        }
        let ss = f32_data(s, self.name())?;
        let sr = rows_of(sl, self.name())?;
        let queries = queries(sl, self.causal)?;
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
        let queries = queries(sl, self.causal)?;
        let (key, threshold, keep_scale) = Mask::args(self.mask);
        let out = super::cuda::attention_probs(
            (s, sl),
            (self.scale as f32, self.causal, queries),
            (key, threshold, keep_scale),
            self.out,
        )?;
        Ok((out, sl.shape().clone()))
    }

    fn bwd(&self, s: &Tensor, p: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        if self.mask.is_none() && self.out == DType::F32 {
            // the result is p itself: the backward reads it
            let op = AttentionSoftmaxBackward { scale: self.scale };
            return Ok(Some(as_rows(p)?.apply_op2_no_bwd(&as_rows(dout)?, &op)?));
        }
        let op = AttentionProbsBackward {
            scale: self.scale,
            causal: self.causal,
            mask: self.mask,
        };
        Ok(Some(as_rows(s)?.apply_op2_no_bwd(&as_rows(dout)?, &op)?))
    }
}

/// ds of [`AttentionProbs`] from (s, dout), p recomputed from s and dp = dout times the mask
/// (CUDA only).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AttentionProbsBackward {
    scale: f64,
    causal: bool,
    mask: Option<Mask>,
}

impl CustomOp2 for AttentionProbsBackward {
    fn name(&self) -> &'static str {
        "fused-attention-probs-backward"
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
        s: &candle_core::CudaStorage,
        sl: &Layout,
        dout: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let queries = queries(sl, self.causal)?;
        let (key, threshold, keep_scale) = Mask::args(self.mask);
        let ds = super::cuda::attention_probs_backward(
            (s, sl),
            (dout, dl),
            (self.scale as f32, self.causal, queries),
            (key, threshold, keep_scale),
        )?;
        Ok((ds, sl.shape().clone()))
    }
}

/// ds of [`AttentionProbs`] without dropout in f32, from its result p and dp.
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
    fn matches_the_composition_with_and_without_the_causal_mask_and_dropout() -> Result<()> {
        let s = (randn(&[2, 3, 5, 7], 1)? * 4.0)?;
        let seed = randn(&[2, 3, 5, 7], 2)?;
        for dropout in [None, Some(AttentionDropout { p: 0.3, key: 77 })] {
            for causal in [false, true] {
                let f = |t: &[Tensor]| attention_probs(&t[0], 0.3, causal, dropout, DType::F32);
                let (yf, gf) = grads(std::slice::from_ref(&s), f, &seed)?;
                let p =
                    |t: &[Tensor]| attention_probs_plain(&t[0], 0.3, causal, dropout, DType::F32);
                let (yp, gp) = grads(std::slice::from_ref(&s), p, &seed)?;
                let case = format!("causal={causal}, dropout={dropout:?}");
                assert!(max_diff(&yf, &yp)? < 1e-6, "forward, {case}");
                assert!(max_diff(&gf[0], &gp[0])? < 1e-6, "gradient, {case}");
                if !causal {
                    // no key is masked: every zero is a dropped probability
                    let values = yf.flatten_all()?.to_vec1::<f32>()?;
                    let dropped = values.iter().filter(|&&v| v == 0.0).count();
                    assert_eq!(dropout.is_some(), dropped > 10, "{dropped} zeros, {case}");
                }
            }
        }
        // the no-dropout f32 entry point is the same op
        let a = attention_softmax(&s, 0.3, true)?;
        let b = attention_probs(&s, 0.3, true, None, DType::F32)?;
        assert_eq!(max_diff(&a, &b)?, 0.0);
        Ok(())
    }

    /// On the CPU it computes, bit for bit, what the training loop computed before it: the fused
    /// softmax, then the fused dropout (so trained results do not change).
    #[test]
    fn it_is_softmax_then_dropout_bit_for_bit() -> Result<()> {
        let s = (randn(&[3, 2, 40, 45], 1)? * 4.0)?;
        let seed = randn(&[3, 2, 40, 45], 2)?;
        let (p, key) = (0.1, 12345);
        let d = Some(AttentionDropout { p, key });
        let f = |t: &[Tensor]| attention_probs(&t[0], 0.125, true, d, DType::F32);
        let (yf, gf) = grads(std::slice::from_ref(&s), f, &seed)?;
        let before =
            |t: &[Tensor]| super::super::dropout(&attention_softmax(&t[0], 0.125, true)?, p, key);
        let (yb, gb) = grads(std::slice::from_ref(&s), before, &seed)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        assert_eq!(bits(&yf)?, bits(&yb)?, "forward");
        assert_eq!(bits(&gf[0])?, bits(&gb[0])?, "gradient");
        Ok(())
    }

    #[test]
    fn bf16_probabilities_are_the_f32_ones_rounded() -> Result<()> {
        let s = (randn(&[2, 9, 30], 1)? * 4.0)?;
        let d = Some(AttentionDropout { p: 0.2, key: 5 });
        let y = attention_probs(&s, 0.2, false, d, DType::BF16)?;
        assert_eq!(y.dtype(), DType::BF16);
        let want = attention_probs(&s, 0.2, false, d, DType::F32)?.to_dtype(DType::BF16)?;
        assert_eq!(
            y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?
        );
        assert!(attention_probs(
            &s,
            0.2,
            false,
            Some(AttentionDropout { p: 1.0, key: 5 }),
            DType::F32
        )
        .is_err());
        Ok(())
    }
}
