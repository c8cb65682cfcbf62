//! The runner: turns a loaded spec into finished runs. For each planned run it makes sure the
//! tokenizer and the feature net exist (stage 1, cached by hash and shared), trains the generator
//! (stage 2, `train::generator`, checkpointed), samples (stage 3, `sample`), evaluates and records
//! everything through `db`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::record::{now, record_artifact, RunRecorder};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use db::{Db, MetricPoint, NewRun, RunKind, RunStatus};
use models::init::seeded_var_builder;
use models::Generator;

use crate::data::{self, Dataset};
use crate::device::{device_label, parse_device, pid_alive, Environment};
use crate::eval::{self, EvalNet, FewSamples, Net, TrainableClassifier};
use crate::identity;
use crate::layout::Layout;
use crate::lock;
use crate::sample::{sample_images, save_class_grid};
use crate::spec::{self, Arm, LoadedSpec, PlannedRun, Spec, TokenizerKind};
use crate::tokenize::stage::TokenizerJob;
use crate::tokenize::{self, TokenData, Tokenizer};
use crate::train::collective::Solo;
use crate::train::generator::{train_data_parallel, train_generator, Lead, TrainJob, TrainTokens};
use crate::train::ranks::{train_process_ranks, ProcessRanks, RankFiles};
use crate::train::Ema;

pub use crate::error::{describe, Error, Result};

/// The experiment version this process planned: its runs link to it, whatever version another
/// process sharing the name makes meanwhile.
#[derive(Debug, Clone, Copy)]
struct ExperimentVersion {
    id: i64,
    version: i64,
}

/// What happened to each planned run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run_id: i64,
    pub cell: String,
    pub arm: Arm,
    pub seed: u64,
    pub status: RunStatus,
    pub cached: bool,
    pub fid: Option<f64>,
    pub is: Option<f64>,
    pub seconds: f64,
    pub error: Option<String>,
}

pub struct Runner {
    pub db: Db,
    pub layout: Layout,
    pub env: Environment,
    pub device_override: Option<String>,
    pub quiet: bool,
    /// the database clock when `run_experiment` began
    since: String,
    datasets: HashMap<String, std::rc::Rc<Dataset>>,
    tokenizers: HashMap<String, std::rc::Rc<(Tokenizer, TokenData)>>,
    feature_nets: HashMap<String, std::rc::Rc<EvalNet>>,
    /// `--nproc N`: each generator training runs on N processes, this one rank 0
    pub process_ranks: Option<ProcessRanks>,
}

impl Runner {
    pub fn open(layout: Layout, device_override: Option<String>, quiet: bool) -> Result<Self> {
        let db = layout.open_db()?;
        Ok(Runner {
            db,
            layout,
            env: Environment::detect(),
            device_override,
            quiet,
            since: String::new(),
            datasets: HashMap::new(),
            tokenizers: HashMap::new(),
            feature_nets: HashMap::new(),
            process_ranks: None,
        })
    }

