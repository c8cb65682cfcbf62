//! MAR (Li et al. 2024, §3.3–3.4): masked autoregressive generation in random order with
//! bidirectional attention. An MAE-style encoder sees the class buffer and the known tokens; a
//! decoder fills in mask tokens; its output, plus a position embedding, conditions the head.
use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::class_embed::ClassEmbed;
use crate::config::GeneratorConfig;
use crate::fused;
use crate::head::Head;
use crate::nn::{self, linear_xavier, Block, Dropout, LayerNorm, Linear};
use crate::rng::Rng;
use crate::sampling::{SampleOptions, SampleState};
use crate::shard::Shard;
use crate::shard::TokenRows;
use crate::tokens::{TokenEmbed, Tokens};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Mar {
    embed: TokenEmbed,
    z_proj_ln: LayerNorm,
    class: ClassEmbed,
    encoder_pos_embed_learned: Tensor,
    encoder_blocks: Vec<Block>,
    encoder_norm: LayerNorm,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos_embed_learned: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    diffusion_pos_embed_learned: Tensor,
    head: Head,
    seq_len: usize,
    buffer_size: usize,
    decoder_width: usize,
    label_drop: f64,
    /// dropout probabilities of the blocks in training (attention probabilities, projections)
    dropout: (f64, f64),
}

/// Mask ratio for training: truncated Gaussian N(1, 0.25²) on [0.7, 1] (mean ≈ 0.867, MAR §3.3).
pub fn sample_mask_ratio(rng: &mut Rng) -> f64 {
    loop {
        let r = 1.0 + 0.25 * rng.normal();
        if (0.7..=1.0).contains(&r) {
            return r;
        }
    }
}

/// Number of tokens still masked after step `step` of `num_iter` (cosine schedule, at least one
/// token predicted per step; the reference's `sample_tokens` arithmetic).
pub fn tokens_masked_after(
    step: usize,
    num_iter: usize,
    seq_len: usize,
    currently_masked: usize,
) -> usize {
    let ratio = (std::f64::consts::FRAC_PI_2 * (step + 1) as f64 / num_iter as f64).cos();
    let len = (seq_len as f64 * ratio).floor() as usize;
    len.min(currently_masked.saturating_sub(1)).max(1)
}

/// MAR's `patchify`: (B, C, H, W) → (B, (H/p)(W/p), C·p·p), channel-major within a token.
pub fn patchify(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / p, p, w / p, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / p) * (w / p), c * p * p))
}

/// MAR's `unpatchify`, the inverse of [`patchify`]: (B, h·w, C·p·p) on a square h = w grid →
/// (B, C, h·p, w·p), the tokenizer latents the reference decodes.
pub fn unpatchify(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    let side = (l as f64).sqrt().round() as usize;
    if side * side != l || d % (p * p) != 0 {
        candle_core::bail!(
            "unpatchify: {l} tokens of width {d} are not a square grid of {p}x{p} patches"
        )
    }
    let c = d / (p * p);
    x.reshape((b, side, side, c, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, side * p, side * p))
}

impl Mar {
    /// The head that turns each token's z into a loss or a sample.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Class embeddings as used when sampling: conditional rows, then fake-class rows if `guided`.
    pub fn class_embedding(&self, labels: &[u32], guided: bool) -> candle_core::Result<Tensor> {
        self.class
            .sample(labels, guided, self.encoder_pos_embed_learned.device())
    }

    pub fn new(cfg: &GeneratorConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let wd = cfg.decoder_width;
        let total = cfg.seq_len + cfg.buffer_size;
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(Mar {
            embed: cfg.token_embed(w, vb.clone())?,
            z_proj_ln: LayerNorm::new(w, 1e-6, true, vb.pp("z_proj_ln"))?,
            class: ClassEmbed::new(cfg.num_classes, w, vb.clone())?,
            encoder_pos_embed_learned: vb.get_with_hints(
                (1, total, w),
                "encoder_pos_embed_learned",
                init,
            )?,
            encoder_blocks: (0..cfg.depth)
                .map(|i| {
                    Block::new(
                        w,
                        cfg.heads,
                        cfg.mlp_ratio,
                        cfg.precision,
                        vb.pp(format!("encoder_blocks.{i}")),
                    )
                })
                .collect::<candle_core::Result<_>>()?,
            encoder_norm: LayerNorm::new(w, 1e-6, true, vb.pp("encoder_norm"))?,
            decoder_embed: linear_xavier(w, wd, vb.pp("decoder_embed"))?
                .with_precision(cfg.precision),
            mask_token: vb.get_with_hints((1, 1, wd), "mask_token", init)?,
            decoder_pos_embed_learned: vb.get_with_hints(
                (1, total, wd),
                "decoder_pos_embed_learned",
                init,
            )?,
            decoder_blocks: (0..cfg.decoder_depth)
                .map(|i| {
                    Block::new(
                        wd,
                        cfg.decoder_heads,
                        cfg.mlp_ratio,
                        cfg.precision,
                        vb.pp(format!("decoder_blocks.{i}")),
                    )
                })
                .collect::<candle_core::Result<_>>()?,
            decoder_norm: LayerNorm::new(wd, 1e-6, true, vb.pp("decoder_norm"))?,
            diffusion_pos_embed_learned: vb.get_with_hints(
                (1, cfg.seq_len, wd),
                "diffusion_pos_embed_learned",
                init,
            )?,
            head: cfg.build_head(vb)?,
            seq_len: cfg.seq_len,
            buffer_size: cfg.buffer_size,
            decoder_width: wd,
            label_drop: cfg.label_drop,
            dropout: (cfg.attn_dropout, cfg.proj_dropout),
        })
    }

