//! The configuration of a generator: which kind (causal AR or MAR), its sizes, and its head
//! (cross-entropy over a codebook, or Diffusion Loss), with the constructors of the parts that
//! depend on the head.
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use crate::diffloss::DiffLossConfig;
use crate::diffusion::Schedule;
use crate::head::Head;
use crate::nn::Precision;
use crate::rng::Rng;
use crate::tokens::{TokenEmbed, Tokens};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeneratorKind {
    /// GPT-style, raster order, causal attention
    Ar,
    /// masked autoregressive: random order, bidirectional attention, several tokens per step
    Mar,
}

/// The order in which a causal AR model generates tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// left to right, top to bottom
    Raster,
    /// a fresh random permutation per image; the next token's position is given to the model
    Random,
}

#[derive(Debug, Clone)]
pub enum HeadConfig {
    CrossEntropy {
        vocab: usize,
    },
    Diffusion {
        width: usize,
        depth: usize,
        batch_mul: usize,
        train_steps: usize,
        sampling_steps: usize,
        schedule: Schedule,
        learn_sigma: bool,
        clip_denoised: bool,
    },
}

#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub kind: GeneratorKind,
    /// generation order of the causal AR model (MAR is always random)
    pub order: Order,
    pub seq_len: usize,
    /// dimension of a continuous token (ignored by the cross-entropy head)
    pub token_dim: usize,
    pub width: usize,
    pub depth: usize,
    /// MAR's decoder (ignored for AR)
    pub decoder_width: usize,
    pub decoder_depth: usize,
    pub heads: usize,
    /// MAR's decoder heads (the reference's `decoder_num_heads`; ignored for AR)
    pub decoder_heads: usize,
    pub mlp_ratio: f64,
    pub num_classes: usize,
    /// MAR's buffer of class-embedding slots
    pub buffer_size: usize,
    /// probability of replacing the class with the "fake" class in training (CFG)
    pub label_drop: f64,
    /// dropout of the transformer blocks in training, as timm's `Block` (reference default 0.1):
    /// on the attention probabilities, and on the outputs of the attention projection and of
    /// both MLP layers
    pub attn_dropout: f64,
    pub proj_dropout: f64,
    pub head: HeadConfig,
    /// arithmetic of the linear layers and attention products (weights stay f32)
    pub precision: Precision,
}

impl GeneratorConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.seq_len == 0 || self.width == 0 || self.heads == 0 || self.num_classes == 0 {
            return bad("seq_len, width, heads and num_classes must be positive".into());
        }
        if !self.width.is_multiple_of(self.heads) {
            return bad(format!(
                "width {} is not divisible by heads {}",
                self.width, self.heads
            ));
        }
        if self.kind == GeneratorKind::Mar
            && (self.decoder_heads == 0 || !self.decoder_width.is_multiple_of(self.decoder_heads))
        {
            return bad(format!(
                "decoder width {} is not divisible by decoder heads {}",
                self.decoder_width, self.decoder_heads
            ));
        }
        for (name, p) in [
            ("attn_dropout", self.attn_dropout),
            ("proj_dropout", self.proj_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        if !(0.0..1.0).contains(&self.label_drop) {
            return bad(format!(
                "label_drop must be in [0, 1), found {}",
                self.label_drop
            ));
        }
        Ok(())
    }

    /// `batch` random token sequences of the kind this configuration's head takes: uniform codes
    /// (cross-entropy) or standard normal tokens (Diffusion Loss); for tests and benchmarks.
    pub fn random_tokens(
        &self,
        batch: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> candle_core::Result<Tokens> {
        Ok(match self.head {
            HeadConfig::CrossEntropy { vocab } => {
                let codes: Vec<u32> = (0..batch * self.seq_len)
                    .map(|_| rng.below(vocab) as u32)
                    .collect();
                Tokens::Discrete(Tensor::from_vec(codes, (batch, self.seq_len), device)?)
            }
            HeadConfig::Diffusion { .. } => Tokens::Continuous(
                rng.normal_tensor(&[batch, self.seq_len, self.token_dim], device)?,
            ),
        })
    }

    /// Width of the per-token condition z handed to the head.
    pub fn z_dim(&self) -> usize {
        match self.kind {
            GeneratorKind::Ar => self.width,
            GeneratorKind::Mar => self.decoder_width,
        }
    }

    pub(crate) fn token_embed(
        &self,
        width: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<TokenEmbed> {
        match self.head {
            HeadConfig::CrossEntropy { vocab } => {
                TokenEmbed::discrete(vocab, width, vb.pp("tok_embed"))
            }
            HeadConfig::Diffusion { .. } => {
                TokenEmbed::continuous(self.token_dim, width, self.precision, vb.pp("z_proj"))
            }
        }
    }

    pub(crate) fn build_head(&self, vb: VarBuilder) -> Result<Head> {
        match &self.head {
            HeadConfig::CrossEntropy { vocab } => {
                Head::cross_entropy(self.z_dim(), *vocab, self.precision, vb)
            }
            HeadConfig::Diffusion {
                width,
                depth,
                batch_mul,
                train_steps,
                sampling_steps,
                schedule,
                learn_sigma,
                clip_denoised,
            } => Head::diffusion(
                &DiffLossConfig {
                    token_dim: self.token_dim,
                    z_dim: self.z_dim(),
                    width: *width,
                    depth: *depth,
                    train_steps: *train_steps,
                    sampling_steps: *sampling_steps,
                    schedule: *schedule,
                    learn_sigma: *learn_sigma,
                    clip_denoised: *clip_denoised,
                    precision: self.precision,
                },
                *batch_mul,
                vb,
            ),
        }
    }
}