    fn say(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Run (or skip, when finished) every run of the spec; never stops at the first failure.
    pub fn run_experiment(&mut self, loaded: &LoadedSpec) -> Result<Vec<RunOutcome>> {
        let reaped = self.db.reap_dead_runs(&self.env.host, &pid_alive)?;
        if reaped > 0 {
            self.say(format!(
                "{reaped} run(s) left running by a dead process marked interrupted"
            ));
        }
        let exp = self.db.upsert_experiment(
            &loaded.base.name,
            &loaded.path.display().to_string(),
            &loaded.source,
        )?;
        let runs = loaded.runs();
        let total = runs.len();
        // the experiment's configuration is the set of its runs' identities (data included): a
        // different one under the same name is a new version, and reports show one version
        let mut identities = Vec::with_capacity(total);
        for run in &runs {
            let fingerprint = self.dataset(&run.spec)?.fingerprint.clone();
            identities.push(run.hash(&fingerprint));
        }
        identities.sort();
        let config_hash = identity::content_hash(&serde_json::json!(identities));
        let version = self
            .db
            .experiment_version(exp, &config_hash, &loaded.source)?;
        let exp = ExperimentVersion { id: exp, version };
        if version > 1 {
            self.say(format!(
                "experiment '{}': version {version} (its configuration differs from version {}; \
                 reports show the latest version, `ablate report --version N` an earlier one)",
                loaded.base.name,
                version - 1
            ));
        }
        // failures another process records from now on are reported, not retried (see attempt)
        self.since = self.db.now()?;
        let mut outcomes = Vec::new();
        // runs another process holds are left for a second pass, by which time they are usually
        // finished: N processes on one spec share its runs without any other coordination
        let mut deferred = Vec::new();
        for (i, run) in runs.iter().enumerate() {
            crate::stop::check()?;
            match self.attempt(exp, (i, total), run, false)? {
                Some(outcome) => outcomes.push(outcome),
                None => deferred.push(i),
            }
        }
        for i in deferred {
            crate::stop::check()?;
            if let Some(outcome) = self.attempt(exp, (i, total), &runs[i], true)? {
                outcomes.push(outcome);
            }
        }
        Ok(outcomes)
    }

    /// Run one planned run unless it is finished. Without `wait`, a run (or its training) that
    /// another process holds is left alone (None); with `wait`, this waits for that process and
    /// then finds the run finished, or runs it.
    fn attempt(
        &mut self,
        exp: ExperimentVersion,
        (i, total): (usize, usize),
        run: &PlannedRun,
        wait: bool,
    ) -> Result<Option<RunOutcome>> {
        let started = Instant::now();
        // train.devices names every data-parallel rank's device, rank 0's first
        let device_name = match run.spec.train.devices.first() {
            Some(first) => first.clone(),
            None => self
                .device_override
                .clone()
                .unwrap_or_else(|| run.spec.device.clone()),
        };
        // the data's content is part of a run's identity: read it before looking the run up, so
        // that changed files under the same path are a new run and unreadable ones an error
        let data_fingerprint = self.dataset(&run.spec)?.fingerprint.clone();
        let hash = run.hash(&data_fingerprint);
        let params = serde_json::to_value(&run.spec)?;
        let name = format!("{} · {} · seed {}", run.cell, run.arm.as_str(), run.seed);
        let run_id = self.db.create_run_in(
            exp.id,
            Some(exp.version),
            &NewRun {
                hash: &hash,
                kind: RunKind::Generator,
                name: &name,
                cell: &run.cell,
                arm: Some(run.arm.as_str()),
                seed: run.seed as i64,
                params: &params,
                git_commit: self.env.git_commit.as_deref(),
                git_dirty: self.env.git_dirty,
                host: &self.env.host,
                device: &device_name,
                version: env!("CARGO_PKG_VERSION"),
            },
        )?;
        let mut outcome = RunOutcome {
            run_id,
            cell: run.cell.clone(),
            arm: run.arm,
            seed: run.seed,
            status: RunStatus::Queued,
            cached: false,
            fid: None,
            is: None,
            seconds: 0.0,
            error: None,
        };
        // this run and its training: another process may hold them (N processes, one spec)
        let train_lock = format!("train-{}", run.train_hash(&data_fingerprint));
        let label = format!("[{}/{total}] {name}", i + 1);
        let Some(_run_held) = self.take_lock(&hash, wait, &label)? else {
            return Ok(None);
        };
        let Some(_train_held) =
            self.take_lock(&train_lock, wait, &format!("{label} (its training)"))?
        else {
            return Ok(None);
        };
        // a process sharing this spec tried it while this one was running, and it failed: report
        // that rather than fail it a second time (a later `ablate run` retries it)
        if let Some(row) = self.db.run(run_id)? {
            let failed_meanwhile = row.status == RunStatus::Failed
                && !self.since.is_empty()
                && row
                    .ended_at
                    .as_deref()
                    .is_some_and(|t| t >= self.since.as_str());
            if failed_meanwhile {
                let error = row.error.unwrap_or_default();
                self.say(format!(
                    "[{}/{total}] {name}: failed in another process: {error}",
                    i + 1
                ));
                outcome.status = RunStatus::Failed;
                outcome.error = Some(error);
                return Ok(Some(outcome));
            }
        }
        if self.is_finished(run_id)? {
            let evals = self.db.evals_for_run(run_id)?;
            let last = |metric: &str| {
                let values = evals.iter().filter(|e| e.metric == metric);
                values.map(|e| e.value).next_back()
            };
            (outcome.fid, outcome.is) = (last("fid"), last("is"));
            outcome.status = RunStatus::Finished;
            outcome.cached = true;
            self.say(format!(
                "[{}/{total}] {name}: finished earlier (run {run_id}), skipped",
                i + 1
            ));
            return Ok(Some(outcome));
        }
        self.say(format!("[{}/{total}] {name} (run {run_id}, {hash})", i + 1));
        self.start(run_id, &device_name)?;
        match self.execute(exp, run_id, &hash, run, &device_name) {
            Ok((fid, is)) => {
                self.db.finish_run(run_id)?;
                outcome.status = RunStatus::Finished;
                outcome.fid = Some(fid);
                outcome.is = Some(is);
                self.say(format!(
                    "    done in {:.1} s: FID {fid:.2}, IS {is:.2}",
                    started.elapsed().as_secs_f64()
                ));
            }
            Err(e) => {
                if let Err(stopped) = crate::stop::check() {
                    // a stop was asked for: the training loops (generator, tokenizer fit)
                    // checkpointed where they were, and the next `ablate run` resumes
                    self.db.mark_interrupted(run_id)?;
                    self.say(format!("    interrupted: {e}"));
                    return Err(stopped.into());
                }
                let msg = describe(&e);
                self.db.fail_run(run_id, &msg)?;
                self.say(format!("    failed: {msg}"));
                outcome.status = RunStatus::Failed;
                outcome.error = Some(msg);
            }
        }
        outcome.seconds = started.elapsed().as_secs_f64();
        Ok(Some(outcome))
    }

    fn dataset(&mut self, spec: &Spec) -> Result<std::rc::Rc<Dataset>> {
        let key = serde_json::to_string(&spec.data)?;
        if let Some(d) = self.datasets.get(&key) {
            return Ok(d.clone());
        }
        let d = std::rc::Rc::new(data::load(&spec.data)?);
        self.datasets.insert(key, d.clone());
        Ok(d)
    }

    /// Stage 1a: the tokenizer for this run's arm, fitted once per (data, tokenizer, seed).
    fn tokenizer(
        &mut self,
        exp: ExperimentVersion,
        run: &PlannedRun,
        ds: &Dataset,
        fnet: &EvalNet,
        device: &Device,
    ) -> Result<std::rc::Rc<(Tokenizer, TokenData)>> {
        let tspec = run.tokenizer();
        let seed = tspec.seed.unwrap_or(run.seed);
        let config = identity::tokenizer(tspec, seed, ds);
        let hash = tokenizer_hash(run, ds);
        // recorded (or linked to this experiment) whether or not it is fitted now
        let name = format!("tokenizer {} · seed {seed}", run.tokenizer_name());
        let device_name = device_label(device);
        let id = self.db.create_run_in(
            exp.id,
            Some(exp.version),
            &self.stage_run(
                &hash,
                RunKind::Tokenizer,
                &name,
                seed,
                &config,
                &device_name,
            ),
        )?;
        if let Some(t) = self.tokenizers.get(&hash) {
            return Ok(t.clone());
        }
        let path = self.layout.tokenizer(&hash);
        let what = format!("    tokenizer {}", run.tokenizer_name());
        let _held = self.wait_lock(&hash, &what)?;
        let finished = self.is_finished(id)?;
        let cached = match tspec.kind {
            // nothing fitted, nothing stored
            TokenizerKind::Patch => true,
            _ => path.exists() && cache_intact(&self.db, id, "tokenizer", &path, "tokenizer")?,
        };
        let (tok, data) = if finished && cached {
            let tok = Tokenizer::load(tspec, ds.train.channels, ds.train.size, &path, device)?;
            let data = tok.encode(&ds.train)?;
            (tok, data)
        } else {
            let job = TokenizerJob {
                id,
                seed,
                spec: tspec,
                name: run.tokenizer_name(),
                path: &path,
                checkpoints: &self.layout.tokenizer_checkpoints(&hash),
                quiet: self.quiet,
            };
            self.start(id, &device_name)?;
            let fitted = tokenize::stage::fit(&self.db, &job, ds, fnet, device, &|m| self.say(m));
            self.settle_stage(id, fitted)?
        };
        let t = std::rc::Rc::new((tok, data));
        self.tokenizers.insert(hash, t.clone());
        Ok(t)
    }

    /// Take lock `name` (see [`crate::lock`]). When another process holds it: wait for it
    /// (`wait`), or give up (None) so that the caller can do other work first; `what` names it in
    /// the message.
    fn take_lock(&self, name: &str, wait: bool, what: &str) -> Result<Option<lock::Lock>> {
        if wait {
            return self.wait_lock(name, what).map(Some);
        }
        let held = lock::try_lock(&self.layout, &self.db, name)?;
        if held.is_none() {
            self.say(format!(
                "{what}: running in another process; coming back to it"
            ));
        }
        Ok(held)
    }

    /// Take lock `name`, waiting (with a message naming `what`) while another process holds it;
    /// for a shared stage the wait usually ends with the stage finished, to be reused.
    fn wait_lock(&self, name: &str, what: &str) -> Result<lock::Lock> {
        if let Some(held) = lock::try_lock(&self.layout, &self.db, name)? {
            return Ok(held);
        }
        self.say(format!("{what}: waiting for the other process running it"));
        lock::lock(&self.layout, &self.db, name)
    }

    /// The result of a shared stage's work (tokenizer fit, feature net) for its run `id`: a
    /// failure marks the run failed, or interrupted when a stop was asked for, before it goes
    /// on to the generator run that needed the stage.
    fn settle_stage<T>(&self, id: i64, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if crate::stop::check().is_err() {
                self.db.mark_interrupted(id)?;
            } else {
                self.db.fail_run(id, &describe(e))?;
            }
        }
        result
    }

