//! Stage 2, the generator's training loop, top to bottom: data order, training tokens, the step
//! (loss, backward, clipping, AdamW, EMA), logging, checkpoints and evaluations along the way.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::fused::gaussian_noise_at;
use models::init::seeded_var_builder;
use models::{Generator, GeneratorConfig, Rng, Shard, Tokens};

use crate::data::ImageSet;
use crate::record::{spinner, Recorder};
use crate::spec::PlannedRun;
use crate::tokenize::{TokenData, Tokenizer};
use crate::train::collective::{broadcast_bytes, Collective, LocalGroup};
use crate::train::{lr_at, AdamW, Checkpoint, Ema, Loaded};
use crate::{Error, Result};

/// Index of the `j`-th example of step `step`: epochs are fresh permutations drawn from the seed,
/// so the order is the same for both arms and a resumed run continues where it stopped.
struct DataOrder {
    seed: u64,
    n: usize,
    epoch: usize,
    perm: Vec<usize>,
}

impl DataOrder {
    pub fn new(seed: u64, n: usize) -> Self {
        DataOrder {
            seed,
            n,
            epoch: usize::MAX,
            perm: Vec::new(),
        }
    }

    fn batch(&mut self, step: usize, batch: usize) -> Vec<usize> {
        (0..batch)
            .map(|j| {
                let global = step * batch + j;
                let epoch = global / self.n;
                if epoch != self.epoch {
                    self.perm = Rng::new(
                        self.seed ^ 0xDA7A_0000 ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
                    )
                    .permutation(self.n);
                    self.epoch = epoch;
                }
                self.perm[global % self.n]
            })
            .collect()
    }
}

/// The training split's tokens as the generator sees them: each image's tokens, with data.hflip
/// also those of its mirror image, and with tokenizer.sample_posterior the KL posterior's
/// standard deviation beside each mean, so that every step trains on a fresh draw.
pub struct TrainTokens<'a> {
    plain: &'a TokenData,
    plain_std: Option<Vec<f32>>,
    mirrored: Option<(TokenData, Option<Vec<f32>>)>,
}

impl<'a> TrainTokens<'a> {
    pub fn new(
        tok: &Tokenizer,
        plain: &'a TokenData,
        train: &ImageSet,
        run: &PlannedRun,
    ) -> Result<Self> {
        let posterior = run.tokenizer().sample_posterior;
        let std_of = |set: &ImageSet| -> Result<Option<Vec<f32>>> {
            Ok(match posterior {
                true => tok.posterior_std(set)?,
                false => None,
            })
        };
        let mirrored = match run.spec.data.hflip {
            true => {
                let m = train.mirrored();
                Some((tok.encode(&m)?, std_of(&m)?))
            }
            false => None,
        };
        Ok(TrainTokens {
            plain,
            plain_std: std_of(train)?,
            mirrored,
        })
    }

    /// Which images of step `step`'s batch are mirrored: a fair coin per image from (seed, step),
    /// so a resumed run flips the same ones; none without data.hflip.
    fn flips(&self, seed: u64, step: usize, n: usize) -> Vec<bool> {
        if self.mirrored.is_none() {
            return vec![false; n];
        }
        let mut rng = Rng::new(seed ^ 0xF11B_0000 ^ (step as u64).wrapping_mul(0x9E37_79B9));
        (0..n).map(|_| rng.uniform() < 0.5).collect()
    }

