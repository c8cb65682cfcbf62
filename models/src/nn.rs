//! Building blocks shared by the generators: LayerNorm from basic ops (the fused candle kernels
//! drop gradients, see CRATES.md), linear layers that can compute in bf16, and the pre-norm
//! transformer block of timm's ViT as used by MAR.
use candle_core::{DType, Module, Result, Tensor};

use crate::fused;
use crate::{Rng, Shard};
use candle_nn::{Init, VarBuilder};

/// Arithmetic of the matrix products. The weights are f32 variables either way (master weights,
/// optimizer state in f32); in bf16 mode a product casts its operands to bf16 and its result back
/// to f32, and everything else (norms, softmax, biases, diffusion math, losses) stays f32.
/// `to_dtype` is differentiable, so gradients reach the f32 weights as f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The dtype of the matrix products' operands.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// The spec's spelling: "f32" or "bf16".
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// `a · b` computed in this precision, returned as f32.
    pub fn matmul(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.product(a, b)?.to_dtype(DType::F32)
    }

    /// a·b in this precision, left in the operands' dtype (bf16 for Bf16); batched products of
    /// f32 on the CPU share their batch over the threads ([`fused::batched_matmul`]).
    pub fn product(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dtype = self.dtype();
        fused::batched_matmul(&a.to_dtype(dtype)?, &b.to_dtype(dtype)?)
    }

    /// The dtype attention keeps q, k and v in, on `device`: the products' own on CUDA, where
    /// the head split casts as it copies ([`fused::split_heads`]); f32 on the CPU, where the
    /// product casts, as it always did.
    fn heads_dtype(self, device: &candle_core::Device) -> DType {
        match device.is_cuda() {
            true => self.dtype(),
            false => DType::F32,
        }
    }
}

/// A linear layer (y = x·Wᵀ + b) whose product runs in its [`Precision`]; the bias is added in f32
/// ([`fused::bias_add`]). In f32 it computes what candle's `Linear` does (a frozen layer up to
/// rounding, see [`fixed_weight_layout`]).
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    precision: Precision,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            inner: candle_nn::Linear::new(fixed_weight_layout(weight), bias),
            precision: Precision::F32,
        }
    }

    /// The same layer computing in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// `forward(x).chunk(n, last dim)`. When gradients are tracked, computed as n products with
    /// row blocks of the weight: the same values, but no chunk's gradient is padded back to the
    /// full output width (candle's narrow backward writes a zero tensor around each), only the
    /// small weight's are. Without gradients, one product (fewer, larger products sample faster).
    pub fn forward_chunks(&self, x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        let out = self.weight().dim(0)?;
        if n == 0 || out % n != 0 {
            candle_core::bail!("forward_chunks: {out} outputs do not split into {n} chunks")
        }
        let c = out / n;
        if !x.track_op() && !self.weight().track_op() {
            // nothing to differentiate (sampling): one product, chunks as views of it
            return self.forward(x)?.chunk(n, candle_core::D::Minus1);
        }
        (0..n)
            .map(|i| {
                let w = self.weight().narrow(0, i * c, c)?;
                let b = self.bias().map(|b| b.narrow(0, i * c, c)).transpose()?;
                Linear::new(w, b).with_precision(self.precision).forward(x)
            })
            .collect()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.precision {
            Precision::F32 => fused::linear(x, self.weight(), self.bias()),
            Precision::Bf16 => fused::linear_bf16(x, self.weight(), self.bias()),
        }
    }
}

/// A weight that nothing differentiates (a frozen model: sampling, evaluation), on the CPU in
/// f32, stored transposed, as (in, out) row by row and viewed as the same (out, in) tensor: the
/// product then reads Wᵀ row by row instead of gathering its columns. On one thread of the 2-core
/// machine 64 × 256 × 768 took 354 µs and then 323 µs, 64 × 256 × 256 123 µs and then 104 µs
/// (sampling's Diffusion Loss MLP runs on about 64 rows per diffusion step). The values are the
/// same up to rounding: gemm's kernels for some small shapes sum in another order (1 ulp).
/// The stored weight is a copy, a snapshot of the weights the model was built from (a model
/// built from `init::frozen_var_builder` does not follow later training steps in its linear
/// layers: build it again). A trained weight keeps its layout.
fn fixed_weight_layout(w: Tensor) -> Tensor {
    if w.track_op() || !w.device().is_cpu() || w.dtype() != DType::F32 || w.rank() != 2 {
        return w;
    }
    match w.t().and_then(|t| t.contiguous()).and_then(|t| t.t()) {
        Ok(stored_transposed) => stored_transposed,
        Err(_) => w,
    }
}

