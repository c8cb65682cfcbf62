//! The class condition: an embedding per class and the learned "fake" class that stands for
//! dropped labels in training and for the unconditional branch of classifier-free guidance.
use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};

use crate::rng::Rng;
use crate::shard::Shard;

/// The class embedding and the learned "fake" class used for label drop and as CFG's
/// unconditional branch (reference names `class_emb`, `fake_latent`).
#[derive(Debug, Clone)]
pub struct ClassEmbed {
    class_emb: Embedding,
    fake_latent: Tensor,
}

impl ClassEmbed {
    pub fn new(num_classes: usize, width: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let w = vb.get_with_hints((num_classes, width), "class_emb.weight", init)?;
        let fake_latent = vb.get_with_hints((1, width), "fake_latent", init)?;
        Ok(ClassEmbed {
            class_emb: Embedding::new(w, width),
            fake_latent,
        })
    }

    fn labels_tensor(labels: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(labels, labels.len(), device)
    }

    /// (B, W) class embeddings of rows `shard` of the batch (`labels` holds theirs); each
    /// replaced by the fake class with probability `drop`, drawn for the whole batch.
    pub fn train(
        &self,
        labels: &[u32],
        drop: f64,
        rng: &mut Rng,
        device: &Device,
        shard: Shard,
    ) -> candle_core::Result<Tensor> {
        let emb = self
            .class_emb
            .forward(&Self::labels_tensor(labels, device)?)?;
        if drop <= 0.0 {
            return Ok(emb);
        }
        let dropped: Vec<u8> = (0..shard.total)
            .map(|_| u8::from(rng.uniform() < drop))
            .collect();
        let dropped = shard.take(&dropped, 1);
        let mask =
            Tensor::from_vec(dropped, (labels.len(), 1), device)?.broadcast_as(emb.shape())?;
        mask.where_cond(&self.fake_latent.broadcast_as(emb.shape())?, &emb)
    }

    /// Conditional rows, followed by as many unconditional rows when guiding.
    pub fn sample(
        &self,
        labels: &[u32],
        guided: bool,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let emb = self
            .class_emb
            .forward(&Self::labels_tensor(labels, device)?)?;
        if !guided {
            return Ok(emb);
        }
        let fake = self.fake_latent.broadcast_as(emb.shape())?;
        Tensor::cat(&[&emb, &fake], 0)
    }
}