    /// The tokens of images `idx` (mirrored where `flips` says), rows `shard` of the step's
    /// batch, as one batch on `device`; with posterior sampling, mean + std·ε, ε being these
    /// rows' part of noise drawn from `rng` for the whole batch.
    fn batch(
        &self,
        idx: &[usize],
        flips: &[bool],
        (seq_len, token_dim): (usize, usize),
        device: &Device,
        rng: &mut Rng,
        shard: Shard,
    ) -> candle_core::Result<Tokens> {
        let row = seq_len * token_dim;
        if let TokenData::Discrete(_) = self.plain {
            let mut v = Vec::with_capacity(idx.len() * seq_len);
            for (&i, &flip) in idx.iter().zip(flips) {
                if let TokenData::Discrete(codes) = self.side(flip).0 {
                    v.extend_from_slice(&codes[i * seq_len..(i + 1) * seq_len]);
                }
            }
            return Ok(Tokens::Discrete(Tensor::from_vec(
                v,
                (idx.len(), seq_len),
                device,
            )?));
        }
        let mut means = Vec::with_capacity(idx.len() * row);
        let mut stds = self
            .plain_std
            .as_ref()
            .map(|_| Vec::with_capacity(idx.len() * row));
        for (&i, &flip) in idx.iter().zip(flips) {
            let (data, std) = self.side(flip);
            if let TokenData::Continuous(x) = data {
                means.extend_from_slice(&x[i * row..(i + 1) * row]);
            }
            if let (Some(out), Some(std)) = (stds.as_mut(), std) {
                out.extend_from_slice(&std[i * row..(i + 1) * row]);
            }
        }
        let shape = [idx.len(), seq_len, token_dim];
        let mean = Tensor::from_vec(means, &shape, device)?;
        Ok(Tokens::Continuous(match stds {
            // a draw from each token's posterior: mean + std·ε
            Some(std) => {
                let std = Tensor::from_vec(std, &shape, device)?;
                let key = rng.next_u64();
                let eps = gaussian_noise_at(key, shard.start * row, &shape[..].into(), device)?;
                (mean + (std * eps)?)?
            }
            None => mean,
        }))
    }

    /// The tokens (and posterior standard deviations) of the plain or the mirrored images.
    fn side(&self, flip: bool) -> (&TokenData, Option<&Vec<f32>>) {
        match (&self.mirrored, flip) {
            (Some((t, std)), true) => (t, std.as_ref()),
            _ => (self.plain, self.plain_std.as_ref()),
        }
    }
}

/// Called during training with (step, weights, EMA weights) to evaluate an intermediate model.
pub type EvalHook<'a> = dyn FnMut(usize, &VarMap, Option<&Ema>) -> Result<()> + 'a;

/// What rank 0 alone does beside training: record, save checkpoints and evaluate along the way.
/// The other data-parallel ranks train without it.
pub struct Lead<'a, 'h> {
    pub recorder: &'a mut dyn Recorder,
    pub on_eval: &'a mut EvalHook<'h>,
}

/// What stage 2 trains on: the same for every data-parallel rank.
pub struct TrainJob<'a> {
    pub tokens: &'a TrainTokens<'a>,
    pub train: &'a ImageSet,
    pub run: &'a PlannedRun,
    pub tok: &'a Tokenizer,
    /// where checkpoints go (the training identity's folder)
    pub dir: &'a Path,
    pub quiet: bool,
}

