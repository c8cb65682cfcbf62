//! Sampling's shared pieces: the options (MAR steps, guidance scale and its schedule,
//! temperature), the tokens the guidance schedule counts as known, and the host-side token
//! buffer both generators fill in.
use candle_core::{Device, Tensor};

use crate::head::Head;
use crate::tokens::Tokens;
use crate::Result;

/// How classifier-free guidance grows over sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgSchedule {
    /// 1 + (s − 1) · (share of tokens already generated) (MAR)
    Linear,
    Constant,
}

#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// MAR's number of sampling iterations (AR always takes one token per step)
    pub num_iter: usize,
    pub cfg: f64,
    pub cfg_schedule: CfgSchedule,
    pub temperature: f64,
}

impl SampleOptions {
    /// The guidance scale of a step after which `generated` of `total` tokens count as known
    /// (MAR: the reference's `seq_len − mask_len`, where mask_len, the tokens still masked after
    /// the step, is at least 1 even at the last step; AR uses the same count, see
    /// [`ar_tokens_known_after`]).
    pub fn cfg_at(&self, generated: usize, total: usize) -> f64 {
        match self.cfg_schedule {
            CfgSchedule::Linear => 1.0 + (self.cfg - 1.0) * generated as f64 / total as f64,
            CfgSchedule::Constant => self.cfg,
        }
    }
}

/// The tokens the linear guidance schedule counts as known after causal AR's step `i` (0-based)
/// of `total`. The choice: count them after the step, as MAR does, with MAR's floor of one token
/// still masked, i.e. min(i + 1, total − 1). So AR and MAR with one token per step (MAR with
/// `mar_steps` = sequence length) use the same scale at every step: 1 + (s−1)·k/L for
/// k = 1, 2, …, L−1, L−1. (Counting the tokens known before the step would give AR's first token
/// no guidance at all.)
pub fn ar_tokens_known_after(i: usize, total: usize) -> usize {
    (i + 1).min(total.saturating_sub(1))
}

/// Host-side token buffer filled in during sampling.
pub(crate) enum SampleState {
    Discrete(Vec<u32>),
    Continuous(Vec<f32>, usize),
}

impl SampleState {
    pub(crate) fn new(head: &Head, b: usize, l: usize) -> Self {
        match head {
            Head::CrossEntropy(_) => SampleState::Discrete(vec![0; b * l]),
            Head::Diffusion { diffloss, .. } => {
                SampleState::Continuous(vec![0.0; b * l * diffloss.token_dim], diffloss.token_dim)
            }
        }
    }

    /// The current tokens, repeated to `rows` rows (the unconditional copy when guiding).
    pub(crate) fn tokens(&self, rows: usize, l: usize, dev: &Device) -> Result<Tokens> {
        Ok(match self {
            SampleState::Discrete(v) => {
                let reps = rows * l / v.len();
                Tokens::Discrete(Tensor::from_vec(v.repeat(reps), (rows, l), dev)?)
            }
            SampleState::Continuous(v, c) => {
                let reps = rows * l * c / v.len();
                Tokens::Continuous(Tensor::from_vec(v.repeat(reps), (rows, l, *c), dev)?)
            }
        })
    }

    /// Write sampled tokens at flat positions `at` (b·L + p).
    pub(crate) fn write(&mut self, at: &[usize], sampled: &Tokens) -> Result<()> {
        match (self, sampled) {
            (SampleState::Discrete(v), Tokens::Discrete(t)) => {
                for (&i, c) in at.iter().zip(t.to_vec1::<u32>()?) {
                    v[i] = c;
                }
            }
            (SampleState::Continuous(v, c), Tokens::Continuous(t)) => {
                for (&i, row) in at.iter().zip(t.to_vec2::<f32>()?) {
                    v[i * *c..(i + 1) * *c].copy_from_slice(&row);
                }
            }
            _ => {
                return Err(crate::Error::Input(
                    "sampled token kind does not match".into(),
                ))
            }
        }
        Ok(())
    }
}