/// Xavier-uniform linear layer with zero bias (the reference's `_init_weights`).
pub fn linear_xavier(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = (6.0 / (in_dim + out_dim) as f64).sqrt();
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// Linear layer initialised to zero (adaLN modulations and output layers of the Diffusion Loss MLP).
pub fn linear_zero(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// Linear layer with N(0, std²) weights and zero bias.
pub fn linear_normal(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// x + pos for tokens x (B, L, W) and a learned position embedding pos (1, L, W), as a bias of B
/// rows of L·W values ([`fused::bias_add`]): its gradient, the sum over the batch, then runs on
/// the threads, where candle sums a broadcast over the batch on one thread (6 ms of a mar-tiny
/// backward pass).
pub fn add_position_embedding(x: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let (b, l, w) = x.dims3()?;
    if pos.dims() != [1, l, w] {
        return x.broadcast_add(pos);
    }
    fused::bias_add(&x.reshape((b, l * w))?, &pos.reshape(l * w)?)?.reshape((b, l, w))
}

/// LayerNorm over the last dimension, with its own backward pass ([`fused::layer_norm`]; candle's
/// fused kernel has none, see CRATES.md).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, affine: bool, vb: VarBuilder) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(LayerNorm { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

/// timm's `Mlp`: fc1 → GELU → fc2.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, precision: Precision, vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            fc1: linear_xavier(dim, hidden, vb.pp("fc1"))?.with_precision(precision),
            fc2: linear_xavier(hidden, dim, vb.pp("fc2"))?.with_precision(precision),
        })
    }
}

impl Mlp {
    /// fc1 → GELU → dropout → fc2 → dropout (timm's `Mlp` with `drop = proj_drop`).
    pub fn forward(&self, x: &Tensor, drop: Option<&Dropout>) -> Result<Tensor> {
        let h = fused::gelu_erf(&self.fc1.forward(x)?)?;
        let h = Dropout::proj(drop, &h)?;
        Dropout::proj(drop, &self.fc2.forward(&h)?)
    }
}

/// The dropout of one training forward pass, at timm `Block`'s sites: the attention
/// probabilities (`attn`), and the outputs of the attention projection and of both MLP layers
/// (`proj`). Each site takes the next key of a counter over one key drawn from the step's seeded
/// [`Rng`], so masks are the same on every device and on resume. Sampling and evaluation pass
/// `None`: no dropout.
#[derive(Debug)]
pub struct Dropout {
    attn: f32,
    proj: f32,
    key: u64,
    sites: std::cell::Cell<u64>,
    /// The rows of the batch this process computes (data parallelism): masks are drawn at
    /// their offset in the whole batch's.
    shard: Option<Shard>,
}

impl Dropout {
    /// Dropout with these probabilities for one forward pass; `None` (and nothing drawn from
    /// `rng`) when both are 0.
    pub fn new(attn: f64, proj: f64, rng: &mut Rng) -> Option<Dropout> {
        (attn > 0.0 || proj > 0.0).then(|| Dropout {
            attn: attn as f32,
            proj: proj as f32,
            key: rng.next_u64(),
            sites: std::cell::Cell::new(0),
            shard: None,
        })
    }

    /// The same dropout for rows `shard` of the batch: each site's mask is the part of the whole
    /// batch's mask that falls on these rows (every site's tensor has the batch's rows first).
    pub fn for_shard(self, shard: Shard) -> Dropout {
        Dropout {
            shard: (!shard.is_whole()).then_some(shard),
            ..self
        }
    }

    /// The key of the next site's mask, for its tensor `x`.
    fn next_key(&self, x: &Tensor) -> u64 {
        let site = self.sites.get();
        self.sites.set(site + 1);
        let key = fused::derive_key(self.key, site);
        match self.shard {
            Some(s) if s.len > 0 => {
                let per_row = x.elem_count() / s.len;
                fused::shift_key(key, (s.start * per_row) as u64)
            }
            _ => key,
        }
    }

    /// The dropout of attention probabilities, if any, for the probabilities of scores `x`
    /// ([`fused::attention_probs`] applies it).
    pub fn attn_mask(drop: Option<&Dropout>, x: &Tensor) -> Option<fused::AttentionDropout> {
        match drop {
            Some(d) if d.attn > 0.0 => Some(fused::AttentionDropout {
                p: d.attn,
                key: d.next_key(x),
            }),
            _ => None,
        }
    }