    /// Whether position `p` of image `bi` (buffer slots first) reaches the encoder.
    fn kept(&self, mask: &[bool], bi: usize, p: usize) -> bool {
        p < self.buffer_size || !mask[bi * self.seq_len + p - self.buffer_size]
    }

    /// Indices (into the flattened (B·(L+buffer)) sequence) of the buffer and the unmasked tokens.
    fn kept_indices(&self, mask: &[bool], b: usize) -> Vec<u32> {
        let total = self.seq_len + self.buffer_size;
        (0..b)
            .flat_map(|bi| (0..total).map(move |p| (bi, p)))
            .filter(|&(bi, p)| self.kept(mask, bi, p))
            .map(|(bi, p)| (bi * total + p) as u32)
            .collect()
    }

    /// MAE encoder: buffer ← class embedding, add positions, drop masked tokens, transform.
    /// `mask` is B×L, true = masked; every row must mask the same number of tokens.
    pub fn forward_encoder(
        &self,
        tokens: &Tokens,
        mask: &[bool],
        class_embedding: &Tensor,
        drop: Option<&Dropout>,
    ) -> Result<Tensor> {
        let x = self.embed.forward(tokens)?;
        let (b, l, w) = x.dims3()?;
        let total = l + self.buffer_size;
        let buffer = class_embedding
            .unsqueeze(1)?
            .broadcast_as((b, self.buffer_size, w))?;
        let x = Tensor::cat(&[&buffer, &x], 1)?;
        let x = nn::add_position_embedding(&x, &self.encoder_pos_embed_learned)?;
        let x = self.z_proj_ln.forward(&x)?;
        let idx = self.kept_indices(mask, b);
        let kept = idx.len() / b;
        let mut x = fused::gather_rows(&x.reshape((b * total, w))?, &idx)?.reshape((b, kept, w))?;
        for block in &self.encoder_blocks {
            x = block.forward(&x, false, drop)?;
        }
        Ok(self.encoder_norm.forward(&x)?)
    }

    /// MAE decoder: put the encoded tokens back, mask tokens elsewhere; returns z (B, L, Wd).
    pub fn forward_decoder(
        &self,
        x: &Tensor,
        mask: &[bool],
        drop: Option<&Dropout>,
    ) -> Result<Tensor> {
        let x = self.decoder_embed.forward(x)?;
        let (b, kept, wd) = x.dims3()?;
        let total = self.seq_len + self.buffer_size;
        let src = Tensor::cat(
            &[
                &x.reshape((b * kept, wd))?,
                &self.mask_token.reshape((1, wd))?,
            ],
            0,
        )?;
        let mut idx = Vec::with_capacity(b * total);
        for bi in 0..b {
            let mut rank = 0;
            for p in 0..total {
                if self.kept(mask, bi, p) {
                    idx.push((bi * kept + rank) as u32);
                    rank += 1;
                } else {
                    idx.push((b * kept) as u32);
                }
            }
        }
        let x = fused::gather_rows(&src, &idx)?.reshape((b, total, wd))?;
        let mut x = nn::add_position_embedding(&x, &self.decoder_pos_embed_learned)?;
        for block in &self.decoder_blocks {
            x = block.forward(&x, false, drop)?;
        }
        let x = self
            .decoder_norm
            .forward(&x)?
            .narrow(1, self.buffer_size, self.seq_len)?;
        Ok(nn::add_position_embedding(
            &x,
            &self.diffusion_pos_embed_learned,
        )?)
    }

    /// Random orders and a mask of the first ⌈L·r⌉ positions of each order.
    fn training_mask(&self, b: usize, rng: &mut Rng) -> Vec<bool> {
        let l = self.seq_len;
        let num_masked = ((l as f64 * sample_mask_ratio(rng)).ceil() as usize).clamp(1, l);
        let mut mask = vec![false; b * l];
        for bi in 0..b {
            for &p in rng.permutation(l).iter().take(num_masked) {
                mask[bi * l + p] = true;
            }
        }
        mask
    }

