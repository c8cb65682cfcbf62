//! Stage-1 tokenizers: one convolutional autoencoder (VQGAN / LDM layout: residual blocks with
//! GroupNorm + SiLU, stride-2 downsampling, nearest-neighbour upsampling) with two bottlenecks, so
//! the only difference between the arms is quantization:
//! - `Vq`: a codebook, nearest-code lookup, straight-through gradient, codebook + commitment loss
//!   (van den Oord et al. 2017, "Neural Discrete Representation Learning");
//! - `Kl`: a diagonal Gaussian posterior with a small KL weight (Rombach et al. 2022, LDM).
//!
//! Trained with a pixel MSE only: the perceptual (LPIPS) and adversarial losses of VQGAN/LDM need
//! pretrained networks that this tool does not ship.
use candle_core::{DType, Module, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

use crate::{Error, Result, Rng};

/// Which bottleneck sits between encoder and decoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bottleneck {
    /// `codebook` codes of dimension `latent_dim`; commitment weight `beta` (0.25 in VQ-VAE)
    Vq { codebook: usize, beta: f64 },
    /// diagonal Gaussian posterior; loss = MSE + `kl_weight` · mean KL per latent value
    Kl { kl_weight: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoencoderConfig {
    /// image channels (1 for MNIST, 3 for RGB)
    pub in_channels: usize,
    /// channels of the first level; deeper levels use twice as many
    pub width: usize,
    /// spatial downsampling factor, a power of two (4 or 8 in the spec)
    pub downsample: usize,
    /// channels of a latent position: the token dimension (KL) or the code dimension (VQ)
    pub latent_dim: usize,
    pub bottleneck: Bottleneck,
}

impl AutoencoderConfig {
    fn levels(&self) -> usize {
        self.downsample.trailing_zeros() as usize
    }

    /// Channels at level `i` (0 = full resolution): width, then 2·width.
    fn channels(&self, i: usize) -> usize {
        if i == 0 {
            self.width
        } else {
            2 * self.width
        }
    }

    fn validate(&self) -> Result<()> {
        if !self.downsample.is_power_of_two() || self.downsample < 2 {
            return Err(Error::Config(format!(
                "autoencoder downsample must be a power of two ≥ 2, found {}",
                self.downsample
            )));
        }
        if self.width == 0 || self.latent_dim == 0 || self.in_channels == 0 {
            return Err(Error::Config("autoencoder sizes must be positive".into()));
        }
        if let Bottleneck::Vq { codebook, .. } = self.bottleneck {
            if codebook < 2 {
                return Err(Error::Config(format!(
                    "VQ codebook needs at least 2 codes, found {codebook}"
                )));
            }
        }
        Ok(())
    }
}

fn conv3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

fn conv1(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(cin, cout, 1, Conv2dConfig::default(), vb)
}

/// GroupNorm with up to 8 groups (the largest of 8, 4, 2, 1 dividing the channels).
fn norm(ch: usize, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    let groups = [8, 4, 2, 1]
        .into_iter()
        .find(|g| ch.is_multiple_of(*g))
        .unwrap_or(1);
    group_norm(groups, ch, 1e-6, vb)
}

/// x + conv(silu(norm(conv(silu(norm(x)))))), with a 1×1 shortcut when channels change.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(ResBlock {
            norm1: norm(cin, vb.pp("norm1"))?,
            conv1: conv3(cin, cout, 1, vb.pp("conv1"))?,
            norm2: norm(cout, vb.pp("norm2"))?,
            conv2: conv3(cout, cout, 1, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(conv1(cin, cout, vb.pp("nin_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    /// per level: a residual block, then a stride-2 convolution
    down: Vec<(ResBlock, Conv2d)>,
    mid: ResBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &AutoencoderConfig, out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let mut down = Vec::new();
        let mut ch = cfg.width;
        for i in 0..cfg.levels() {
            let next = cfg.channels(i);
            let vbi = vb.pp(format!("down.{i}"));
            down.push((
                ResBlock::new(ch, next, vbi.pp("block"))?,
                conv3(next, next, 2, vbi.pp("downsample"))?,
            ));
            ch = next;
        }
        Ok(Encoder {
            conv_in: conv3(cfg.in_channels, cfg.width, 1, vb.pp("conv_in"))?,
            down,
            mid: ResBlock::new(ch, ch, vb.pp("mid"))?,
            norm_out: norm(ch, vb.pp("norm_out"))?,
            conv_out: conv3(ch, out, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (block, downsample) in &self.down {
            h = downsample.forward(&block.forward(&h)?)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// Nearest-neighbour ×2 upsampling as a broadcast: its backward is a plain sum, faster on CPU
/// than candle's `upsample_nearest2d` backward (a grouped convolution).
fn upsample2x(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: ResBlock,
    /// per level, coarse to fine: ×2 nearest upsampling, a convolution, a residual block
    up: Vec<(Conv2d, ResBlock)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let levels = cfg.levels();
        let mut ch = cfg.channels(levels - 1);
        let mut up = Vec::new();
        for i in (0..levels).rev() {
            let next = cfg.channels(i);
            let vbi = vb.pp(format!("up.{i}"));
            up.push((
                conv3(ch, ch, 1, vbi.pp("upsample"))?,
                ResBlock::new(ch, next, vbi.pp("block"))?,
            ));
            ch = next;
        }
        let top = cfg.channels(levels - 1);
        Ok(Decoder {
            conv_in: conv3(cfg.latent_dim, top, 1, vb.pp("conv_in"))?,
            mid: ResBlock::new(top, top, vb.pp("mid"))?,
            up,
            norm_out: norm(ch, vb.pp("norm_out"))?,
            conv_out: conv3(ch, cfg.in_channels, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (upsample, block) in &self.up {
            h = block.forward(&upsample.forward(&upsample2x(&h)?)?)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// The losses of one training step.
pub struct AeLosses {
    /// reconstruction + regulariser, the quantity to minimise
    pub loss: Tensor,
    /// pixel MSE on the [-1, 1] scale
    pub recon: Tensor,
    /// VQ: codebook + β·commitment; KL: mean KL per latent value (unweighted)
    pub reg: Tensor,
    /// VQ: the code chosen at each latent position, (B·h·w,)
    pub codes: Option<Tensor>,
    /// VQ: the encoder outputs (B·h·w, latent_dim), detached (candidates for dead-code restarts)
    pub latents: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Autoencoder {
    encoder: Encoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    /// VQ codebook, (codebook, latent_dim)
    codebook: Option<Tensor>,
    pub config: AutoencoderConfig,
}

impl Autoencoder {
    pub fn new(config: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let top = config.channels(config.levels() - 1);
        let moments = match config.bottleneck {
            Bottleneck::Vq { .. } => config.latent_dim,
            Bottleneck::Kl { .. } => 2 * config.latent_dim,
        };
        let codebook = match config.bottleneck {
            Bottleneck::Vq { codebook, .. } => {
                let bound = 1.0 / codebook as f64;
                // uniform(-1/K, 1/K), as in VQ-VAE / taming-transformers
                Some(vb.get_with_hints(
                    (codebook, config.latent_dim),
                    "quantize.embedding.weight",
                    candle_nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )?)
            }
            Bottleneck::Kl { .. } => None,
        };
        Ok(Autoencoder {
            encoder: Encoder::new(config, top, vb.pp("encoder"))?,
            quant_conv: conv1(top, moments, vb.pp("quant_conv"))?,
            post_quant_conv: conv1(
                config.latent_dim,
                config.latent_dim,
                vb.pp("post_quant_conv"),
            )?,
            decoder: Decoder::new(config, vb.pp("decoder"))?,
            codebook,
            config: *config,
        })
    }

    /// Side of the latent grid for images of side `size`.
    pub fn latent_side(&self, size: usize) -> usize {
        size / self.config.downsample
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.config.in_channels || h != w || !h.is_multiple_of(self.config.downsample) {
            return Err(Error::Input(format!(
                "autoencoder expects (B, {}, S, S) with S a multiple of {}, got {:?}",
                self.config.in_channels,
                self.config.downsample,
                x.dims()
            )));
        }
        Ok(())
    }

    /// Nearest code per row of `z` (N, D): indices (N,) as u32.
    fn nearest(&self, codebook: &Tensor, z: &Tensor) -> candle_core::Result<Tensor> {
        // ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖²; ‖z‖² is constant per row
        let e2 = codebook.sqr()?.sum(1)?.unsqueeze(0)?;
        let d = e2.broadcast_sub(&(z.matmul(&codebook.t()?)? * 2.0)?)?;
        d.argmin(1)
    }

    /// (B, D, h, w) → (B·h·w, D), row-major over positions.
    fn to_rows(z: &Tensor) -> candle_core::Result<Tensor> {
        let (b, d, h, w) = z.dims4()?;
        z.permute((0, 2, 3, 1))?.reshape((b * h * w, d))
    }

    /// (B·h·w, D) → (B, D, h, w).
    fn from_rows(rows: &Tensor, b: usize, side: usize) -> candle_core::Result<Tensor> {
        let d = rows.dim(1)?;
        rows.reshape((b, side, side, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// One training step's losses on images `x` (B, C, S, S) in [-1, 1].
    pub fn losses(&self, x: &Tensor, rng: &mut Rng) -> Result<AeLosses> {
        self.check_input(x)?;
        let b = x.dim(0)?;
        let moments = self.quant_conv.forward(&self.encoder.forward(x)?)?;
        let side = moments.dim(2)?;
        let (z, reg, codes, latents) = match (self.config.bottleneck, &self.codebook) {
            (Bottleneck::Vq { beta, .. }, Some(codebook)) => {
                let ze = Self::to_rows(&moments)?;
                let idx = self.nearest(codebook, &ze.detach())?;
                let zq = codebook.index_select(&idx, 0)?;
                // codebook loss moves codes to encodings; commitment keeps encodings near codes
                let codebook_loss = (zq.clone() - ze.detach())?.sqr()?.mean_all()?;
                let commitment = (ze.clone() - zq.detach())?.sqr()?.mean_all()?;
                let reg = (codebook_loss + (commitment * beta)?)?;
                // straight-through estimator: forward zq, backward into ze
                let st = (&ze + (zq - &ze)?.detach())?;
                (
                    Self::from_rows(&st, b, side)?,
                    reg,
                    Some(idx),
                    Some(ze.detach()),
                )
            }
            (Bottleneck::Kl { .. }, _) => {
                let d = self.config.latent_dim;
                let mean = moments.narrow(1, 0, d)?;
                // log-variance clamped to [-30, 20] as in LDM's DiagonalGaussianDistribution
                let logvar = moments.narrow(1, d, d)?.clamp(-30f32, 20f32)?;
                let std = (&logvar * 0.5)?.exp()?;
                let eps = rng.normal_tensor(mean.dims(), mean.device())?;
                let z = (&mean + (std * eps)?)?;
                // KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), averaged over latent values
                let kl = ((mean.sqr()? + logvar.exp()?)? - 1.0)?
                    .sub(&logvar)?
                    .mean_all()?
                    * 0.5;
                (z, kl?, None, None)
            }
            (Bottleneck::Vq { .. }, None) => {
                return Err(Error::Config("VQ autoencoder without a codebook".into()))
            }
        };
        let recon = self.decode_latents(&z)?;
        let recon_loss = (recon - x)?.sqr()?.mean_all()?;
        let weight = match self.config.bottleneck {
            Bottleneck::Vq { .. } => 1.0,
            Bottleneck::Kl { kl_weight } => kl_weight,
        };
        let loss = (&recon_loss + (&reg * weight)?)?;
        Ok(AeLosses {
            loss,
            recon: recon_loss,
            reg,
            codes,
            latents,
        })
    }

    /// VQ: the code of each latent position, (B, h·w) u32. KL: the posterior mean as tokens,
    /// (B, h·w, latent_dim) — deterministic, so cached tokens do not depend on a noise draw.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let b = x.dim(0)?;
        let moments = self.quant_conv.forward(&self.encoder.forward(x)?)?;
        let rows = Self::to_rows(&moments)?;
        let positions = rows.dim(0)? / b;
        match &self.codebook {
            Some(codebook) => Ok(self.nearest(codebook, &rows)?.reshape((b, positions))?),
            None => {
                let mean = rows.narrow(1, 0, self.config.latent_dim)?;
                Ok(mean.reshape((b, positions, self.config.latent_dim))?)
            }
        }
    }

    /// KL: the posterior's standard deviation exp(logvar/2) at each token, (B, h·w, latent_dim),
    /// beside [`Autoencoder::encode`]'s mean (for training on posterior draws); None for VQ.
    pub fn encode_std(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.codebook.is_some() {
            return Ok(None);
        }
        self.check_input(x)?;
        let b = x.dim(0)?;
        let moments = self.quant_conv.forward(&self.encoder.forward(x)?)?;
        let rows = Self::to_rows(&moments)?;
        let positions = rows.dim(0)? / b;
        let d = self.config.latent_dim;
        // the same clamp as the training pass (LDM's DiagonalGaussianDistribution)
        let logvar = rows.narrow(1, d, d)?.clamp(-30f32, 20f32)?;
        Ok(Some((logvar * 0.5)?.exp()?.reshape((b, positions, d))?))
    }

    /// Latents (B, latent_dim, h, w) → images (B, C, S, S) on the [-1, 1] scale (unclamped).
    pub fn decode_latents(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decoder.forward(&self.post_quant_conv.forward(z)?)?)
    }

    /// Tokens from [`Autoencoder::encode`] (codes (B, L) or latents (B, L, D)) → images (B, C, S, S).
    pub fn decode_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let b = tokens.dim(0)?;
        let positions = tokens.dim(1)?;
        let side = (positions as f64).sqrt().round() as usize;
        if side * side != positions {
            return Err(Error::Input(format!(
                "{positions} tokens do not form a square latent grid"
            )));
        }
        let rows = match &self.codebook {
            Some(codebook) => {
                let idx = tokens.flatten_all()?.to_dtype(DType::U32)?;
                codebook.index_select(&idx, 0)?
            }
            None => tokens.reshape((b * positions, self.config.latent_dim))?,
        };
        self.decode_latents(&Self::from_rows(&rows, b, side)?)
    }

    /// The codebook (VQ only), e.g. to restart dead codes.
    pub fn codebook(&self) -> Option<&Tensor> {
        self.codebook.as_ref()
    }
}

/// How often each of `k` codes occurs in `codes`: (codes used, perplexity exp(H)); (0, 0) when
/// there are no codes.
pub fn code_usage(codes: &[u32], k: usize) -> (usize, f64) {
    if codes.is_empty() {
        return (0, 0.0);
    }
    let mut counts = vec![0usize; k];
    for &c in codes {
        if let Some(n) = counts.get_mut(c as usize) {
            *n += 1;
        }
    }
    let total = codes.len().max(1) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| {
            let p = n as f64 / total;
            -p * p.ln()
        })
        .sum();
    (counts.iter().filter(|&&n| n > 0).count(), entropy.exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn config(bottleneck: Bottleneck) -> AutoencoderConfig {
        AutoencoderConfig {
            in_channels: 3,
            width: 8,
            downsample: 4,
            latent_dim: 4,
            bottleneck,
        }
    }

    #[test]
    fn shapes_and_every_parameter_gets_a_gradient() -> Result<()> {
        for bottleneck in [
            Bottleneck::Vq {
                codebook: 16,
                beta: 0.25,
            },
            Bottleneck::Kl { kl_weight: 1e-4 },
        ] {
            let varmap = VarMap::new();
            let vb = seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
            let ae = Autoencoder::new(&config(bottleneck), vb)?;
            let mut rng = Rng::new(1);
            let x = (rng.normal_tensor(&[2, 3, 16, 16], &Device::Cpu)? * 0.5)?;
            let l = ae.losses(&x, &mut rng)?;
            let grads = l.loss.backward()?;
            for (name, var) in varmap.data().lock().unwrap().iter() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient ({bottleneck:?})"));
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm > 0.0, "{name}: zero gradient ({bottleneck:?})");
            }
            let tokens = ae.encode(&x)?;
            match bottleneck {
                Bottleneck::Vq { .. } => assert_eq!(tokens.dims(), &[2, 16]),
                Bottleneck::Kl { .. } => assert_eq!(tokens.dims(), &[2, 16, 4]),
            }
            assert_eq!(ae.decode_tokens(&tokens)?.dims(), &[2, 3, 16, 16]);
        }
        Ok(())
    }

    #[test]
    fn upsample_matches_nearest() -> Result<()> {
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((1, 2, 2, 2))?;
        let ours = upsample2x(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let theirs = x
            .upsample_nearest2d(4, 4)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(ours, theirs);
        Ok(())
    }

    #[test]
    fn vq_picks_the_nearest_code() -> Result<()> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
        let ae = Autoencoder::new(
            &config(Bottleneck::Vq {
                codebook: 3,
                beta: 0.25,
            }),
            vb,
        )?;
        let cb = Tensor::new(
            &[[0f32, 0., 0., 0.], [1., 1., 1., 1.], [-2., 0., 0., 0.]],
            &Device::Cpu,
        )?;
        let z = Tensor::new(
            &[
                [0.9f32, 1.1, 0.8, 1.0],
                [-1.5, 0.1, 0., 0.],
                [0.1, 0., -0.1, 0.],
            ],
            &Device::Cpu,
        )?;
        let idx = ae.nearest(&cb, &z)?.to_vec1::<u32>()?;
        assert_eq!(idx, vec![1, 2, 0]);
        Ok(())
    }

    #[test]
    fn usage_and_perplexity() {
        let (used, ppl) = code_usage(&[0, 1, 2, 3], 8);
        assert_eq!(used, 4);
        assert!((ppl - 4.0).abs() < 1e-9);
        let (used, ppl) = code_usage(&[5, 5, 5], 8);
        assert_eq!((used, ppl), (1, 1.0));
    }
}
