//! The generator a run trains: causal AR or MAR, with either head. One entry point for the harness.
use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ar::Ar;
use crate::config::{GeneratorConfig, GeneratorKind};
use crate::mar::Mar;
use crate::rng::Rng;
use crate::sampling::SampleOptions;
use crate::shard::Shard;
use crate::tokens::Tokens;
use crate::Result;

/// A generator of either kind.
#[derive(Debug, Clone)]
pub enum Generator {
    Ar(Ar),
    Mar(Mar),
}

impl Generator {
    pub fn new(cfg: &GeneratorConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(match cfg.kind {
            GeneratorKind::Ar => Generator::Ar(Ar::new(cfg, vb)?),
            GeneratorKind::Mar => Generator::Mar(Mar::new(cfg, vb)?),
        })
    }

    /// Training loss on a batch of token sequences with their class labels.
    pub fn loss(&self, tokens: &Tokens, labels: &[u32], rng: &mut Rng) -> Result<Tensor> {
        self.loss_shard(tokens, labels, rng, Shard::whole(labels.len()))
    }

    /// This rank's part of the training loss of a batch (data parallelism, see [`Shard`]):
    /// `tokens` and `labels` hold rows `shard` of the batch, and the ranks' parts add up to
    /// [`Generator::loss`] of the whole batch.
    pub fn loss_shard(
        &self,
        tokens: &Tokens,
        labels: &[u32],
        rng: &mut Rng,
        shard: Shard,
    ) -> Result<Tensor> {
        if labels.len() != shard.len {
            return Err(crate::Error::Input(format!(
                "{} labels for a share of {} rows",
                labels.len(),
                shard.len
            )));
        }
        match self {
            Generator::Ar(m) => m.loss(tokens, labels, rng, shard),
            Generator::Mar(m) => m.loss(tokens, labels, rng, shard),
        }
    }

