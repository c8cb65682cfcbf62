//! Causal autoregressive generator (GPT-style). The class embedding is the first input; input i
//! carries the token generated at step i−1 and output i predicts the token of step i, under a
//! causal mask. In raster order step i is position i. In random order (Table 1's "random-order
//! AR") every image gets its own permutation, and the position of the token to predict is added
//! to each input so the model knows where it is going. Sampling decodes one token per step with a
//! kv-cache.
use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::class_embed::ClassEmbed;
use crate::config::{GeneratorConfig, Order};
use crate::fused;
use crate::head::Head;
use crate::nn::{self, Block, Dropout, KvCache, LayerNorm};
use crate::rng::Rng;
use crate::sampling::{ar_tokens_known_after, SampleOptions, SampleState};
use crate::shard::Shard;
use crate::shard::TokenRows;
use crate::tokens::{TokenEmbed, Tokens};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Ar {
    embed: TokenEmbed,
    class: ClassEmbed,
    /// position of the token each step predicts
    pos_embed_learned: Tensor,
    /// position of the token each input carries (random order only)
    input_pos_embed_learned: Option<Tensor>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Head,
    seq_len: usize,
    width: usize,
    label_drop: f64,
    /// dropout probabilities of the blocks in training (attention probabilities, projections)
    dropout: (f64, f64),
}

/// The guidance scale of step `i` of `l`: tokens counted as known after the step, as MAR counts
/// them ([`ar_tokens_known_after`]).
fn cfg_at_step(opts: &SampleOptions, i: usize, l: usize) -> f64 {
    opts.cfg_at(ar_tokens_known_after(i, l), l)
}

/// Rows `orders[b][i]` of a (L, W) table, as (B, K, W) with K = orders[b].len().
fn gather_positions(table: &Tensor, orders: &[Vec<usize>]) -> candle_core::Result<Tensor> {
    let w = table.dim(1)?;
    let l = orders.first().map(|o| o.len()).unwrap_or(0);
    let idx: Vec<u32> = orders.iter().flatten().map(|&p| p as u32).collect();
    fused::gather_rows(table, &idx)?.reshape((orders.len(), l, w))
}