    /// The training loss of rows `shard` of a batch (`tokens`, `labels` hold theirs): the
    /// mask is drawn for the whole batch, and the loss is a mean over the whole batch's masked
    /// tokens, so that shards add up to the whole.
    pub fn loss(
        &self,
        tokens: &Tokens,
        labels: &[u32],
        rng: &mut Rng,
        shard: Shard,
    ) -> Result<Tensor> {
        let dev = tokens.tensor().device().clone();
        let b = labels.len();
        let l = self.seq_len;
        let class_embedding = self
            .class
            .train(labels, self.label_drop, rng, &dev, shard)?;
        let whole_mask = self.training_mask(shard.total, rng);
        let masked = whole_mask.iter().filter(|&&m| m).count();
        let mask = shard.take(&whole_mask, l);
        let drop = Dropout::new(self.dropout.0, self.dropout.1, rng).map(|d| d.for_shard(shard));
        let x = self.forward_encoder(tokens, &mask, &class_embedding, drop.as_ref())?;
        let z = self.forward_decoder(&x, &mask, drop.as_ref())?;
        let z = z.reshape((b * l, self.decoder_width))?;
        let mask_t: Vec<f32> = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        let mask_t = Tensor::from_vec(mask_t, b * l, &dev)?;
        let rows = TokenRows {
            shard: shard.times(l),
            weight: masked,
        };
        self.head
            .loss(&z, &tokens.flatten_rows()?, Some(&mask_t), rows, rng)
    }

    /// MAR sampling (the reference `sample_tokens`): K steps of a cosine schedule in a fresh random
    /// order per image; CFG on the head with the fake class as the unconditional branch.
    pub fn sample(&self, labels: &[u32], opts: &SampleOptions, rng: &mut Rng) -> Result<Tokens> {
        let dev = self.encoder_pos_embed_learned.device().clone();
        let b = labels.len();
        let l = self.seq_len;
        let guided = opts.cfg != 1.0;
        let rows = if guided { 2 * b } else { b };
        let orders: Vec<Vec<usize>> = (0..b).map(|_| rng.permutation(l)).collect();
        let mut state = SampleState::new(&self.head, b, l);
        let mut masked = vec![true; b * l];
        let class_embedding = self.class.sample(labels, guided, &dev)?;
        let num_iter = opts.num_iter.clamp(1, l);
        let mut currently_masked = l;
        for step in 0..num_iter {
            let tokens = state.tokens(rows, l, &dev)?;
            let mask_rows: Vec<bool> = if guided {
                [masked.clone(), masked.clone()].concat()
            } else {
                masked.clone()
            };
            let x = self.forward_encoder(&tokens, &mask_rows, &class_embedding, None)?;
            let z = self.forward_decoder(&x, &mask_rows, None)?;
            let last = step + 1 >= num_iter;
            let mask_len = tokens_masked_after(step, num_iter, l, currently_masked);
            // positions to predict now: masked now and not masked after this step (all at the end)
            let mut to_predict = Vec::new();
            let mut next = vec![false; b * l];
            for bi in 0..b {
                if !last {
                    for &p in orders[bi].iter().take(mask_len) {
                        next[bi * l + p] = true;
                    }
                }
                for p in 0..l {
                    if masked[bi * l + p] && !next[bi * l + p] {
                        to_predict.push(bi * l + p);
                    }
                }
            }
            let cfg_iter = opts.cfg_at(l - mask_len, l);
            let mut rows_idx: Vec<u32> = to_predict.iter().map(|&i| i as u32).collect();
            if guided {
                rows_idx.extend(to_predict.iter().map(|&i| (i + b * l) as u32));
            }
            let zf = z.reshape((rows * l, self.decoder_width))?;
            let zsel = zf.index_select(
                &Tensor::from_vec(rows_idx.clone(), rows_idx.len(), &dev)?,
                0,
            )?;
            let sampled = self
                .head
                .sample(&zsel, opts.temperature, guided, cfg_iter, rng)?;
            state.write(&to_predict, &sampled)?;
            masked = next;
            currently_masked = mask_len;
        }
        state.tokens(b, l, &dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unpatchify_inverts_patchify() -> candle_core::Result<()> {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 8.0 * 8.0, &Device::Cpu)?.reshape((2, 3, 8, 8))?;
        for p in [1, 2, 4] {
            let t = patchify(&x, p)?;
            assert_eq!(t.dims(), &[2, 64 / (p * p), 3 * p * p]);
            let back = unpatchify(&t, p)?;
            let diff = (back - &x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "patch size {p}");
        }
        Ok(())
    }
}
