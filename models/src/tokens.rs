//! Token sequences as the generators see them: discrete codebook indices (the cross-entropy arm)
//! or continuous vectors (the Diffusion Loss arm), and the input embedding of each kind.
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};

use crate::nn::{linear_xavier, Linear, Precision};

/// A batch of token sequences: `Discrete` is (B, L) u32 codes, `Continuous` is (B, L, C) f32.
/// Flattened rows (N) and (N, C) use the same type.
#[derive(Debug, Clone)]
pub enum Tokens {
    Discrete(Tensor),
    Continuous(Tensor),
}

impl Tokens {
    pub fn tensor(&self) -> &Tensor {
        match self {
            Tokens::Discrete(t) | Tokens::Continuous(t) => t,
        }
    }

    /// Collapse (B, L[, C]) to rows (B·L[, C]).
    pub fn flatten_rows(&self) -> Result<Tokens> {
        Ok(match self {
            Tokens::Discrete(t) => Tokens::Discrete(t.flatten_all()?),
            Tokens::Continuous(t) => {
                let c = t.dim(candle_core::D::Minus1)?;
                Tokens::Continuous(t.reshape(((), c))?)
            }
        })
    }
}

/// How tokens enter the transformer: an embedding table for codes, a linear projection
/// (the reference's `z_proj`) for continuous tokens.
#[derive(Debug, Clone)]
pub enum TokenEmbed {
    Discrete(Embedding),
    Continuous(Linear),
}

impl TokenEmbed {
    pub fn discrete(vocab: usize, width: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints(
            (vocab, width),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        Ok(TokenEmbed::Discrete(Embedding::new(w, width)))
    }

    pub fn continuous(
        token_dim: usize,
        width: usize,
        precision: Precision,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(TokenEmbed::Continuous(
            linear_xavier(token_dim, width, vb)?.with_precision(precision),
        ))
    }

    pub fn forward(&self, tokens: &Tokens) -> crate::Result<Tensor> {
        match (self, tokens) {
            (TokenEmbed::Discrete(e), Tokens::Discrete(t)) => Ok(e.forward(t)?),
            (TokenEmbed::Continuous(l), Tokens::Continuous(t)) => Ok(l.forward(t)?),
            _ => Err(crate::Error::Input(
                "token kind does not match the model's head (codes for cross-entropy, vectors for diffusion)".into(),
            )),
        }
    }
}