    /// Generate one token sequence per label.
    pub fn sample(&self, labels: &[u32], opts: &SampleOptions, rng: &mut Rng) -> Result<Tokens> {
        match self {
            Generator::Ar(m) => m.sample(labels, opts, rng),
            Generator::Mar(m) => m.sample(labels, opts, rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HeadConfig, Order};
    use crate::diffusion::Schedule;
    use crate::nn::Precision;
    use crate::sampling::{ar_tokens_known_after, CfgSchedule};
    use crate::Shard;
    use candle_core::{DType, Device};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

    const VARIANTS: [(GeneratorKind, Order); 3] = [
        (GeneratorKind::Ar, Order::Raster),
        (GeneratorKind::Ar, Order::Random),
        (GeneratorKind::Mar, Order::Random),
    ];

    fn config(kind: GeneratorKind, order: Order, diffusion: bool) -> GeneratorConfig {
        GeneratorConfig {
            kind,
            order,
            seq_len: 6,
            token_dim: 4,
            width: 16,
            depth: 1,
            decoder_width: 16,
            decoder_depth: 1,
            heads: 2,
            decoder_heads: 2,
            mlp_ratio: 2.0,
            num_classes: 3,
            buffer_size: 2,
            label_drop: 0.1,
            attn_dropout: 0.1,
            proj_dropout: 0.1,
            head: if diffusion {
                HeadConfig::Diffusion {
                    width: 16,
                    depth: 2,
                    batch_mul: 2,
                    train_steps: 1000,
                    sampling_steps: 10,
                    schedule: Schedule::Cosine,
                    learn_sigma: true,
                    clip_denoised: false,
                }
            } else {
                HeadConfig::CrossEntropy { vocab: 5 }
            },
            precision: Precision::F32,
        }
    }

    fn batch(cfg: &GeneratorConfig, rng: &mut Rng, dev: &Device) -> Tokens {
        cfg.random_tokens(4, rng, dev).expect("tensor")
    }

    /// Give every variable random values: zero-initialised layers block gradients upstream at init.
    fn randomise(vm: &VarMap, rng: &mut Rng, dev: &Device) -> Result<()> {
        for v in vm.all_vars() {
            let r = rng.normal_tensor(v.dims(), dev)?;
            v.set(&(r * 0.2)?)?;
        }
        Ok(())
    }

    /// Every trainable variable must receive a non-zero gradient (catches ops without backward),
    /// in f32 and in bf16 (where the f32 weights are reached through casts).
    /// AR's guidance scale at each step is MAR's with one token per step (the decision recorded
    /// at `ar_tokens_known_after`), on the reference's MAR arithmetic (`tokens_masked_after`).
    #[test]
    fn ar_and_one_token_per_step_mar_share_the_guidance_schedule() {
        let opts = SampleOptions {
            num_iter: 16,
            cfg: 3.0,
            cfg_schedule: CfgSchedule::Linear,
            temperature: 1.0,
        };
        let l = 16;
        let mut masked = l;
        for step in 0..l {
            let mask_len = crate::mar::tokens_masked_after(step, l, l, masked);
            let mar = opts.cfg_at(l - mask_len, l);
            let ar = opts.cfg_at(ar_tokens_known_after(step, l), l);
            assert_eq!(ar, mar, "step {step}");
            masked = mask_len;
        }
        assert_eq!(opts.cfg_at(ar_tokens_known_after(0, l), l), 1.125);
        assert_eq!(opts.cfg_at(ar_tokens_known_after(15, l), l), 2.875);
    }

    #[test]
    fn every_variable_gets_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for precision in [Precision::F32, Precision::Bf16] {
            for (kind, order) in VARIANTS {
                for diffusion in [false, true] {
                    let cfg = GeneratorConfig {
                        precision,
                        ..config(kind, order, diffusion)
                    };
                    let vm = VarMap::new();
                    let g = Generator::new(
                        &cfg,
                        crate::init::seeded_var_builder(&vm, 11, DType::F32, &dev),
                    )?;
                    let mut rng = Rng::new(3);
                    randomise(&vm, &mut rng, &dev)?;
                    let tokens = batch(&cfg, &mut rng, &dev);
                    // many draws, so that MAR's random mask ratio leaves some tokens visible (at 6
                    // tokens, a draw masks them all with probability 0.64)
                    let mut loss = g.loss(&tokens, &[0, 1, 2, 1], &mut rng)?;
                    for _ in 0..29 {
                        loss = (loss + g.loss(&tokens, &[0, 1, 2, 1], &mut rng)?)?;
                    }
                    assert_eq!(loss.dtype(), DType::F32, "losses are f32");
                    assert!(loss.to_scalar::<f32>()?.is_finite());
                    let grads = loss.backward()?;
                    let data = vm.data().lock().expect("varmap lock");
                    for (name, v) in data.iter() {
                        if name == "fake_latent" {
                            continue; // only reached when a label is dropped
                        }
                        let what = format!("{precision:?} {kind:?} diffusion={diffusion}");
                        let g = grads
                            .get(v.as_tensor())
                            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
                        assert_eq!(g.dtype(), DType::F32, "{what}: gradient of {name}");
                        let s = g.abs()?.sum_all()?.to_scalar::<f32>()?;
                        assert!(s > 0.0, "{what}: zero gradient for {name}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Data parallelism: the ranks' losses and gradients on their shares of a batch add up to the
    /// loss and gradients of the whole batch (same draws: masks, orders, label drops, dropout,
    /// timesteps and noise), for every variant, with 2 and 4 ranks.
    #[test]
    fn shards_add_up_to_the_whole_batch() -> Result<()> {
        let dev = Device::Cpu;
        let labels = [0u32, 1, 2, 1];
        for (kind, order) in VARIANTS {
            for diffusion in [false, true] {
                let what = format!("{kind:?} {order:?} diffusion={diffusion}");
                let cfg = config(kind, order, diffusion);
                let vm = VarMap::new();
                let g = Generator::new(
                    &cfg,
                    crate::init::seeded_var_builder(&vm, 11, DType::F32, &dev),
                )?;
                let mut rng = Rng::new(3);
                randomise(&vm, &mut rng, &dev)?;
                let tokens = batch(&cfg, &mut rng, &dev);
                let vars = vm.all_vars();
                let whole = g.loss(&tokens, &labels, &mut rng.clone())?;
                let whole_grads = whole.backward()?;
                for world in [2, 4] {
                    let mut loss = 0f32;
                    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
                    for rank in 0..world {
                        let shard = Shard::of(rank, world, labels.len()).expect("divides");
                        let part = match &tokens {
                            Tokens::Discrete(t) => {
                                Tokens::Discrete(t.narrow(0, shard.start, shard.len)?)
                            }
                            Tokens::Continuous(t) => {
                                Tokens::Continuous(t.narrow(0, shard.start, shard.len)?)
                            }
                        };
                        let l =
                            g.loss_shard(&part, &labels[shard.range()], &mut rng.clone(), shard)?;
                        loss += l.to_scalar::<f32>()?;
                        let gs = l.backward()?;
                        for (sum, v) in grads.iter_mut().zip(&vars) {
                            if let Some(gr) = gs.get(v) {
                                *sum = Some(match sum.take() {
                                    Some(acc) => (acc + gr)?,
                                    None => gr.clone(),
                                });
                            }
                        }
                    }
                    let expected = whole.to_scalar::<f32>()?;
                    assert!(
                        (loss - expected).abs() < 1e-5 * expected.abs().max(1.0),
                        "{what}, {world} ranks: loss {loss} vs {expected}"
                    );
                    for (v, sum) in vars.iter().zip(&grads) {
                        let (Some(w), Some(s)) = (whole_grads.get(v), sum) else {
                            assert_eq!(
                                whole_grads.get(v).is_some(),
                                sum.is_some(),
                                "{what}: a gradient on one side only"
                            );
                            continue;
                        };
                        let scale = w.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                        let diff = (w - s)?.abs()?.max_all()?.to_scalar::<f32>()?;
                        assert!(
                            diff <= 1e-4 * scale,
                            "{what}, {world} ranks: gradient differs by {diff} (scale {scale})"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// bf16 products change the loss on a fixed batch (same weights, masks, noise) only by
    /// rounding.
    #[test]
    fn bf16_loss_is_close_to_the_f32_loss() -> Result<()> {
        let dev = Device::Cpu;
        for (kind, order) in VARIANTS {
            for diffusion in [false, true] {
                let cfg = config(kind, order, diffusion);
                let vm = VarMap::new();
                let vb = crate::init::seeded_var_builder(&vm, 11, DType::F32, &dev);
                let f32_model = Generator::new(&cfg, vb.clone())?;
                let bf16_cfg = GeneratorConfig {
                    precision: Precision::Bf16,
                    ..cfg.clone()
                };
                // the same variables: a builder over an existing VarMap hands them out again
                let bf16_model = Generator::new(&bf16_cfg, vb)?;
                let mut rng = Rng::new(3);
                randomise(&vm, &mut rng, &dev)?;
                let tokens = batch(&cfg, &mut rng, &dev);
                let labels = [0, 1, 2, 1];
                let (mut a, mut b) = (0f32, 0f32);
                for draw in 0..4 {
                    a += f32_model
                        .loss(&tokens, &labels, &mut Rng::new(100 + draw))?
                        .to_scalar::<f32>()?;
                    b += bf16_model
                        .loss(&tokens, &labels, &mut Rng::new(100 + draw))?
                        .to_scalar::<f32>()?;
                }
                let rel = ((a - b) / a).abs();
                assert!(
                    rel < 2e-2,
                    "{kind:?} diffusion={diffusion}: f32 {a} vs bf16 {b} (relative {rel})"
                );
                assert_ne!(a, b, "{kind:?} diffusion={diffusion}: bf16 was not used");
            }
        }
        Ok(())
    }

    #[test]
    fn training_reduces_loss_and_sampling_has_the_right_shape() -> Result<()> {
        let dev = Device::Cpu;
        let cases = VARIANTS.into_iter().flat_map(|v| {
            [Precision::F32, Precision::Bf16]
                .into_iter()
                .map(move |p| (v, p))
        });
        for ((kind, order), precision) in cases {
            for diffusion in [false, true] {
                let cfg = GeneratorConfig {
                    precision,
                    ..config(kind, order, diffusion)
                };
                let vm = VarMap::new();
                let g = Generator::new(
                    &cfg,
                    crate::init::seeded_var_builder(&vm, 11, DType::F32, &dev),
                )?;
                let mut opt = AdamW::new(
                    vm.all_vars(),
                    ParamsAdamW {
                        lr: 3e-3,
                        ..Default::default()
                    },
                )?;
                let mut rng = Rng::new(5);
                let tokens = batch(&cfg, &mut rng, &dev);
                let labels = [0, 1, 2, 1];
                let mean_loss = |g: &Generator, rng: &mut Rng| -> Result<f32> {
                    let mut s = 0.0;
                    for _ in 0..8 {
                        s += g.loss(&tokens, &labels, rng)?.to_scalar::<f32>()?;
                    }
                    Ok(s / 8.0)
                };
                let before = mean_loss(&g, &mut Rng::new(9))?;
                for _ in 0..60 {
                    let loss = g.loss(&tokens, &labels, &mut rng)?;
                    opt.backward_step(&loss)?;
                }
                let after = mean_loss(&g, &mut Rng::new(9))?;
                assert!(
                    after < before,
                    "{precision:?} {kind:?} diffusion={diffusion}: {before} -> {after}"
                );
                for cfg_scale in [1.0, 2.0] {
                    let opts = SampleOptions {
                        num_iter: 3,
                        cfg: cfg_scale,
                        cfg_schedule: CfgSchedule::Linear,
                        temperature: 1.0,
                    };
                    let out = g.sample(&[0, 2], &opts, &mut rng)?;
                    match out {
                        Tokens::Discrete(t) => assert_eq!(t.dims(), &[2, 6]),
                        Tokens::Continuous(t) => {
                            assert_eq!(t.dims(), &[2, 6, 4]);
                            let v = t.flatten_all()?.to_vec1::<f32>()?;
                            assert!(v.iter().all(|x| x.is_finite()));
                            assert!(v.iter().any(|x| *x != 0.0), "every token was written");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn mar_schedule_predicts_every_token_once() {
        // cosine schedule over 16 tokens and 4 steps: masked counts strictly fall to 0
        let l = 16;
        let mut masked = l;
        let mut seen = vec![];
        for step in 0..4 {
            let len = if step == 3 {
                0
            } else {
                crate::mar::tokens_masked_after(step, 4, l, masked)
            };
            assert!(len < masked);
            seen.push(len);
            masked = len;
        }
        assert_eq!(seen, vec![14, 11, 6, 0]);
    }
}