    /// Dropout of a projection's output, if any.
    pub fn proj(drop: Option<&Dropout>, x: &Tensor) -> Result<Tensor> {
        match drop {
            Some(d) if d.proj > 0.0 => fused::dropout(x, d.proj, d.next_key(x)),
            _ => Ok(x.clone()),
        }
    }
}

/// Multi-head self-attention with a fused qkv projection (timm's `Attention`).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    precision: Precision,
}

/// Keys and values of the positions seen so far, for incremental (autoregressive) decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl Attention {
    pub fn new(dim: usize, heads: usize, precision: Precision, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            qkv: linear_xavier(dim, 3 * dim, vb.pp("qkv"))?.with_precision(precision),
            proj: linear_xavier(dim, dim, vb.pp("proj"))?.with_precision(precision),
            heads,
            precision,
        })
    }

    /// Project to (q, k, v), each (batch, heads, positions, head_dim). Three products with the
    /// weight's row blocks ([`Linear::forward_chunks`]) rather than one product cut in three: the
    /// backward of a cut (`narrow`) pads each part's gradient with zeros to the full qkv width.
    fn qkv_heads(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let dtype = self.precision.heads_dtype(x.device());
        let heads = |t: &Tensor| fused::split_heads(t, self.heads, dtype);
        let qkv = self.qkv.forward_chunks(x, 3)?;
        Ok((heads(&qkv[0])?, heads(&qkv[1])?, heads(&qkv[2])?))
    }

    /// softmax(q·kᵀ/√d) · v, causal when asked (each query sees the keys up to its own position),
    /// with dropout on the probabilities and on the projection's output when training.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        drop: Option<&Dropout>,
    ) -> Result<Tensor> {
        let hd = q.dim(3)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // scores come back in f32: scale, mask and softmax are f32 in every precision
        let att = self.precision.matmul(q, &k.t()?)?;
        // softmax, dropout and the dtype of the product with v, in one op
        let dropout = Dropout::attn_mask(drop, &att);
        let att = fused::attention_probs(&att, scale, causal, dropout, self.precision.dtype())?;
        // (batch, heads, positions, head_dim) back to (batch, positions, width) in f32
        let y = fused::merge_heads(&self.precision.product(&att, v)?)?;
        Dropout::proj(drop, &self.proj.forward(&y)?)
    }

    /// Self-attention over all positions, or causal (position i sees positions ≤ i).
    pub fn forward(&self, x: &Tensor, causal: bool, drop: Option<&Dropout>) -> Result<Tensor> {
        let (q, k, v) = self.qkv_heads(x)?;
        self.attend(&q, &k, &v, causal, drop)
    }

    /// Attend from the new positions in `x` to everything cached plus themselves (causal within x).
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let l = x.dim(1)?;
        let (q, k, v) = self.qkv_heads(x)?;
        let (k, v) = match &cache.kv {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        cache.kv = Some((k.clone(), v.clone()));
        self.attend(&q, &k, &v, l > 1, None)
    }
}