    /// Mark a run as running here: this process, host, device and code version.
    fn start(&self, run_id: i64, device: &str) -> Result<()> {
        self.db.start_run(
            run_id,
            self.env.pid,
            &self.env.host,
            device,
            self.env.git_commit.as_deref(),
            self.env.git_dirty,
        )?;
        Ok(())
    }

    fn is_finished(&self, run_id: i64) -> Result<bool> {
        Ok(self
            .db
            .run(run_id)?
            .map(|r| r.status == RunStatus::Finished)
            .unwrap_or(false))
    }

    /// The row of a shared stage (tokenizer, feature net) computed on `device`.
    fn stage_run<'a>(
        &'a self,
        hash: &'a str,
        kind: RunKind,
        name: &'a str,
        seed: u64,
        params: &'a serde_json::Value,
        device: &'a str,
    ) -> NewRun<'a> {
        NewRun {
            hash,
            kind,
            name,
            cell: "",
            arm: None,
            seed: seed as i64,
            params,
            git_commit: self.env.git_commit.as_deref(),
            git_dirty: self.env.git_dirty,
            host: &self.env.host,
            device,
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// Stage 1b: the feature net, trained once per (data, eval settings), and the reference
    /// statistics of the held-out split.
    fn feature_net(
        &mut self,
        exp: ExperimentVersion,
        spec: &Spec,
        ds: &Dataset,
        device: &Device,
    ) -> Result<std::rc::Rc<EvalNet>> {
        match spec.eval.feature_net {
            spec::FeatureNetSpec::Classifier => self.classifier_net(exp, spec, ds, device),
            spec::FeatureNetSpec::Inception => self.inception_net(spec, ds, device),
        }
    }

    /// The Inception-v3 FID network from `eval.inception_weights` (identified by the file's
    /// sha256), with the reference statistics of the test split.
    fn inception_net(
        &mut self,
        spec: &Spec,
        ds: &Dataset,
        device: &Device,
    ) -> Result<std::rc::Rc<EvalNet>> {
        let path = match &spec.eval.inception_weights {
            Some(p) => PathBuf::from(p),
            None => self.layout.inception_weights(None).map_err(|e| {
                Error::Usage(format!(
                    "eval.feature_net = \"inception\" needs eval.inception_weights: {e}"
                ))
            })?,
        };
        if !path.is_file() {
            return Err(Error::Usage(format!(
                "eval.inception_weights: {}: no such file",
                path.display()
            )));
        }
        let sha = db::files::sha256_file(&path).map_err(Error::file(&path))?;
        let net_id = format!("inception-{}", &sha[..16]);
        let convention = spec.eval.convention.to_model();
        let key = format!("{net_id}:{}:{}", convention.as_str(), ds.fingerprint);
        if let Some(f) = self.feature_nets.get(&key) {
            return Ok(f.clone());
        }
        let net = eval::inception::load_inception(&path, device)?;
        let net = Net::Inception {
            net: Box::new(net),
            convention,
            // images per forward pass
            batch: 16,
        };
        let f = std::rc::Rc::new(eval::stage::with_reference(
            &self.layout,
            net,
            "inception".into(),
            &net_id,
            ds,
            &|m| self.say(m),
        )?);
        self.feature_nets.insert(key, f.clone());
        Ok(f)
    }

    fn classifier_net(
        &mut self,
        exp: ExperimentVersion,
        spec: &Spec,
        ds: &Dataset,
        device: &Device,
    ) -> Result<std::rc::Rc<EvalNet>> {
        let config = identity::classifier(&spec.eval, ds);
        let hash = identity::content_hash(&config);
        let name = format!("feature net ({})", ds.name);
        let device_name = device_label(device);
        let id = self.db.create_run_in(
            exp.id,
            Some(exp.version),
            &self.stage_run(
                &hash,
                RunKind::Classifier,
                &name,
                spec.eval.classifier_seed,
                &config,
                &device_name,
            ),
        )?;
        if let Some(f) = self.feature_nets.get(&hash) {
            return Ok(f.clone());
        }
        let path = self.layout.classifier(&hash);
        let mut net = TrainableClassifier::new(ds.train.channels, ds.classes, &spec.eval, device)?;
        let _held = self.wait_lock(&hash, "    the feature net")?;
        let finished = self.is_finished(id)?;
        if finished
            && path.exists()
            && cache_intact(&self.db, id, "checkpoint", &path, "feature net")?
        {
            net.load(&path)?;
        } else {
            self.start(id, &device_name)?;
            let trained = eval::stage::train_feature_net(
                &self.db, id, &mut net, ds, &spec.eval, &path, self.quiet,
            );
            let acc = self.settle_stage(id, trained)?;
            self.say(format!(
                "    feature net trained: test accuracy {:.1}%",
                acc * 100.0
            ));
        }
        let name = format!("classifier:{}", ds.name);
        let net_id = format!("classifier-{hash}");
        let f = std::rc::Rc::new(eval::stage::with_reference(
            &self.layout,
            net.frozen()?,
            name,
            &net_id,
            ds,
            &|m| self.say(m),
        )?);
        self.feature_nets.insert(hash, f.clone());
        Ok(f)
    }

    /// Stages 1–3 of one generator run; returns (FID, IS).
    fn execute(
        &mut self,
        exp: ExperimentVersion,
        run_id: i64,
        hash: &str,
        run: &PlannedRun,
        device_name: &str,
    ) -> Result<(f64, f64)> {
        let device = parse_device(device_name)?;
        self.db.set_stage(run_id, "data")?;
        let ds = self.dataset(&run.spec)?;
        self.db.set_stage(run_id, "feature-net")?;
        let fnet = self.feature_net(exp, &run.spec, &ds, &device)?;
        self.db.set_stage(run_id, "tokenizer")?;
        let tok = self.tokenizer(exp, run, &ds, &fnet, &device)?;
        let tokenizer = &tok.0;
        let train_tokens = TrainTokens::new(tokenizer, &tok.1, &ds.train, run)?;

        self.db.set_stage(run_id, "train")?;
        let t_train = Instant::now();
        let cfg = crate::generator::config(run, tokenizer, ds.classes);
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, run.seed, DType::F32, &device);
        let generator = Generator::new(&cfg, vb)?;
        // what the report needs of the built model: its size (AR against MAR at equal size) and
        // its sequence length (tokens per image, whatever the tokenizer)
        let param_count: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        self.db.set_run_param(
            run_id,
            "model",
            &serde_json::json!({ "param_count": param_count, "seq_len": cfg.seq_len }),
        )?;
        let described = crate::generator::descriptor(run, &cfg, param_count);
        self.db
            .set_run_param(run_id, "descriptor", &serde_json::to_value(&described)?)?;
        // weights live under the training identity, shared by runs that only sample differently
        let dir = self.layout.run_dir(&run.train_hash(&ds.fingerprint));
        let out_dir = self.layout.run_dir(hash);
        let settings = eval::stage::eval_settings(run, &ds, &fnet);
        let db = &self.db;
        let mut on_eval = |step: usize, varmap: &VarMap, ema: Option<&Ema>| -> Result<()> {
            // the model as it would be evaluated now: EMA weights when there are some
            let vb = match ema {
                Some(ema) => {
                    candle_nn::VarBuilder::from_tensors(ema.tensors(), DType::F32, &device)
                }
                None => models::init::frozen_var_builder(varmap, DType::F32, &device)?,
            };
            let model = Generator::new(&cfg, vb)?;
            let count = run.spec.eval.every_count.unwrap_or(run.spec.sample.count);
            let samples = sample_images(&model, tokenizer, run, ds.classes, count, true)?;
            let scores = eval::score(&fnet, &samples, run.spec.eval.is_splits)?;
            eval::stage::record_scores(db, run_id, step as i64, &scores, &settings, &fnet)
        };
        let job = TrainJob {
            tokens: &train_tokens,
            train: &ds.train,
            run,
            tok: tokenizer,
            dir: &dir,
            quiet: self.quiet,
        };
        let mut recorder = RunRecorder::new(&self.db, run_id);
        let lead = Lead {
            recorder: &mut recorder,
            on_eval: &mut on_eval,
        };
        let model = (&generator, &varmap, &device);
        let ema = match (&self.process_ranks, run.spec.train.devices.len()) {
            (Some(launch), _) if launch.nproc * launch.nnodes > 1 => {
                // one process per device of each node: train.devices when it names them, else
                // the run's
                let devices = match run.spec.train.devices.len() {
                    0 => vec![device_name.to_string(); launch.nproc],
                    _ => run.spec.train.devices.clone(),
                };
                self.db.set_run_param(
                    run_id,
                    "data_parallel",
                    &serde_json::json!({
                        "world_size": launch.nproc * launch.nnodes,
                        "nodes": launch.nnodes,
                        "devices": devices,
                        "processes": true,
                        "gradients": crate::train::ranks::gradient_collective(&devices),
                    }),
                )?;
                let files = RankFiles {
                    logs: &self.layout.root.join("logs"),
                    tokenizer: &self.layout.tokenizer(&tokenizer_hash(run, &ds)),
                };
                train_process_ranks(&job, launch, &devices, &files, model, lead)?
            }
            (_, 0 | 1) => train_generator(&job, &generator, &varmap, &device, &Solo, Some(lead))?,
            (_, world) => {
                self.db.set_run_param(
                    run_id,
                    "data_parallel",
                    &serde_json::json!({ "world_size": world, "devices": run.spec.train.devices }),
                )?;
                train_data_parallel(&job, &cfg, model, lead)?
            }
        };
        let weights = dir.join("model.safetensors");
        db::files::write_atomic(&weights, |tmp| varmap.save(tmp)).map_err(Error::file(&weights))?;
        record_artifact(&self.db, run_id, "model", &weights)?;
        // evaluate the EMA weights when there are some (MAR evaluates EMA), on detached tensors
        let eval_vb = match &ema {
            Some(ema) => {
                let path = dir.join("model_ema.safetensors");
                let tensors = ema.tensors();
                db::files::write_atomic(&path, |tmp| candle_core::safetensors::save(&tensors, tmp))
                    .map_err(Error::file(&path))?;
                record_artifact(&self.db, run_id, "model-ema", &path)?;
                candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device)
            }
            None => models::init::frozen_var_builder(&varmap, DType::F32, &device)?,
        };

        let train_s = t_train.elapsed().as_secs_f64();
        self.db.set_stage(run_id, "sample")?;
        let t_sample = Instant::now();
        let frozen = Generator::new(&cfg, eval_vb)?;
        let samples = sample_images(
            &frozen,
            tokenizer,
            run,
            ds.classes,
            run.spec.sample.count,
            self.quiet,
        )?;
        let grid = out_dir.join("samples.png");
        save_class_grid(&grid, &samples, ds.classes, 10)?;
        record_artifact(&self.db, run_id, "samples", &grid)?;

        let sample_s = t_sample.elapsed().as_secs_f64();
        self.db.set_stage(run_id, "eval")?;
        let t_eval = Instant::now();
        let dim = fnet.net.dim();
        if let Some(FewSamples::Singular) = FewSamples::of(samples.n, dim) {
            let warning = FewSamples::Singular.warning("the samples", samples.n, dim);
            self.say(format!("    {warning}"));
        }
        let scores = eval::score(&fnet, &samples, run.spec.eval.is_splits)?;
        let step = run.spec.train.steps as i64;
        eval::stage::record_scores(
            &self.db,
            run_id,
            step,
            &scores,
            &eval::stage::eval_settings(run, &ds, &fnet),
            &fnet,
        )?;
        let eval_s = t_eval.elapsed().as_secs_f64();
        let points: Vec<MetricPoint> = [
            ("time/train_s", train_s),
            ("time/sample_s", sample_s),
            ("time/eval_s", eval_s),
        ]
        .into_iter()
        .map(|(key, value)| MetricPoint {
            key: key.into(),
            step,
            value,
            wall_time: now(),
        })
        .collect();
        self.db.insert_metrics(run_id, &points)?;
        self.say(format!(
            "    train {train_s:.1} s · sample {sample_s:.1} s · eval {eval_s:.1} s"
        ));
        Ok((scores.fid, scores.is_mean))
    }
}

/// The identity of a run's tokenizer: fitted once per (data, tokenizer, seed).
fn tokenizer_hash(run: &PlannedRun, ds: &Dataset) -> String {
    let tspec = run.tokenizer();
    let seed = tspec.seed.unwrap_or(run.seed);
    identity::content_hash(&identity::tokenizer(tspec, seed, ds))
}

/// Whether a cached file of run `run_id` still has the sha256 recorded with it (the newest record
/// of `kind`). A file that does not is reported and removed, so that the caller fits it again;
/// one without a record (written before records were kept) is trusted.
fn cache_intact(db: &Db, run_id: i64, kind: &str, path: &Path, what: &str) -> Result<bool> {
    let Some(recorded) = db.artifacts(run_id)?.into_iter().rfind(|a| a.kind == kind) else {
        return Ok(true);
    };
    let found = db::files::sha256_file(path).map_err(Error::file(path))?;
    if found == recorded.sha256 {
        return Ok(true);
    }
    eprintln!(
        "warning: the cached {what} {} is damaged (its sha256 is not the one recorded when it \
         was written); fitting it again",
        path.display()
    );
    std::fs::remove_file(path).map_err(Error::file(path))?;
    Ok(false)
}
