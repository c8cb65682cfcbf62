//! Diffusion Loss (MAR §3.2): a small MLP denoiser with adaLN conditioning on the generator's
//! per-token output z and the timestep, trained with the diffusion objective and sampled by the
//! reverse process. Parameter names follow the reference `SimpleMLPAdaLN`.
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::diffusion::{sample_timesteps, GaussianDiffusion, Schedule};
use crate::fused;
use crate::nn::{linear_normal, linear_xavier, linear_zero, LayerNorm, Linear, Precision};
use crate::rng::Rng;
use crate::shard::TokenRows;

/// Sinusoidal timestep embedding followed by a 2-layer MLP (DiT's `TimestepEmbedder`). Always f32:
/// neighbouring timesteps differ in the low-frequency components by less than bf16 resolves.
#[derive(Debug, Clone)]
struct TimestepEmbedder {
    fc1: Linear,
    fc2: Linear,
    freq_dim: usize,
}

impl TimestepEmbedder {
    fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        let freq_dim = 256;
        Ok(TimestepEmbedder {
            fc1: linear_normal(freq_dim, hidden, 0.02, vb.pp("mlp.0"))?,
            fc2: linear_normal(hidden, hidden, 0.02, vb.pp("mlp.2"))?,
            freq_dim,
        })
    }

    /// [cos(t·f_i), sin(t·f_i)], f_i = 10000^(-i/half) (DiT), in float32 like the reference so
    /// that large arguments round the same way.
    fn timestep_embedding(t: &[f64], dim: usize, device: &candle_core::Device) -> Result<Tensor> {
        let half = dim / 2;
        let log_period = -(10000f32.ln());
        let freqs: Vec<f32> = (0..half)
            .map(|i| (log_period * i as f32 / half as f32).exp())
            .collect();
        let mut data = Vec::with_capacity(t.len() * dim);
        for &ti in t {
            let args: Vec<f32> = freqs.iter().map(|f| ti as f32 * f).collect();
            data.extend(args.iter().map(|a| a.cos()));
            data.extend(args.iter().map(|a| a.sin()));
            if dim % 2 == 1 {
                data.push(0.0);
            }
        }
        Tensor::from_vec(data, (t.len(), dim), device)
    }

    /// Embed each row's timestep; the MLP runs once per distinct timestep, rows gather from it.
    fn forward(&self, t: &[f64], device: &candle_core::Device) -> Result<Tensor> {
        let mut distinct: Vec<f64> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        let index: Vec<u32> = t
            .iter()
            .map(|&ti| {
                *seen.entry(ti.to_bits()).or_insert_with(|| {
                    distinct.push(ti);
                    (distinct.len() - 1) as u32
                })
            })
            .collect();
        let f = Self::timestep_embedding(&distinct, self.freq_dim, device)?;
        let emb = self.fc2.forward(&fused::silu(&self.fc1.forward(&f)?)?)?;
        if distinct.len() == t.len() {
            return Ok(emb);
        }
        if distinct.len() == 1 {
            // sampling: every row is at the same step
            return emb.broadcast_as((t.len(), emb.dim(1)?));
        }
        fused::gather_rows(&emb, &index)
    }
}

/// Residual MLP block with adaLN: x + gate · mlp(modulate(LN(x), shift, scale)).
#[derive(Debug, Clone)]
struct ResBlock {
    in_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ada: Linear,
}

impl ResBlock {
    fn new(ch: usize, precision: Precision, vb: VarBuilder) -> Result<Self> {
        Ok(ResBlock {
            in_ln: LayerNorm::new(ch, 1e-6, true, vb.pp("in_ln"))?,
            fc1: linear_xavier(ch, ch, vb.pp("mlp.0"))?.with_precision(precision),
            fc2: linear_xavier(ch, ch, vb.pp("mlp.2"))?.with_precision(precision),
            ada: linear_zero(ch, 3 * ch, vb.pp("adaLN_modulation.1"))?.with_precision(precision),
        })
    }

