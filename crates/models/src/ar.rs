//! Causal autoregressive generator (GPT-style, raster order): the class embedding is the first
//! position, position i predicts token i from the tokens before it, and sampling decodes one
//! token per step with a kv-cache.
use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::generator::{ClassEmbed, GeneratorConfig, SampleOptions};
use crate::head::Head;
use crate::mar::SampleState;
use crate::nn::{causal_mask, Block, KvCache, LayerNorm};
use crate::rng::Rng;
use crate::tokens::{TokenEmbed, Tokens};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Ar {
    embed: TokenEmbed,
    class: ClassEmbed,
    pos_embed_learned: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Head,
    seq_len: usize,
    width: usize,
    label_drop: f64,
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
            blocks: (0..cfg.depth)
                .map(|i| Block::new(w, cfg.heads, cfg.mlp_ratio, vb.pp(format!("blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            norm: LayerNorm::new(w, 1e-6, true, vb.pp("norm"))?,
            head: cfg.build_head(vb)?,
            seq_len: cfg.seq_len,
            width: w,
            label_drop: cfg.label_drop,
        })
    }

    /// Teacher forcing: inputs [class, x_0 … x_{L−2}], outputs z_0 … z_{L−1}.
    pub fn forward(&self, tokens: &Tokens, class_embedding: &Tensor) -> Result<Tensor> {
        let x = self.embed.forward(tokens)?;
        let (b, l, w) = x.dims3()?;
        let inputs = Tensor::cat(
            &[
                &class_embedding.reshape((b, 1, w))?,
                &x.narrow(1, 0, l - 1)?,
            ],
            1,
        )?;
        let mut h = inputs.broadcast_add(&self.pos_embed_learned)?;
        let mask = causal_mask(l, l, h.device())?;
        for block in &self.blocks {
            h = block.forward(&h, Some(&mask))?;
        }
        Ok(self.norm.forward(&h)?)
    }

    pub fn loss(&self, tokens: &Tokens, labels: &[u32], rng: &mut Rng) -> Result<Tensor> {
        let dev = tokens.tensor().device().clone();
        let b = labels.len();
        let class_embedding = self.class.train(labels, self.label_drop, rng, &dev)?;
        let z = self
            .forward(tokens, &class_embedding)?
            .reshape((b * self.seq_len, self.width))?;
        self.head.loss(&z, &tokens.flatten_rows()?, None, rng)
    }

    /// Run new positions through the blocks with the cache; returns the normalised outputs.
    fn step(&self, x: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        let mut h = x.clone();
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            h = block.forward_cached(&h, cache)?;
        }
        Ok(self.norm.forward(&h)?)
    }

    /// Raster-order sampling, one token per step, kv-cached; CFG linear in the tokens generated.
    pub fn sample(&self, labels: &[u32], opts: &SampleOptions, rng: &mut Rng) -> Result<Tokens> {
        let dev = self.pos_embed_learned.device().clone();
        let b = labels.len();
        let l = self.seq_len;
        let guided = opts.cfg != 1.0;
        let rows = if guided { 2 * b } else { b };
        let mut caches = vec![KvCache::default(); self.blocks.len()];
        let mut state = SampleState::new(&self.head, b, l);
        let cls = self
            .class
            .sample(labels, guided, &dev)?
            .reshape((rows, 1, self.width))?;
        let mut z = self.step(
            &cls.broadcast_add(&self.pos_embed_learned.narrow(1, 0, 1)?)?,
            &mut caches,
        )?;
        for i in 0..l {
            let zi = z.reshape((rows, self.width))?;
            let token = self
                .head
                .sample(&zi, opts.temperature, guided, opts.cfg_at(i, l), rng)?;
            let at: Vec<usize> = (0..b).map(|bi| bi * l + i).collect();
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
                let x = x.broadcast_add(&self.pos_embed_learned.narrow(1, i + 1, 1)?)?;
                z = self.step(&x, &mut caches)?;
            }
        }
        state.tokens(b, l, &dev)
    }
}