/// Tokens reordered so that step i holds position `orders[b][i]`.
fn permute_tokens(tokens: &Tokens, orders: &[Vec<usize>]) -> candle_core::Result<Tokens> {
    let t = tokens.tensor();
    let l = orders.first().map(|o| o.len()).unwrap_or(0);
    let idx: Vec<u32> = orders
        .iter()
        .enumerate()
        .flat_map(|(b, o)| o.iter().map(move |&p| (b * l + p) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, orders.len() * l, t.device())?;
    Ok(match tokens {
        Tokens::Discrete(t) => Tokens::Discrete(
            t.flatten_all()?
                .index_select(&idx, 0)?
                .reshape((orders.len(), l))?,
        ),
        Tokens::Continuous(t) => {
            let c = t.dim(2)?;
            Tokens::Continuous(
                t.reshape((orders.len() * l, c))?
                    .index_select(&idx, 0)?
                    .reshape((orders.len(), l, c))?,
            )
        }
    })
}

impl Ar {
    pub fn new(cfg: &GeneratorConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(Ar {
            embed: cfg.token_embed(w, vb.clone())?,
            class: ClassEmbed::new(cfg.num_classes, w, vb.clone())?,
            pos_embed_learned: vb.get_with_hints((1, cfg.seq_len, w), "pos_embed_learned", init)?,
            input_pos_embed_learned: match cfg.order {
                Order::Raster => None,
                Order::Random => {
                    Some(vb.get_with_hints((1, cfg.seq_len, w), "input_pos_embed_learned", init)?)
                }
            },
            blocks: (0..cfg.depth)
                .map(|i| {
                    Block::new(
                        w,
                        cfg.heads,
                        cfg.mlp_ratio,
                        cfg.precision,
                        vb.pp(format!("blocks.{i}")),
                    )
                })
                .collect::<candle_core::Result<_>>()?,
            norm: LayerNorm::new(w, 1e-6, true, vb.pp("norm"))?,
            head: cfg.build_head(vb)?,
            seq_len: cfg.seq_len,
            width: w,
            label_drop: cfg.label_drop,
            dropout: (cfg.attn_dropout, cfg.proj_dropout),
        })
    }

    fn random_order(&self) -> bool {
        self.input_pos_embed_learned.is_some()
    }

    /// Teacher forcing. `orders` (random order) gives each image's generation order; `tokens`
    /// must already be in that order. Returns z for every step, (B, L, W).
    pub fn forward(
        &self,
        tokens: &Tokens,
        class_embedding: &Tensor,
        orders: Option<&[Vec<usize>]>,
        drop: Option<&Dropout>,
    ) -> Result<Tensor> {
        let x = self.embed.forward(tokens)?;
        let (b, l, w) = x.dims3()?;
        // input i carries the token of step i−1 (with its position, in random order) …
        let x = match (orders, &self.input_pos_embed_learned) {
            (Some(orders), Some(input_pos)) => {
                (x + gather_positions(&input_pos.squeeze(0)?, orders)?)?
            }
            _ => x,
        };
        let inputs = Tensor::cat(
            &[
                &class_embedding.reshape((b, 1, w))?,
                &x.narrow(1, 0, l - 1)?,
            ],
            1,
        )?;
        // … plus the position of the token step i predicts
        let mut h = match orders {
            Some(orders) if self.random_order() => {
                (inputs + gather_positions(&self.pos_embed_learned.squeeze(0)?, orders)?)?
            }
            _ => nn::add_position_embedding(&inputs, &self.pos_embed_learned)?,
        };
        for block in &self.blocks {
            h = block.forward(&h, true, drop)?;
        }
        Ok(self.norm.forward(&h)?)
    }

    /// The training loss of rows `shard` of a batch (`tokens`, `labels` hold theirs): orders
    /// are drawn for the whole batch, and the loss is a mean over all its tokens.
    pub fn loss(
        &self,
        tokens: &Tokens,
        labels: &[u32],
        rng: &mut Rng,
        shard: Shard,
    ) -> Result<Tensor> {
        let dev = tokens.tensor().device().clone();
        let b = labels.len();
        let class_embedding = self
            .class
            .train(labels, self.label_drop, rng, &dev, shard)?;
        let (tokens, orders) = if self.random_order() {
            let orders: Vec<Vec<usize>> = (0..shard.total)
                .map(|_| rng.permutation(self.seq_len))
                .collect();
            let orders = orders[shard.range()].to_vec();
            (permute_tokens(tokens, &orders)?, Some(orders))
        } else {
            (tokens.clone(), None)
        };
        let drop = Dropout::new(self.dropout.0, self.dropout.1, rng).map(|d| d.for_shard(shard));
        let z = self
            .forward(&tokens, &class_embedding, orders.as_deref(), drop.as_ref())?
            .reshape((b * self.seq_len, self.width))?;
        let rows = TokenRows {
            shard: shard.times(self.seq_len),
            weight: shard.total * self.seq_len,
        };
        self.head.loss(&z, &tokens.flatten_rows()?, None, rows, rng)
    }

    /// Run new positions through the blocks with the cache; returns the normalised outputs.
    fn step(&self, x: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        let mut h = x.clone();
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            h = block.forward_cached(&h, cache)?;
        }
        Ok(self.norm.forward(&h)?)
    }

    /// (rows, 1, W) embedding of position `orders[b][i]` from `table`, repeated for the
    /// unconditional rows when guiding.
    fn position_rows(
        &self,
        table: &Tensor,
        orders: &[Vec<usize>],
        i: usize,
        guided: bool,
    ) -> candle_core::Result<Tensor> {
        let col: Vec<Vec<usize>> = orders.iter().map(|o| vec![o[i]]).collect();
        let table = table.squeeze(0)?;
        let rows = gather_positions(&table, &col)?;
        if guided {
            Tensor::cat(&[&rows, &rows], 0)
        } else {
            Ok(rows)
        }
    }

    /// One token per step, kv-cached; CFG linear in the number of tokens generated.
    pub fn sample(&self, labels: &[u32], opts: &SampleOptions, rng: &mut Rng) -> Result<Tokens> {
        let dev = self.pos_embed_learned.device().clone();
        let b = labels.len();
        let l = self.seq_len;
        let guided = opts.cfg != 1.0;
        let rows = if guided { 2 * b } else { b };
        let orders: Vec<Vec<usize>> = if self.random_order() {
            (0..b).map(|_| rng.permutation(l)).collect()
        } else {
            vec![(0..l).collect(); b]
        };
        let mut caches = vec![KvCache::default(); self.blocks.len()];
        let mut state = SampleState::new(&self.head, b, l);
        let cls = self
            .class
            .sample(labels, guided, &dev)?
            .reshape((rows, 1, self.width))?;
        let mut z = self.step(
            &(cls + self.position_rows(&self.pos_embed_learned, &orders, 0, guided)?)?,
            &mut caches,
        )?;
        for i in 0..l {
            let zi = z.reshape((rows, self.width))?;
            let token =
                self.head
                    .sample(&zi, opts.temperature, guided, cfg_at_step(opts, i, l), rng)?;
            let at: Vec<usize> = (0..b).map(|bi| bi * l + orders[bi][i]).collect();
            state.write(&at, &token)?;
            if i + 1 < l {
                let token = match &token {
                    Tokens::Discrete(t) => Tokens::Discrete(t.reshape((b, 1))?),
                    Tokens::Continuous(t) => Tokens::Continuous(t.unsqueeze(1)?),
                };
                let x = self.embed.forward(&token)?;
                let x = if guided {
                    Tensor::cat(&[&x, &x], 0)?
                } else {
                    x
                };
                let mut x =
                    (x + self.position_rows(&self.pos_embed_learned, &orders, i + 1, guided)?)?;
                if let Some(input_pos) = &self.input_pos_embed_learned {
                    x = (x + self.position_rows(input_pos, &orders, i, guided)?)?;
                }
                z = self.step(&x, &mut caches)?;
            }
        }
        state.tokens(b, l, &dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GeneratorKind, HeadConfig};
    use candle_core::{DType, Device};

    /// The kv-cached decoder must compute the same z as teacher forcing on the same tokens.
    #[test]
    fn cached_sampling_matches_teacher_forcing_in_both_orders() -> Result<()> {
        let dev = Device::Cpu;
        for order in [Order::Raster, Order::Random] {
            let cfg = GeneratorConfig {
                kind: GeneratorKind::Ar,
                order,
                seq_len: 5,
                token_dim: 3,
                width: 8,
                depth: 2,
                decoder_width: 8,
                decoder_depth: 1,
                heads: 2,
                decoder_heads: 2,
                mlp_ratio: 2.0,
                num_classes: 2,
                buffer_size: 1,
                label_drop: 0.0,
                attn_dropout: 0.0,
                proj_dropout: 0.0,
                head: HeadConfig::CrossEntropy { vocab: 7 },
                precision: Default::default(),
            };
            let vm = candle_nn::VarMap::new();
            let ar = Ar::new(
                &cfg,
                crate::init::seeded_var_builder(&vm, 4, DType::F32, &dev),
            )?;
            for v in vm.all_vars() {
                v.set(&(v.randn_like(0.0, 0.3)?))?;
            }
            let orders = vec![vec![3, 0, 4, 1, 2]];
            let codes = Tensor::new(&[[1u32, 5, 2, 6, 3]], &dev)?;
            let tokens = Tokens::Discrete(codes);
            let cls = ar.class.sample(&[1], false, &dev)?;
            let ordered = if order == Order::Random {
                permute_tokens(&tokens, &orders)?
            } else {
                tokens.clone()
            };
            let used = if order == Order::Random {
                orders.clone()
            } else {
                vec![(0..5).collect()]
            };
            let full = ar.forward(
                &ordered,
                &cls,
                (order == Order::Random).then_some(orders.as_slice()),
                None,
            )?;
            // incremental: class first, then each ordered token with its positions
            let mut caches = vec![KvCache::default(); ar.blocks.len()];
            let x0 = (cls.reshape((1, 1, 8))?
                + ar.position_rows(&ar.pos_embed_learned, &used, 0, false)?)?;
            let mut outs = vec![ar.step(&x0, &mut caches)?];
            let seq = ordered.tensor().to_vec2::<u32>()?[0].clone();
            for (i, &code) in seq.iter().take(4).enumerate() {
                let t = Tokens::Discrete(Tensor::new(&[[code]], &dev)?);
                let mut x = (ar.embed.forward(&t)?
                    + ar.position_rows(&ar.pos_embed_learned, &used, i + 1, false)?)?;
                if let Some(ip) = &ar.input_pos_embed_learned {
                    x = (x + ar.position_rows(ip, &used, i, false)?)?;
                }
                outs.push(ar.step(&x, &mut caches)?);
            }
            let inc = Tensor::cat(&outs, 1)?;
            let diff = (full - inc)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{order:?}: {diff}");
        }
        Ok(())
    }
}