/// Stage 2: train the generator, resuming from its checkpoint when there is one.
///
/// This is one rank of `ranks` (see [`crate::train::collective`]): it computes its share of every
/// batch, and the ranks sum their losses and gradients before the step. Rank 0 alone is given
/// the [`Lead`]: it records, saves checkpoints and evaluates. One rank alone
/// ([`Solo`](crate::train::collective::Solo)) is the whole training.
pub fn train_generator(
    job: &TrainJob,
    generator: &Generator,
    varmap: &VarMap,
    device: &Device,
    ranks: &dyn Collective,
    mut lead: Option<Lead>,
) -> Result<Option<Ema>> {
    let TrainJob {
        tokens,
        train,
        run,
        tok,
        dir,
        quiet,
    } = *job;
    let t = &run.spec.train;
    let eval_every = run.spec.eval.every;
    if lead.is_some() != (ranks.rank() == 0) {
        return Err(Error::Other(format!(
            "data-parallel rank {} was {} the lead: rank 0, and it alone, records and checkpoints",
            ranks.rank(),
            if lead.is_some() { "given" } else { "not given" }
        )));
    }
    let Some(shard) = Shard::of(ranks.rank(), ranks.world(), t.batch) else {
        return Err(Error::Usage(format!(
            "train.batch = {} cannot be shared by {} data-parallel ranks: the ranks must divide it",
            t.batch,
            ranks.world()
        )));
    };
    let mut opt = AdamW::new(varmap, t.weight_decay, 0.9, 0.95)?;
    let mut ema = if t.ema > 0.0 {
        Some(Ema::new(varmap, t.ema)?)
    } else {
        None
    };
    let vars: Vec<_> = opt.vars().cloned().collect();
    let mut rng = Rng::new(run.seed ^ 0x5EED_0001);
    let mut start = 0;
    let mut sums = LogSums::default();
    let loaded = load_in_rank_order(dir, varmap, &mut opt, ema.as_mut(), ranks)?;
    if let (Some(note), Some(lead)) = (&loaded.recovered, lead.as_mut()) {
        // damaged checkpoints: the run went on from the previous one or from step 0; say so on it
        lead.recorder.checkpoint_recovered(note)?;
    }
    if let Some(resume) = loaded.resume {
        start = resume.step;
        if let Some(saved) = resume.rng {
            rng = saved;
        }
        // checkpoints of earlier versions (and of log boundaries) carry no partial sums
        sums = serde_json::from_value(resume.extra).unwrap_or_default();
        if let Some(lead) = lead.as_mut() {
            lead.recorder.discard_after(resume.step)?;
        }
    }
    let mut order = DataOrder::new(run.seed, train.n);
    let pb = spinner(
        quiet || lead.is_none(),
        t.steps as u64,
        format!("training {} · {}", run.cell, run.arm.as_str()),
    );
    pb.set_position(start as u64);
    let (mut loss_sum, mut norm_sum, mut count) = (sums.loss, sums.grad_norm, sums.count);
    let every = if t.checkpoint_every == 0 {
        t.steps
    } else {
        t.checkpoint_every
    };
    for step in start..t.steps {
        // the whole batch's images, labels and flips; this rank's share of them
        let idx = order.batch(step, t.batch);
        let flips = tokens.flips(run.seed, step, idx.len());
        let (idx, flips) = (shard.take(&idx, 1), shard.take(&flips, 1));
        let labels: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
        let dims = (tok.seq_len(), tok.token_dim());
        let batch = tokens.batch(&idx, &flips, dims, device, &mut rng, shard)?;
        let loss = generator.loss_shard(&batch, &labels, &mut rng, shard)?;
        let mut grads = loss.backward()?;
        // the ranks' losses add up to the batch's; a stop (SIGINT/SIGTERM) seen by any rank
        // stops all of them after this step
        let stop_here = crate::stop::requested();
        let mut shared = [
            loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
            f32::from(u8::from(stop_here.is_some())),
        ];
        ranks.all_reduce_sum(&mut shared)?;
        let value = shared[0];
        if !value.is_finite() {
            return Err(crate::train::TrainError::Diverged { step, loss: value }.into());
        }
        ranks.sum_gradients(&mut grads, &vars)?;
        let lr = lr_at(step, t);
        let norm = opt.clipped_step(&grads, t.grad_clip, lr)?;
        if let Some(ema) = ema.as_mut() {
            ema.update(step + 1)?;
        }
        loss_sum += value as f64;
        norm_sum += norm;
        count += 1;
        if (step + 1) % t.log_every == 0 || step + 1 == t.steps {
            if let Some(lead) = lead.as_mut() {
                let s = step + 1;
                lead.recorder
                    .log("train/loss", s, loss_sum / count as f64)?;
                lead.recorder
                    .log("train/grad_norm", s, norm_sum / count as f64)?;
                lead.recorder.log("train/lr", s, lr)?;
            }
            pb.set_message(format!(
                "{} · {} · loss {:.4}",
                run.cell,
                run.arm.as_str(),
                loss_sum / count as f64
            ));
            (loss_sum, norm_sum, count) = (0.0, 0.0, 0);
        }
        pb.set_position(step as u64 + 1);
        let stop = match shared[1] > 0.0 {
            true => Some(stop_here.or_else(crate::stop::requested).unwrap_or(15)),
            false => None,
        };
        let checkpoint = (step + 1) % every == 0 || step + 1 == t.steps || stop.is_some();
        if let (Some(lead), true) = (lead.as_mut(), checkpoint) {
            lead.recorder.flush()?;
            // the running log averages go with the checkpoint, so a resumed run logs the same
            let partial = LogSums {
                loss: loss_sum,
                grad_norm: norm_sum,
                count,
            };
            Checkpoint::save(dir, varmap, &opt, ema.as_ref(), step + 1, &rng, &partial)?;
        }
        if let Some(sig) = stop {
            pb.finish_and_clear();
            return Err(crate::stop::Stopped(sig).into());
        }
        // the final evaluation happens after training, with the full sample count
        let evaluate = eval_every > 0 && (step + 1) % eval_every == 0 && step + 1 < t.steps;
        if let (Some(lead), true) = (lead.as_mut(), evaluate) {
            pb.set_message(format!("{} · {} · evaluating", run.cell, run.arm.as_str()));
            (lead.on_eval)(step + 1, varmap, ema.as_ref())?;
        }
    }
    if let Some(lead) = lead.as_mut() {
        lead.recorder.flush()?;
    }
    pb.finish_and_clear();
    Ok(ema)
}