    /// `silu_y` is SiLU of the conditioning y (the first layer of `adaLN_modulation`), computed
    /// once and shared by every block.
    fn forward(&self, x: &Tensor, silu_y: &Tensor) -> Result<Tensor> {
        let m = self.ada.forward_chunks(silu_y, 3)?;
        let h = fused::modulate(&self.in_ln.forward(x)?, &m[0], &m[1])?;
        let h = self.fc2.forward(&fused::silu(&self.fc1.forward(&h)?)?)?;
        fused::gated_residual(x, &h, &m[2])
    }
}

/// The reference `SimpleMLPAdaLN`. Its linear layers compute in the given precision (the
/// timestep embedder excepted); LayerNorm, SiLU and the adaLN modulation arithmetic are f32.
#[derive(Debug, Clone)]
pub struct SimpleMlpAdaLn {
    time_embed: TimestepEmbedder,
    cond_embed: Linear,
    input_proj: Linear,
    res_blocks: Vec<ResBlock>,
    norm_final: LayerNorm,
    final_linear: Linear,
    final_ada: Linear,
    pub in_channels: usize,
}

impl SimpleMlpAdaLn {
    pub fn new(
        in_channels: usize,
        model_channels: usize,
        out_channels: usize,
        z_channels: usize,
        num_res_blocks: usize,
        precision: Precision,
        vb: VarBuilder,
    ) -> Result<Self> {
        let res_blocks = (0..num_res_blocks)
            .map(|i| ResBlock::new(model_channels, precision, vb.pp(format!("res_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(SimpleMlpAdaLn {
            time_embed: TimestepEmbedder::new(model_channels, vb.pp("time_embed"))?,
            cond_embed: linear_xavier(z_channels, model_channels, vb.pp("cond_embed"))?
                .with_precision(precision),
            input_proj: linear_xavier(in_channels, model_channels, vb.pp("input_proj"))?
                .with_precision(precision),
            res_blocks,
            norm_final: LayerNorm::new(
                model_channels,
                1e-6,
                false,
                vb.pp("final_layer.norm_final"),
            )?,
            final_linear: linear_zero(model_channels, out_channels, vb.pp("final_layer.linear"))?
                .with_precision(precision),
            final_ada: linear_zero(
                model_channels,
                2 * model_channels,
                vb.pp("final_layer.adaLN_modulation.1"),
            )?
            .with_precision(precision),
            in_channels,
        })
    }

    /// ε (and variance values) for noisy tokens `x` at timesteps `t` given conditions `c`.
    pub fn forward(&self, x: &Tensor, t: &[f64], c: &Tensor) -> Result<Tensor> {
        self.forward_embedded(x, t, &self.embed_condition(c)?)
    }

    /// `cond_embed(c)`: the condition's share of the adaLN input, the same at every diffusion
    /// step, so sampling computes it once for all of them.
    pub fn embed_condition(&self, c: &Tensor) -> Result<Tensor> {
        self.cond_embed.forward(c)
    }

    /// [`Self::forward`] with the condition already embedded by [`Self::embed_condition`].
    pub fn forward_embedded(&self, x: &Tensor, t: &[f64], cond: &Tensor) -> Result<Tensor> {
        let mut x = self.input_proj.forward(x)?;
        let y = (self.time_embed.forward(t, x.device())? + cond)?;
        let silu_y = fused::silu(&y)?;
        for block in &self.res_blocks {
            x = block.forward(&x, &silu_y)?;
        }
        let m = self.final_ada.forward_chunks(&silu_y, 2)?;
        self.final_linear.forward(&fused::modulate(
            &self.norm_final.forward(&x)?,
            &m[0],
            &m[1],
        )?)
    }

    /// Classifier-free guidance on ε: the first half of the batch is conditional, the second
    /// unconditional; both halves get ε_u + s(ε_c − ε_u); the variance values pass through.
    pub fn forward_with_cfg(
        &self,
        x: &Tensor,
        t: &[f64],
        c: &Tensor,
        cfg_scale: f64,
    ) -> Result<Tensor> {
        self.forward_embedded_with_cfg(x, t, &self.embed_condition(c)?, cfg_scale)
    }

    /// [`Self::forward_with_cfg`] with the condition already embedded.
    pub fn forward_embedded_with_cfg(
        &self,
        x: &Tensor,
        t: &[f64],
        cond: &Tensor,
        cfg_scale: f64,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let half = x.narrow(0, 0, n / 2)?;
        let combined = Tensor::cat(&[&half, &half], 0)?;
        let out = self.forward_embedded(&combined, t, cond)?;
        let ch = self.in_channels;
        let eps = out.narrow(D::Minus1, 0, ch)?;
        let rest_ch = out.dim(D::Minus1)? - ch;
        let cond = eps.narrow(0, 0, n / 2)?;
        let uncond = eps.narrow(0, n / 2, n - n / 2)?;
        let half_eps = (&uncond + ((&cond - &uncond)? * cfg_scale)?)?;
        let eps = Tensor::cat(&[&half_eps, &half_eps], 0)?;
        if rest_ch == 0 {
            Ok(eps)
        } else {
            Tensor::cat(&[&eps, &out.narrow(D::Minus1, ch, rest_ch)?], D::Minus1)
        }
    }
}

/// Configuration of the Diffusion Loss head.
#[derive(Debug, Clone)]
pub struct DiffLossConfig {
    pub token_dim: usize,
    pub z_dim: usize,
    pub width: usize,
    pub depth: usize,
    /// training steps of the noise schedule (1000 in the paper)
    pub train_steps: usize,
    /// respaced steps used when sampling (100 in the paper)
    pub sampling_steps: usize,
    pub schedule: Schedule,
    pub learn_sigma: bool,
    /// clip predicted tokens to [-1, 1] while sampling (for pixel tokens; MAR: false)
    pub clip_denoised: bool,
    /// arithmetic of the MLP's matrix products (the diffusion math is f32 in every precision)
    pub precision: Precision,
}

/// The Diffusion Loss head: the denoiser plus its training and sampling processes.
#[derive(Debug, Clone)]
pub struct DiffLoss {
    pub net: SimpleMlpAdaLn,
    pub train_diffusion: GaussianDiffusion,
    pub gen_diffusion: GaussianDiffusion,
    pub token_dim: usize,
}

impl DiffLoss {
    pub fn new(cfg: &DiffLossConfig, vb: VarBuilder) -> Result<Self> {
        let out = if cfg.learn_sigma {
            2 * cfg.token_dim
        } else {
            cfg.token_dim
        };
        let mut gen_diffusion = GaussianDiffusion::respaced(
            cfg.schedule,
            cfg.train_steps,
            cfg.sampling_steps,
            cfg.learn_sigma,
        );
        gen_diffusion.clip_denoised = cfg.clip_denoised;
        Ok(DiffLoss {
            net: SimpleMlpAdaLn::new(
                cfg.token_dim,
                cfg.width,
                out,
                cfg.z_dim,
                cfg.depth,
                cfg.precision,
                vb.pp("net"),
            )?,
            train_diffusion: GaussianDiffusion::training(
                cfg.schedule,
                cfg.train_steps,
                cfg.learn_sigma,
            ),
            gen_diffusion,
            token_dim: cfg.token_dim,
        })
    }

    /// Per-row loss for given timesteps and noise (deterministic; used by tests and `loss`).
    pub fn loss_terms(
        &self,
        target: &Tensor,
        z: &Tensor,
        t: &[usize],
        noise: &Tensor,
    ) -> Result<crate::diffusion::TrainingTerms> {
        let x_t = self.train_diffusion.q_sample(target, t, noise)?;
        let tf: Vec<f64> = t.iter().map(|&i| i as f64).collect();
        let out = self.net.forward(&x_t, &tf, z)?;
        self.train_diffusion
            .training_terms(&out, target, &x_t, t, noise)
    }

    /// Mean loss over rows where `mask` is 1 (all rows when `mask` is None).
    pub fn loss(
        &self,
        target: &Tensor,
        z: &Tensor,
        mask: Option<&Tensor>,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let n = target.dim(0)?;
        let t = sample_timesteps(rng, n, self.train_diffusion.num_timesteps());
        let noise = rng.normal_tensor(target.dims(), target.device())?;
        let terms = self.loss_terms(target, z, &t, &noise)?;
        masked_mean(&terms.loss, mask)
    }

    /// [`DiffLoss::loss`] of `copies` stacked copies of the token rows `rows` (the head's
    /// `diffusion_batch_mul`): `target`, `z` and `mask` hold copy 0's rows, then copy 1's, and so
    /// on. Timesteps and noise are drawn for the copies of the whole batch's rows, each copy's
    /// rows at their offset, and the mean is over the whole batch's weight times `copies`.
    pub fn loss_rows(
        &self,
        target: &Tensor,
        z: &Tensor,
        mask: Option<&Tensor>,
        rows: TokenRows,
        copies: usize,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        if rows.shard.is_whole() {
            return self.loss(target, z, mask, rng);
        }
        let (s, d) = (rows.shard, target.dim(1)?);
        let all = sample_timesteps(rng, copies * s.total, self.train_diffusion.num_timesteps());
        let key = rng.next_u64();
        let mut t = Vec::with_capacity(copies * s.len);
        let mut noise = Vec::with_capacity(copies);
        for c in 0..copies {
            let first = c * s.total + s.start;
            t.extend_from_slice(&all[first..first + s.len]);
            let shape = candle_core::Shape::from((s.len, d));
            noise.push(fused::gaussian_noise_at(
                key,
                first * d,
                &shape,
                target.device(),
            )?);
        }
        let noise = Tensor::cat(&noise, 0)?;
        let terms = self.loss_terms(target, z, &t, &noise)?;
        let rows = TokenRows {
            shard: s,
            weight: rows.weight * copies,
        };
        shard_mean(&terms.loss, mask, rows)
    }

    /// Sample one token per row of `z` by running the reverse process. With `cfg_scale != 1`,
    /// `z` holds the conditional rows then the unconditional rows; both halves come back equal
    /// in expectation and the caller keeps the first.
    pub fn sample(
        &self,
        z: &Tensor,
        temperature: f64,
        cfg_scale: f64,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let n = z.dim(0)?;
        let dev = z.device();
        let guided = cfg_scale != 1.0;
        let (x, noise) = self.draws(n, guided, rng, dev)?;
        // the rows are independent: on the CPU, blocks of them run the whole reverse process on
        // rayon's threads at once, each block's small ops on one thread (an op split over the
        // threads costs more in wake-ups than it saves at these sizes). With guidance a block
        // holds the same tokens of both halves. The block count depends on the rows alone.
        let tokens = if guided { n / 2 } else { n };
        let blocks = if dev.is_cpu() {
            (tokens / SAMPLE_BLOCK_TOKENS).clamp(1, MAX_SAMPLE_BLOCKS)
        } else {
            1
        };
        if blocks == 1 {
            return self.reverse_process(z, x, &noise, temperature, cfg_scale);
        }
        use rayon::prelude::*;
        let per = tokens.div_ceil(blocks);
        let rows = |t: &Tensor, first: usize, len: usize| -> Result<Tensor> {
            if guided {
                Tensor::cat(
                    &[t.narrow(0, first, len)?, t.narrow(0, n / 2 + first, len)?],
                    0,
                )
            } else {
                t.narrow(0, first, len)
            }
        };
        let parts = (0..blocks)
            .into_par_iter()
            .map(|b| {
                let (first, len) = (b * per, per.min(tokens - b * per));
                let noise = noise
                    .iter()
                    .map(|e| rows(e, first, len))
                    .collect::<Result<Vec<_>>>()?;
                let x = self.reverse_process(
                    &rows(z, first, len)?,
                    rows(&x, first, len)?,
                    &noise,
                    temperature,
                    cfg_scale,
                )?;
                Ok((x, len))
            })
            .collect::<Result<Vec<_>>>()?;
        if !guided {
            return Tensor::cat(&parts.iter().map(|(x, _)| x).collect::<Vec<_>>(), 0);
        }
        // each block is [its conditional rows; its unconditional rows]
        let mut halves = Vec::with_capacity(2 * blocks);
        for half in 0..2 {
            for (x, len) in &parts {
                halves.push(x.narrow(0, half * len, *len)?);
            }
        }
        Tensor::cat(&halves, 0)
    }

    /// Every random draw of sampling `n` rows, in order: x_T (with guidance, both halves alike)
    /// and the noise of each step.
    fn draws(
        &self,
        n: usize,
        guided: bool,
        rng: &mut Rng,
        dev: &candle_core::Device,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let x = if guided {
            let half = rng.normal_tensor(&[n / 2, self.token_dim], dev)?;
            Tensor::cat(&[&half, &half], 0)?
        } else {
            rng.normal_tensor(&[n, self.token_dim], dev)?
        };
        let noise = (0..self.gen_diffusion.num_timesteps())
            .map(|_| rng.normal_tensor(&[n, self.token_dim], dev))
            .collect::<Result<Vec<_>>>()?;
        Ok((x, noise))
    }

    /// The reverse process from x_T = `x`, with `noise[k]` drawn at the k-th step (from T − 1
    /// down). Runs one step per element of `noise`, so the first k elements give x after k
    /// steps. Public so that parity tests can run it with the reference's draws.
    pub fn reverse_process(
        &self,
        z: &Tensor,
        mut x: Tensor,
        noise: &[Tensor],
        temperature: f64,
        cfg_scale: f64,
    ) -> Result<Tensor> {
        let n = z.dim(0)?;
        let d = &self.gen_diffusion;
        let cond = self.net.embed_condition(z)?;
        for (i, noise) in (0..d.num_timesteps()).rev().zip(noise) {
            let t = vec![i; n];
            let model_t = vec![d.timestep_map[i] as f64; n];
            let out = if cfg_scale != 1.0 {
                self.net
                    .forward_embedded_with_cfg(&x, &model_t, &cond, cfg_scale)?
            } else {
                self.net.forward_embedded(&x, &model_t, &cond)?
            };
            x = d.p_sample(&out, &x, &t, temperature, noise)?;
        }
        Ok(x)
    }
}

/// Sampling on the CPU splits the tokens into at most this many blocks of at least this many
/// (mar-tiny's bench samples 64 tokens per step with guidance: 2 blocks).
const SAMPLE_BLOCK_TOKENS: usize = 32;
const MAX_SAMPLE_BLOCKS: usize = 8;

/// This share's part of the whole batch's mean loss: Σ loss·mask over its rows divided by the
/// whole batch's weight, so that the shares add up to the mean; [`masked_mean`] for the whole.
pub fn shard_mean(loss: &Tensor, mask: Option<&Tensor>, rows: TokenRows) -> Result<Tensor> {
    if rows.shard.is_whole() {
        return masked_mean(loss, mask);
    }
    let sum = match mask {
        Some(m) => (loss * m)?.sum_all()?,
        None => loss.sum_all()?,
    };
    let weight = Tensor::new(rows.weight.max(1) as f32, loss.device())?.to_dtype(sum.dtype())?;
    sum.broadcast_div(&weight)
}

/// Σ loss·mask / Σ mask, or the plain mean.
pub fn masked_mean(loss: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        // divided on the device: reading Σ mask back would synchronise every training step
        Some(m) => (loss * m)?
            .sum_all()?
            .broadcast_div(&m.sum_all()?.maximum(1.0)?),
        None => loss.mean_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Sampling in row blocks (the CPU path) gives what one reverse process over all rows gives.
    #[test]
    fn sampling_in_row_blocks_is_one_reverse_process() -> Result<()> {
        let cfg = DiffLossConfig {
            token_dim: 4,
            z_dim: 8,
            width: 16,
            depth: 2,
            train_steps: 1000,
            sampling_steps: 10,
            schedule: Schedule::Cosine,
            learn_sigma: true,
            clip_denoised: false,
            precision: Precision::F32,
        };
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let head = DiffLoss::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        // random weights everywhere (adaLN and the output layer start at zero)
        let mut rng = Rng::new(1);
        for v in vm.all_vars() {
            v.set(&(rng.normal_tensor(v.dims(), &dev)? * 0.3)?)?;
        }
        let tokens = 3 * SAMPLE_BLOCK_TOKENS + 5; // 3 blocks of 34, 34 and 33 tokens
        for (cfg_scale, n) in [(1.0, tokens), (2.5, 2 * tokens)] {
            let z = rng.normal_tensor(&[n, 8], &dev)?;
            let blocked = head.sample(&z, 0.9, cfg_scale, &mut Rng::new(7))?;
            let (x, noise) = head.draws(n, cfg_scale != 1.0, &mut Rng::new(7), &dev)?;
            let whole = head.reverse_process(&z, x, &noise, 0.9, cfg_scale)?;
            assert_eq!(blocked.dims(), &[n, 4]);
            let err = (blocked - whole)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "cfg {cfg_scale}: {err}");
        }
        Ok(())
    }
}
