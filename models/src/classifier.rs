//! The small CNN the harness trains on a data set without a standard feature net; its penultimate
//! activations are the features for FID and its logits give the Inception Score.
use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use crate::nn::{linear_xavier, Linear};

#[derive(Debug, Clone)]
pub struct Classifier {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    fc: Linear,
    out: Linear,
    pub feature_dim: usize,
    pub num_classes: usize,
}

impl Classifier {
    /// Three 3×3 conv layers (the last two stride 2), global average pool, a `feature_dim` layer.
    pub fn new(
        channels: usize,
        num_classes: usize,
        feature_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let pad2 = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Ok(Classifier {
            conv1: conv2d(channels, 32, 3, pad, vb.pp("conv1"))?,
            conv2: conv2d(32, 64, 3, pad2, vb.pp("conv2"))?,
            conv3: conv2d(64, 128, 3, pad2, vb.pp("conv3"))?,
            fc: linear_xavier(128, feature_dim, vb.pp("fc"))?,
            out: linear_xavier(feature_dim, num_classes, vb.pp("out"))?,
            feature_dim,
            num_classes,
        })
    }

    /// Images (B, C, H, W) in [0, 1] → (features (B, feature_dim), logits (B, classes)).
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = ((images * 2.0)? - 1.0)?;
        let x = self.conv1.forward(&x)?.relu()?;
        let x = self.conv2.forward(&x)?.relu()?;
        let x = self.conv3.forward(&x)?.relu()?;
        let x = x.mean((2, 3))?;
        let features = self.fc.forward(&x)?.relu()?;
        let logits = self.out.forward(&features)?;
        Ok((features, logits))
    }
}