/// Pre-norm transformer block (timm's `Block`): x + attn(norm1(x)); x + mlp(norm2(x)).
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub fn new(
        dim: usize,
        heads: usize,
        mlp_ratio: f64,
        precision: Precision,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Block {
            norm1: LayerNorm::new(dim, 1e-6, true, vb.pp("norm1"))?,
            attn: Attention::new(dim, heads, precision, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, 1e-6, true, vb.pp("norm2"))?,
            mlp: Mlp::new(
                dim,
                (dim as f64 * mlp_ratio) as usize,
                precision,
                vb.pp("mlp"),
            )?,
        })
    }

    /// `drop`: the training pass's dropout, `None` when sampling or evaluating.
    pub fn forward(&self, x: &Tensor, causal: bool, drop: Option<&Dropout>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, causal, drop)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?, drop)?
    }

    /// Incremental decoding (sampling): no dropout.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = (x + self.attn.forward_cached(&self.norm1.forward(x)?, cache)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?, None)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};
    use candle_nn::VarMap;

    /// The position embedding as a bias gives broadcast_add's values and gradients, on
    /// contiguous tokens and on a slice of the sequence (as the decoder's output is).
    #[test]
    fn position_embedding_is_the_broadcast_add() -> Result<()> {
        let dev = Device::Cpu;
        let full = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 11, 8), &dev)?)?;
        let pos = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 9, 8), &dev)?)?;
        let seed = Tensor::randn(0f32, 1.0, (6, 9, 8), &dev)?;
        for (name, x) in [
            ("contiguous", full.narrow(1, 0, 9)?.contiguous()?),
            ("slice", full.narrow(1, 2, 9)?),
        ] {
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| -> Result<_> {
                let y = f(&x, pos.as_tensor())?;
                let g = (&y * &seed)?.sum_all()?.backward()?;
                let gx = g.get(full.as_tensor()).expect("x has a gradient").clone();
                let gp = g.get(pos.as_tensor()).expect("pos has a gradient").clone();
                Ok((y, gx, gp))
            };
            let ours = run(&|x, p| add_position_embedding(x, p))?;
            let plain = run(&|x, p| x.broadcast_add(p))?;
            for (what, a, b) in [
                ("values", &ours.0, &plain.0),
                ("dx", &ours.1, &plain.1),
                ("dpos", &ours.2, &plain.2),
            ] {
                let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-6, "{name}: {what} off by {diff}");
            }
        }
        Ok(())
    }

    /// A frozen layer (weights stored transposed) computes what the trained one does, whole or
    /// in chunks, up to the rounding of a different summation order in gemm's small-product
    /// kernels; the trained one keeps its weight's layout.
    #[test]
    fn a_frozen_linear_stores_its_weight_transposed_and_gives_the_same_values() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(64, 256, 768), (5, 16, 33), (130, 64, 64)] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let trained = linear_xavier(k, n, vb)?;
            let b = trained
                .bias()
                .map(|b| b.detach().affine(1.0, 0.5))
                .transpose()?;
            let trained = Linear::new(trained.weight().clone(), b.clone());
            let frozen = Linear::new(trained.weight().detach(), b);
            assert!(trained.weight().is_contiguous());
            assert_eq!(frozen.weight().stride(), [1, n], "stored as (in, out)");
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
                let (a, b) = (
                    a.flatten_all()?.to_vec1::<f32>()?,
                    b.flatten_all()?.to_vec1::<f32>()?,
                );
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                Ok(diff <= 1e-6 * scale)
            };
            assert!(
                same(&trained.forward(&x)?, &frozen.forward(&x)?)?,
                "{m}×{k}×{n}"
            );
            if n % 3 == 0 {
                let (a, b) = (
                    trained.forward_chunks(&x, 3)?,
                    frozen.forward_chunks(&x, 3)?,
                );
                for (a, b) in a.iter().zip(&b) {
                    assert!(same(a, b)?, "{m}×{k}×{n} in chunks");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn layer_norm_normalises_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let ln = LayerNorm::new(8, 1e-6, true, vb)?;
        let x = Tensor::arange(0f32, 16., &dev)?.reshape((2, 8))?;
        let y = ln.forward(&x)?;
        let m = y.mean_keepdim(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(m.iter().all(|v| v.abs() < 1e-5));
        let loss = (y * &x)?.sum_all()?;
        let g = loss.backward()?;
        for v in vm.all_vars() {
            let gv = g.get(v.as_tensor()).expect("gradient");
            assert!(gv.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn linear_is_candles_in_f32_and_close_in_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = crate::init::seeded_var_builder(&vm, 1, DType::F32, &dev);
        let l = linear_normal(32, 8, 0.5, vb)?;
        let l = Linear::new(l.weight().clone(), Some(Tensor::ones(8, DType::F32, &dev)?));
        let x = Tensor::randn(0f32, 1., (3, 5, 32), &dev)?;
        let reference =
            candle_nn::Linear::new(l.weight().clone(), l.bias().cloned()).forward(&x)?;
        let exact = (l.forward(&x)? - &reference)?.abs()?.max_all()?;
        assert_eq!(exact.to_scalar::<f32>()?, 0.0, "f32 is candle's Linear");
        let y = l.clone().with_precision(Precision::Bf16).forward(&x)?;
        assert_eq!(y.dtype(), DType::F32, "bf16 layers return f32");
        let err = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            err > 0.0 && err < 2e-2 * scale,
            "bf16 error {err} of {scale}"
        );
        Ok(())
    }

    #[test]
    fn cached_attention_matches_masked_attention() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let block = Block::new(16, 4, 2.0, Precision::F32, vb)?;
        let x = Tensor::randn(0f32, 1., (2, 5, 16), &dev)?;
        let full = block.forward(&x, true, None)?;
        let mut cache = KvCache::default();
        let first = block.forward_cached(&x.narrow(1, 0, 3)?, &mut cache)?;
        let fourth = block.forward_cached(&x.narrow(1, 3, 1)?, &mut cache)?;
        let fifth = block.forward_cached(&x.narrow(1, 4, 1)?, &mut cache)?;
        let inc = Tensor::cat(&[first, fourth, fifth], 1)?;
        let diff = (full - inc)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "diff {diff}");
        Ok(())
    }
}