/// Stage 2 over the data-parallel ranks of `train.devices`: rank 0 trains `model` (the
/// generator, its variables and their device) here, with the `lead`; each other rank trains its
/// own copy, built from `cfg` and the run's seed on its device, on a thread. A rank that fails
/// stops the others at their next sum; its error is returned.
pub fn train_data_parallel(
    job: &TrainJob,
    cfg: &GeneratorConfig,
    (generator, varmap, device): (&Generator, &VarMap, &Device),
    lead: Lead,
) -> Result<Option<Ema>> {
    let names = &job.run.spec.train.devices;
    let devices = names[1..]
        .iter()
        .map(|name| crate::device::parse_device(name))
        .collect::<Result<Vec<_>>>()?;
    let group = LocalGroup::new(names.len());
    std::thread::scope(|s| {
        let others: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(i, dev)| {
                let group = &group;
                s.spawn(move || -> Result<()> {
                    let rank = group.rank(i + 1);
                    let varmap = VarMap::new();
                    let vb = seeded_var_builder(&varmap, job.run.seed, DType::F32, dev);
                    let generator = Generator::new(cfg, vb)?;
                    let quiet = TrainJob {
                        quiet: true,
                        ..*job
                    };
                    train_generator(&quiet, &generator, &varmap, dev, &rank, None)?;
                    rank.finish();
                    Ok(())
                })
            })
            .collect();
        let rank = group.rank(0);
        let lead = train_generator(job, generator, varmap, device, &rank, Some(lead));
        if lead.is_ok() {
            rank.finish();
        } else {
            drop(rank); // the other ranks stop at their next sum
        }
        let mut failure = None;
        for (i, h) in others.into_iter().enumerate() {
            let outcome = h
                .join()
                .unwrap_or_else(|_| Err(Error::Other(format!("rank {} panicked", i + 1))));
            if let Err(e) = outcome {
                failure.get_or_insert(e);
            }
        }
        // a rank that failed on its own comes first; the others' sums then failed
        let collective = |e: &Error| matches!(e, Error::Collective(_));
        match (lead, failure) {
            (Err(e), Some(f)) if collective(&e) => Err(f),
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
            (Ok(ema), None) => Ok(ema),
        }
    })
}

/// Load the training's checkpoint on every rank: rank 0 first (it alone repairs a damaged one),
/// then the others, which must resume at rank 0's step. Ranks that see different checkpoint
/// folders (a root that is not shared between nodes) fail here instead of training apart.
fn load_in_rank_order(
    dir: &Path,
    varmap: &VarMap,
    opt: &mut AdamW,
    ema: Option<&mut Ema>,
    ranks: &dyn Collective,
) -> Result<Loaded> {
    if ranks.world() == 1 {
        return Ok(Checkpoint::load(dir, varmap, opt, ema)?);
    }
    let step_of = |l: &Loaded| l.resume.as_ref().map_or(0, |r| r.step);
    if ranks.rank() == 0 {
        let loaded = Checkpoint::load(dir, varmap, opt, ema)?;
        broadcast_bytes(ranks, &mut (step_of(&loaded) as u64).to_le_bytes())?;
        return Ok(loaded);
    }
    let mut lead = [0u8; 8];
    broadcast_bytes(ranks, &mut lead)?;
    // read only: a rank that misreads a good checkpoint must not remove it for every rank
    let loaded = Checkpoint::load_with(dir, varmap, opt, ema, false)?;
    let (theirs, ours) = (u64::from_le_bytes(lead) as usize, step_of(&loaded));
    if theirs != ours {
        return Err(Error::Other(format!(
            "data-parallel rank {} found the checkpoint in {} at step {ours}, rank 0 at step \
             {theirs}: the ranks must share one root (on several machines, a shared folder)",
            ranks.rank(),
            dir.display()
        )));
    }
    Ok(loaded)
}

