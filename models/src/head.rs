//! The two heads compared by the paper: a softmax over a VQ codebook trained with cross-entropy,
//! and Diffusion Loss on continuous tokens. Both map the transformer's per-token output z to a
//! loss (training) or a token (sampling).
use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::diffloss::{shard_mean, DiffLoss, DiffLossConfig};
use crate::nn::{linear_xavier, Linear, Precision};
use crate::rng::Rng;
use crate::shard::TokenRows;
use crate::tokens::Tokens;
use crate::Result;

#[derive(Debug, Clone)]
pub enum Head {
    /// logits over the codebook
    CrossEntropy(Linear),
    /// Diffusion Loss, with each token's z reused for `batch_mul` noise draws
    Diffusion {
        diffloss: Box<DiffLoss>,
        batch_mul: usize,
    },
}

impl Head {
    /// Logits from a linear layer in `precision`; log-softmax and the loss are f32.
    pub fn cross_entropy(
        z_dim: usize,
        vocab: usize,
        precision: Precision,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Head::CrossEntropy(
            linear_xavier(z_dim, vocab, vb.pp("head"))?.with_precision(precision),
        ))
    }

    pub fn diffusion(cfg: &DiffLossConfig, batch_mul: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Head::Diffusion {
            diffloss: Box::new(DiffLoss::new(cfg, vb.pp("diffloss"))?),
            batch_mul: batch_mul.max(1),
        })
    }

    /// Loss over rows: `z` is (N, Dz), `target` N codes or (N, C) vectors, `mask` (N) of 0/1.
    /// The mean loss over the token rows `rows` (whose outputs are `z`, targets `target`, and
    /// mask `mask`, 1 where a token counts).
    pub fn loss(
        &self,
        z: &Tensor,
        target: &Tokens,
        mask: Option<&Tensor>,
        rows: TokenRows,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        match (self, target) {
            (Head::CrossEntropy(head), Tokens::Discrete(codes)) => {
                let logp = candle_nn::ops::log_softmax(&head.forward(z)?, D::Minus1)?;
                let nll = logp.gather(&codes.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
                Ok(shard_mean(&nll, mask, rows)?)
            }
            (
                Head::Diffusion {
                    diffloss,
                    batch_mul,
                },
                Tokens::Continuous(x),
            ) => {
                let m = *batch_mul;
                let x = x.repeat((m, 1))?;
                let z = z.repeat((m, 1))?;
                let mask = mask.map(|mk| mk.repeat(m)).transpose()?;
                Ok(diffloss.loss_rows(&x, &z, mask.as_ref(), rows, m, rng)?)
            }
            _ => Err(crate::Error::Input(
                "token kind does not match the head".into(),
            )),
        }
    }

    /// Sample one token per conditional row. When `guided`, `z` is (2N, Dz): N conditional rows
    /// then N unconditional rows, combined with scale `cfg`; N tokens come back.
    pub fn sample(
        &self,
        z: &Tensor,
        temperature: f64,
        guided: bool,
        cfg: f64,
        rng: &mut Rng,
    ) -> Result<Tokens> {
        let rows = z.dim(0)?;
        let n = if guided { rows / 2 } else { rows };
        match self {
            Head::CrossEntropy(head) => {
                let logits = head.forward(z)?;
                let logits = if guided {
                    let c = logits.narrow(0, 0, n)?;
                    let u = logits.narrow(0, n, n)?;
                    // classifier-free guidance on logits: u + s(c − u)
                    (&u + ((&c - &u)? * cfg)?)?
                } else {
                    logits
                };
                let probs = candle_nn::ops::softmax(&(logits / temperature.max(1e-6))?, D::Minus1)?;
                let probs = probs.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
                let codes: Vec<u32> = probs.iter().map(|p| rng.categorical(p) as u32).collect();
                Ok(Tokens::Discrete(Tensor::from_vec(codes, n, z.device())?))
            }
            Head::Diffusion { diffloss, .. } => {
                let x = diffloss.sample(z, temperature, cfg, rng)?;
                Ok(Tokens::Continuous(x.narrow(0, 0, n)?))
            }
        }
    }
}
