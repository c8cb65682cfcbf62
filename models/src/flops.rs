//! Model FLOPs of a training step, counted from the configuration the way MFU is: matrix
//! products only, 2 FLOPs per multiply-add, backward twice the forward (PaLM, appendix B).
use crate::config::{GeneratorConfig, GeneratorKind, HeadConfig};

/// Mean of MAR's training mask ratio, N(1, 0.25²) truncated to [0.7, 1] (see `mar::sample_mask_ratio`).
const MEAN_MASK_RATIO: f64 = 0.867;

/// Forward FLOPs of one pre-norm transformer block over `n` tokens of width `c`: qkv and output
/// projections (4c²), the MLP (2·c·hidden), and the attention products (2·n·c each).
fn block(n: f64, c: f64, mlp_ratio: f64) -> f64 {
    2.0 * n * (4.0 * c * c + 2.0 * c * c * mlp_ratio) + 4.0 * n * n * c
}

impl GeneratorConfig {
    /// Forward FLOPs for one image of a training step (the expected mask ratio for MAR).
    pub fn forward_flops_per_image(&self) -> f64 {
        let l = self.seq_len as f64;
        let (c, cd) = (self.width as f64, self.decoder_width as f64);
        let continuous = matches!(self.head, HeadConfig::Diffusion { .. });
        // the token embedding is a product for continuous tokens, a lookup for codes
        let embed = |width: f64| {
            if continuous {
                2.0 * l * self.token_dim as f64 * width
            } else {
                0.0
            }
        };
        let (backbone, z_width) = match self.kind {
            GeneratorKind::Mar => {
                let buffer = self.buffer_size as f64;
                let encoded = buffer + (l * (1.0 - MEAN_MASK_RATIO)).round();
                let decoded = buffer + l;
                let flops = embed(c)
                    + self.depth as f64 * block(encoded, c, self.mlp_ratio)
                    + 2.0 * encoded * c * cd
                    + self.decoder_depth as f64 * block(decoded, cd, self.mlp_ratio);
                (flops, cd)
            }
            GeneratorKind::Ar => (
                embed(c) + self.depth as f64 * block(l, c, self.mlp_ratio),
                c,
            ),
        };
        let head = match &self.head {
            HeadConfig::CrossEntropy { vocab } => 2.0 * l * z_width * *vocab as f64,
            HeadConfig::Diffusion {
                width,
                depth,
                batch_mul,
                learn_sigma,
                ..
            } => {
                let w = *width as f64;
                let d = self.token_dim as f64;
                let out = if *learn_sigma { 2.0 * d } else { d };
                // per row: input and condition projections, the timestep MLP (256 → w → w),
                // each residual block's adaLN (w → 3w) and MLP (2w²), the final adaLN (w → 2w)
                // and output layer
                let per_row = d * w
                    + z_width * w
                    + 256.0 * w
                    + w * w
                    + *depth as f64 * 5.0 * w * w
                    + 2.0 * w * w
                    + w * out;
                2.0 * per_row * l * *batch_mul as f64
            }
        };
        backbone + head
    }

    /// Model FLOPs of one training step on `batch` images: forward + backward (2× forward).
    pub fn train_flops_per_step(&self, batch: usize) -> f64 {
        3.0 * self.forward_flops_per_image() * batch as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Order;
    use crate::diffusion::Schedule;
    use crate::Precision;

    #[test]
    fn counts_a_small_ar_by_hand() {
        let cfg = GeneratorConfig {
            kind: GeneratorKind::Ar,
            order: Order::Raster,
            seq_len: 4,
            token_dim: 2,
            width: 8,
            depth: 1,
            decoder_width: 8,
            decoder_depth: 0,
            heads: 2,
            decoder_heads: 2,
            mlp_ratio: 4.0,
            num_classes: 10,
            buffer_size: 0,
            label_drop: 0.0,
            attn_dropout: 0.0,
            proj_dropout: 0.0,
            head: HeadConfig::CrossEntropy { vocab: 16 },
            precision: Precision::F32,
        };
        // block: 2·4·(4·64 + 2·64·4) + 4·16·8 = 6656; head 2·4·8·16 = 1024; codes are looked up
        assert_eq!(cfg.forward_flops_per_image(), 6656.0 + 1024.0);
        assert_eq!(cfg.train_flops_per_step(2), 3.0 * 2.0 * 7680.0);
        let diffusion = GeneratorConfig {
            head: HeadConfig::Diffusion {
                width: 4,
                depth: 1,
                batch_mul: 1,
                train_steps: 1000,
                sampling_steps: 100,
                schedule: Schedule::Cosine,
                learn_sigma: false,
                clip_denoised: false,
            },
            ..cfg
        };
        // embedding 2·4·2·8 = 128; per row 2·4 + 8·4 + 256·4 + 16 + 5·16 + 2·16 + 4·2 = 1200
        assert_eq!(
            diffusion.forward_flops_per_image(),
            128.0 + 6656.0 + 2.0 * 1200.0 * 4.0
        );
    }
}