/// The running sums of the training log between two log steps, saved with a checkpoint taken
/// between them (a stop), so that the resumed run logs the same averages.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct LogSums {
    loss: f64,
    grad_norm: f64,
    count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{generate, SyntheticConfig};
    use crate::train::collective::Solo;
    use crate::train::sorted_vars;

    /// A training log kept in memory, as a database would keep it: points reach `stored` only
    /// when flushed, and a process that dies loses the rest.
    #[derive(Default)]
    struct Memory {
        logged: Vec<(&'static str, usize, f64)>,
        stored: usize,
        resumed: Vec<usize>,
        notes: Vec<String>,
    }

    impl Recorder for Memory {
        fn discard_after(&mut self, step: usize) -> Result<()> {
            self.logged.retain(|&(_, s, _)| s <= step);
            self.stored = self.logged.len();
            self.resumed.push(step);
            Ok(())
        }
        fn checkpoint_recovered(&mut self, note: &str) -> Result<()> {
            self.notes.push(note.to_owned());
            Ok(())
        }
        fn log(&mut self, key: &'static str, step: usize, value: f64) -> Result<()> {
            self.logged.push((key, step, value));
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            self.stored = self.logged.len();
            Ok(())
        }
    }

    /// Trains the tiny spec's MAR Diffusion Loss run (6 steps, a checkpoint and an evaluation
    /// every 3) into `dir` as a fresh process would, recording into `memory`; `fail_eval_at`
    /// makes the evaluation at that step fail, which stops the training there; without `lead`
    /// the (only) rank is not given the [`Lead`]. Returns the outcome and the weights.
    fn train_tiny(
        dir: &Path,
        memory: &mut Memory,
        fail_eval_at: Option<usize>,
        lead: bool,
    ) -> anyhow::Result<(Result<()>, Vec<Vec<f32>>)> {
        let source = include_str!("../../../experiments/tiny.toml");
        let set = [
            "generator.kind=\"mar\"",
            "grid={}",
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.log_every=1",
            "eval.every=3",
        ];
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        let spec = crate::spec::load_str("tiny.toml", source, &set)?;
        let run = spec
            .runs()
            .into_iter()
            .find(|r| r.arm == crate::spec::Arm::Diffusion)
            .expect("a Diffusion Loss run");
        let d = &run.spec.data;
        let (train, _) = generate(&SyntheticConfig {
            classes: 3,
            image_size: d.image_size,
            train: 120,
            test: 1,
            seed: 0,
        });
        let dev = Device::Cpu;
        let tok = Tokenizer::fit(
            run.tokenizer(),
            &train,
            run.seed,
            &dev,
            None,
            &mut |_, _| {},
        )?;
        let data = tok.encode(&train)?;
        let tokens = TrainTokens::new(&tok, &data, &train, &run)?;
        let cfg = crate::generator::config(&run, &tok, 3);
        let varmap = VarMap::new();
        let generator = Generator::new(
            &cfg,
            seeded_var_builder(&varmap, run.seed, DType::F32, &dev),
        )?;
        let job = TrainJob {
            tokens: &tokens,
            train: &train,
            run: &run,
            tok: &tok,
            dir,
            quiet: true,
        };
        let mut on_eval = |step: usize, _: &VarMap, _: Option<&Ema>| match fail_eval_at {
            Some(at) if at == step => Err(Error::Other(format!("evaluation at step {step}"))),
            _ => Ok(()),
        };
        let lead_given = lead;
        let lead = Lead {
            recorder: memory,
            on_eval: &mut on_eval,
        };
        let lead = Some(lead).filter(|_| lead_given);
        let outcome = train_generator(&job, &generator, &varmap, &dev, &Solo, lead);
        // a process that dies keeps only what it stored
        memory.logged.truncate(memory.stored);
        let mut weights = Vec::new();
        for (_, var) in sorted_vars(&varmap)? {
            weights.push(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((outcome.map(|_| ()), weights))
    }

    /// Ranks load the checkpoint in order, rank 0 first, and agree on its step: two ranks that see
    /// the same folder resume together (here at step 16 777 221, beyond f32's exact integers,
    /// which the collective sums); a rank that sees another folder fails, naming both steps.
    #[test]
    fn ranks_resume_at_rank_zeros_step_or_fail() -> anyhow::Result<()> {
        use crate::train::collective::LocalGroup;
        let (shared, other) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let model = || -> anyhow::Result<(VarMap, AdamW)> {
            let varmap = VarMap::new();
            varmap.get((2, 3), "w", candle_nn::init::ZERO, DType::F32, &Device::Cpu)?;
            let opt = AdamW::new(&varmap, 0.0, 0.9, 0.95)?;
            Ok((varmap, opt))
        };
        let step = (1 << 24) + 5;
        let (varmap, opt) = model()?;
        Checkpoint::save(shared.path(), &varmap, &opt, None, step, &Rng::new(1), &())?;
        let load = |dirs: [&Path; 2]| -> Vec<Result<usize>> {
            let group = LocalGroup::new(2);
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|r| {
                        let (group, dir) = (&group, dirs[r]);
                        s.spawn(move || {
                            let rank = group.rank(r);
                            let (varmap, mut opt) =
                                model().map_err(|e| Error::Other(e.to_string()))?;
                            let loaded = load_in_rank_order(dir, &varmap, &mut opt, None, &rank);
                            if loaded.is_ok() {
                                rank.finish();
                            }
                            Ok(loaded?.resume.map_or(0, |r| r.step))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank"))
                    .collect()
            })
        };
        let together = load([shared.path(), shared.path()]);
        assert_eq!(
            together.into_iter().collect::<Result<Vec<_>>>()?,
            [step, step]
        );
        let apart = load([shared.path(), other.path()]);
        assert_eq!(*apart[0].as_ref().expect("rank 0 loads"), step);
        let err = apart[1]
            .as_ref()
            .expect_err("rank 1 sees no checkpoint")
            .to_string();
        assert!(err.contains("at step 0, rank 0 at step 16777221"), "{err}");
        Ok(())
    }

    /// Stage 2 without a database. A training that stops after its checkpoint at step 3 (here
    /// through a failing evaluation) has stored its curves up to that checkpoint; started again,
    /// it resumes at step 3 and ends with the curves and weights of an uninterrupted one. A
    /// damaged latest checkpoint is passed over, and the recorder is told.
    #[test]
    fn a_stopped_training_resumes_to_the_curves_and_weights_of_an_uninterrupted_one(
    ) -> anyhow::Result<()> {
        let (clean_dir, dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let mut clean = Memory::default();
        let (outcome, clean_weights) = train_tiny(clean_dir.path(), &mut clean, None, true)?;
        outcome?;
        let steps: Vec<usize> = clean.logged.iter().map(|p| p.1).collect();
        assert_eq!(
            steps,
            [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6]
        );
        assert!(clean.resumed.is_empty() && clean.notes.is_empty());

        let mut stopped = Memory::default();
        let (outcome, _) = train_tiny(dir.path(), &mut stopped, Some(3), true)?;
        let failed = outcome.expect_err("the evaluation at step 3 fails");
        assert!(
            failed.to_string().contains("evaluation at step 3"),
            "{failed}"
        );
        assert_eq!(
            stopped.logged,
            clean.logged[..9],
            "stored up to the checkpoint"
        );
        let (outcome, weights) = train_tiny(dir.path(), &mut stopped, None, true)?;
        outcome?;
        assert_eq!(stopped.resumed, [3]);
        assert_eq!(stopped.logged, clean.logged, "the same curves, bit for bit");
        assert_eq!(weights, clean_weights, "the same weights, bit for bit");

        // the step-6 checkpoint damaged: the run goes back to step 3 and says so
        let latest = dir.path().join(Checkpoint::weights_name(6));
        let mut bytes = std::fs::read(&latest)?;
        let last = bytes.len() - 3;
        bytes[last] ^= 0x55;
        std::fs::write(&latest, &bytes)?;
        let (outcome, weights) = train_tiny(dir.path(), &mut stopped, None, true)?;
        outcome?;
        assert_eq!(stopped.resumed, [3, 3]);
        assert_eq!(stopped.notes.len(), 1, "{:?}", stopped.notes);
        assert!(stopped.notes[0].contains("step 3"), "{:?}", stopped.notes);
        assert_eq!(stopped.logged, clean.logged);
        assert_eq!(weights, clean_weights);

        // rank 0 without the lead would train without checkpoints or curves: refused
        let (outcome, _) = train_tiny(dir.path(), &mut Memory::default(), None, false)?;
        let refused = outcome.expect_err("rank 0 needs the lead");
        assert!(refused.to_string().contains("rank 0"), "{refused}");
        Ok(())
    }

    /// Batches take each image's tokens from the plain or the mirrored side as flipped, and with
    /// posterior standard deviations draw mean + std·ε (exactly the mean where std is 0).
    #[test]
    fn training_batches_flip_and_draw_from_the_posterior() -> Result<()> {
        let plain = TokenData::Continuous(vec![1.0, 2.0, 3.0, 4.0]); // 2 images × 2 tokens × 1
        let mirrored = TokenData::Continuous(vec![-1.0, -2.0, -3.0, -4.0]);
        let zero = vec![0.0; 4];
        let t = TrainTokens {
            plain: &plain,
            plain_std: Some(zero.clone()),
            mirrored: Some((mirrored, Some(vec![0.5; 4]))),
        };
        let mut rng = Rng::new(1);
        let dev = Device::Cpu;
        let whole = Shard::whole(2);
        let Tokens::Continuous(b) =
            t.batch(&[1, 0], &[false, false], (2, 1), &dev, &mut rng, whole)?
        else {
            panic!("continuous")
        };
        assert_eq!(b.flatten_all()?.to_vec1::<f32>()?, vec![3.0, 4.0, 1.0, 2.0]);
        // two ranks' shares of a batch draw the whole batch's posterior noise
        let both = t.batch(
            &[1, 0],
            &[true, true],
            (2, 1),
            &dev,
            &mut rng.clone(),
            whole,
        )?;
        let halves: Vec<f32> = (0..2)
            .flat_map(|r| {
                let shard = Shard::of(r, 2, 2).expect("divides");
                let part = t
                    .batch(&[[1, 0][r]], &[true], (2, 1), &dev, &mut rng.clone(), shard)
                    .expect("batch");
                part.tensor()
                    .flatten_all()
                    .expect("flat")
                    .to_vec1::<f32>()
                    .expect("values")
            })
            .collect();
        assert_eq!(both.tensor().flatten_all()?.to_vec1::<f32>()?, halves);
        let Tokens::Continuous(b) =
            t.batch(&[1, 0], &[true, false], (2, 1), &dev, &mut rng, whole)?
        else {
            panic!("continuous")
        };
        let v = b.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(v[2..], [1.0, 2.0], "std 0: the mean itself");
        assert!(
            v[0] != -3.0 && (v[0] + 3.0).abs() < 3.0,
            "a draw around -3: {v:?}"
        );
        // flips: a fair coin per image, the same for the same (seed, step)
        let f = t.flips(7, 3, 1000);
        assert_eq!(f, t.flips(7, 3, 1000));
        assert_ne!(f, t.flips(7, 4, 1000));
        let share = f.iter().filter(|&&x| x).count() as f64 / 1000.0;
        assert!((share - 0.5).abs() < 0.06, "{share}");
        Ok(())
    }
}
