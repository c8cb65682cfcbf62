//! The command line: `ablate run | plan | report | list | show | compare | baseline | check | fid
//! | bench | selftest | import | sample`. Exit codes: 0 ok, 1 failure (or drift, for `check`), 2 usage or spec error.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use db::Db;

use crate::spec;
use crate::{layout::Layout, runner::Runner};

#[derive(Parser, Debug)]
#[command(
    name = "ablate",
    version,
    about = "Paired ablations of cross-entropy on VQ tokens vs Diffusion Loss on continuous tokens (MAR, Li et al. 2024)"
)]
pub struct Cli {
    /// Folder for the database, caches, checkpoints and reports
    #[arg(long, global = true, env = "ABLATE_ROOT", default_value = "runs")]
    pub root: PathBuf,
    /// The tracking database on a PostgreSQL server (postgres://USER[:PASSWORD]@HOST[:PORT]/DB),
    /// shared by several machines, in place of ROOT/ablate.sqlite; the root still holds the
    /// caches and artifacts, on a folder the machines share
    #[arg(long, global = true, env = "ABLATE_DB", value_name = "URL")]
    pub db: Option<String>,
    /// Print only results, no progress
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train, sample, evaluate and report every run of a spec (finished runs are skipped)
    Run {
        spec: PathBuf,
        /// Override a key of the spec: --set train.steps=200
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// cpu or cuda:N (overrides the spec's `device`)
        #[arg(long)]
        device: Option<String>,
        /// Do not write the report at the end
        #[arg(long)]
        no_report: bool,
        /// Processes sharing the runs: this one and N − 1 workers (logs in ROOT/logs/), each
        /// with cores / N threads unless RAYON_NUM_THREADS is set
        #[arg(long, default_value_t = 1, value_name = "N")]
        jobs: usize,
    },
    /// Write a Slurm array job for a spec: N tasks share its runs on this root, then a job that
    /// depends on the array writes the report (scripts in ROOT/slurm/NAME/)
    Slurm {
        spec: PathBuf,
        /// Array tasks: processes sharing the spec's runs
        #[arg(long)]
        tasks: usize,
        #[arg(long)]
        partition: Option<String>,
        /// GPUs per task (each task then trains on cuda:0 of its allocation)
        #[arg(long)]
        gpus_per_task: Option<usize>,
        /// Wall-time limit per task, e.g. 04:00:00
        #[arg(long)]
        time: Option<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Also submit: sbatch the array and the dependent report job, print their ids
        #[arg(long)]
        submit: bool,
    },
    /// Print the runs a spec expands to and which are already finished
    Plan {
        spec: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write the paper-style table (Markdown, HTML), plots, sample grids and CSV of an experiment
    Report {
        experiment: String,
        /// Output folder (default: ROOT/reports/EXPERIMENT)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Formats to write, comma-separated
        #[arg(long, value_enum, value_delimiter = ',', default_value = "md,html,csv")]
        format: Vec<ReportFormat>,
        /// Version of the experiment to report (a changed configuration under the same name is a
        /// new version; see `ablate list`) [default: the latest]
        #[arg(long)]
        version: Option<i64>,
    },
    /// Pin an experiment's current results as a named baseline
    Baseline {
        #[command(subcommand)]
        action: BaselineAction,
    },
    /// Compare an experiment with a pinned baseline under the spec's [drift] tolerances
    /// (exit 1 on drift)
    Check {
        experiment: String,
        /// Name of the baseline (see `ablate baseline pin`)
        #[arg(long)]
        baseline: String,
        /// Also write the result as JUnit XML to this file
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
    },
    /// Tracking-database tools
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// List experiments, or the runs of one
    List {
        /// Show the runs of this experiment
        experiment: Option<String>,
    },
    /// Show one run: parameters, status, metrics, evals, artifacts
    Show { run: i64 },
    /// The parameters that differ between two runs, and their metric differences (B − A)
    Compare { run_a: i64, run_b: i64 },
    /// FID between two image folders or .npz statistics (mu, sigma; pytorch-fid's format)
    Fid {
        /// A B (each an image folder of PNGs or an .npz), or FOLDER OUT.npz with --save-stats
        #[arg(value_name = "PATH", num_args = 2)]
        paths: Vec<PathBuf>,
        /// Write the statistics of FOLDER to OUT.npz instead of computing FID
        #[arg(long)]
        save_stats: bool,
        /// Also print the Inception Score (10 splits) of each folder
        #[arg(long = "is")]
        inception_score: bool,
        /// Inception-v3 weights: pt_inception-2015-12-05-6726825d.pth or a safetensors copy
        /// (default: ROOT/weights/pt_inception-2015-12-05-6726825d.pth)
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Resize and normalisation: torch-fidelity (the paper's numbers) or pytorch-fid
        #[arg(long, default_value = "torch-fidelity")]
        convention: String,
        /// inception (default), or classifier:RUN for the harness's classifier of a run (id or hash)
        #[arg(long)]
        feature_net: Option<String>,
        /// Images per forward pass
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
    /// Measure training and sampling throughput of named workloads (one JSON object per line)
    Bench {
        /// cpu or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Workloads to run (default: the tiny ones); see `--list`
        #[arg(long = "workload")]
        workloads: Vec<String>,
        /// Timed training steps (after 2 warm-up steps); the median is reported
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Arithmetic of the generator's matrix products: f32, or bf16 with f32 master weights
        /// (as `train.precision`) [default: f32 on the CPU, bf16 on CUDA]
        #[arg(long)]
        precision: Option<String>,
        /// The device's peak dense TFLOP/s at that precision, for the `mfu` field [default on
        /// CUDA: 989 for bf16 and 67 for f32, an H100/H200 SXM; none on the CPU]
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Images per training step, for every workload chosen [default: each workload's own]
        #[arg(long)]
        batch: Option<usize>,
        /// Also time each phase of a step (forward, backward, clipping, optimizer) with the device
        /// synchronised between them, and how long the host took to queue each one
        #[arg(long)]
        phases: bool,
        /// Write a sampling profile of the host over the timed training steps to this file (the
        /// workload's name is added before the extension); needs a build with `--features profile`
        #[arg(long)]
        profile: Option<PathBuf>,
        /// List the workloads and exit
        #[arg(long)]
        list: bool,
    },
    /// Check that a device computes what the CPU computes (one JSON object per check; exit 1 on a
    /// failed check)
    ///
    /// Builds each generator variant (MAR and AR, Diffusion Loss and cross-entropy, f32 and bf16),
    /// the VQ and KL tokenizers, the classifier and Inception-v3 from the same seed on the CPU and
    /// on DEVICE, with the same batches, masks and noise, and compares initial weights, losses,
    /// gradients, weights after three AdamW steps, guided samples and features.
    Selftest {
        /// cuda:N (cpu compares the CPU with itself: a determinism check)
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Convert an official MAR PyTorch checkpoint (.pth) to safetensors plus config.json
    ///
    /// Reads the dict the official MAR code saves ({'model', 'model_ema', 'optimizer', 'epoch',
    /// 'args'}), infers the MAR configuration from the tensor shapes (widths, depths, sequence
    /// length, buffer size, token width, class count, Diffusion Loss width and depth), checks every
    /// tensor our MAR needs (names are the reference state_dict names) and writes
    /// OUT/model.safetensors, OUT/model_ema.safetensors and OUT/config.json. Nothing is written
    /// when anything is missing or mis-shaped.
    Import {
        /// The checkpoint, e.g. checkpoint-last.pth
        checkpoint: PathBuf,
        /// Output folder (default: the checkpoint's path without its extension)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Attention heads of encoder and decoder (not stored in the weights; default: the
        /// reference model's from the checkpoint's args.model, else width / 64)
        #[arg(long)]
        heads: Option<usize>,
        /// Attention heads of the decoder (default: args.decoder_num_heads, else --heads or the
        /// encoder's)
        #[arg(long)]
        decoder_heads: Option<usize>,
        /// Patch size over the tokenizer latents (default: args.patch_size, else 1)
        #[arg(long)]
        patch_size: Option<usize>,
        /// Tokenizer stride, to state img_size (default: args.vae_stride, else 16, the KL-16 VAE)
        #[arg(long)]
        vae_stride: Option<usize>,
        /// Diffusion Loss noise draws per token in training (default: args, else 4)
        #[arg(long)]
        diffusion_batch_mul: Option<usize>,
        /// Diffusion Loss sampling steps (default: args.num_sampling_steps, else 100)
        #[arg(long)]
        num_sampling_steps: Option<String>,
    },
    /// Sample tokens from imported MAR weights (see `ablate import`) with ablate's MAR sampler
    ///
    /// Writes OUT (safetensors) with `tokens` (B, L, token_dim), the same as tokenizer latents
    /// `latents` (B, C, H, W) (the reference's unpatchify) and `labels` (B). Images are not
    /// decoded: the reference's KL-16 VAE is not part of ablate; the official code decodes
    /// `latents / 0.2325` with it.
    Sample {
        /// An imported folder (uses model_ema.safetensors, or model.safetensors with --no-ema)
        /// or one safetensors file
        #[arg(long, value_name = "DIR_OR_FILE")]
        weights: PathBuf,
        /// The config.json (default: the one in the folder / beside the file)
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Use the trained weights (`model`) instead of their EMA (`model_ema`)
        #[arg(long)]
        no_ema: bool,
        /// Class labels to sample, comma-separated; cycled to --count (default: all classes)
        #[arg(long, value_delimiter = ',')]
        classes: Vec<u32>,
        /// Number of samples (default: one per class of --classes, or per class of the model)
        #[arg(long)]
        count: Option<usize>,
        /// MAR sampling steps (clamped to the number of tokens)
        #[arg(long, default_value_t = 64)]
        mar_steps: usize,
        /// Classifier-free guidance scale (1 = none)
        #[arg(long, default_value_t = 1.0)]
        cfg: f64,
        /// How the guidance scale grows over the steps
        #[arg(long, value_enum, default_value = "linear")]
        cfg_schedule: CfgScheduleArg,
        /// Temperature of the Diffusion Loss sampler
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Diffusion Loss sampling steps (default: config.json's num_sampling_steps)
        #[arg(long)]
        diffusion_steps: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images sampled together
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// cpu or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Output safetensors file
        #[arg(long, value_name = "FILE", default_value = "samples.safetensors")]
        out: PathBuf,
    },
}

/// `ablate sample --cfg-schedule`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfgScheduleArg {
    /// 1 + (s − 1) · share of tokens already generated (the reference)
    Linear,
    Constant,
}

#[derive(Subcommand, Debug)]
pub enum BaselineAction {
    /// Store the experiment's current table entries (mean, std, n per row, arm, metric) as NAME
    Pin {
        experiment: String,
        #[arg(long)]
        name: String,
        /// Overwrite a baseline of that name (without it an existing name is refused)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DbAction {
    /// Copy a whole history (experiments, runs, metrics, evals, artifacts' records, baselines),
    /// ids included, into an empty database: e.g. ROOT/ablate.sqlite into a Postgres server.
    /// Each of FROM and TO is a SQLite file or a postgres:// URL; artifact paths stay relative
    /// to the root
    Copy {
        /// The database to read (a SQLite file that exists, or a postgres:// URL)
        from: String,
        /// The empty database to fill (a SQLite file, created if missing, or a postgres:// URL)
        to: String,
    },
}

/// Output formats of `ablate report --format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    /// report.md
    Md,
    /// report.html (single file: inline SVG plots, sample grids as data URIs)
    Html,
    /// metrics.csv (every eval, long format)
    Csv,
}

impl From<ReportFormat> for reports::Format {
    fn from(f: ReportFormat) -> Self {
        match f {
            ReportFormat::Md => reports::Format::Markdown,
            ReportFormat::Html => reports::Format::Html,
            ReportFormat::Csv => reports::Format::Csv,
        }
    }
}

/// A request that cannot be served as asked (unknown name, missing configuration): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code 2 for errors caused by the request rather than by the work.
fn is_usage(e: &anyhow::Error) -> bool {
    e.downcast_ref::<spec::SpecError>().is_some()
        || e.downcast_ref::<UsageError>().is_some()
        || e.downcast_ref::<crate::import::CheckpointError>().is_some()
        || e.downcast_ref::<crate::fid::UsageError>().is_some()
        || e.downcast_ref::<reports::Error>()
            .is_some_and(reports::Error::is_usage)
}

/// Parse arguments, run, and return the exit code: 0 ok, 1 failure, 2 usage or spec error.
pub fn main() -> i32 {
    crate::workers::pin_cpu_threads();
    // `ablate plan … | head` closes stdout early: end quietly instead of panicking
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ABLATE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = crate::stop::install() {
        eprintln!("warning: SIGINT/SIGTERM will end ablate without a checkpoint: {e}");
    }
    if let Command::Run { jobs, .. } = &cli.command {
        if *jobs > 1 {
            // before the thread pool exists: rayon and candle's CPU kernels both read it
            let threads = crate::workers::threads_per_job(*jobs);
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
    }
    match crate::workers::on_cpu_pool(move || run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let code = match e.downcast_ref::<crate::stop::Stopped>() {
                Some(stopped) => stopped.exit_code(),
                None if is_usage(&e) => 2,
                None => 1,
            };
            eprintln!("error: {}", crate::runner::describe(&e));
            code
        }
    }
}

/// The summary of `ablate import`.
fn print_import(checkpoint: &std::path::Path, r: &crate::import::ImportReport) {
    println!("checkpoint: {}", checkpoint.display());
    println!(
        "  entries: {}{}",
        r.entries.join(", "),
        r.epoch.map(|e| format!(" (epoch {e})")).unwrap_or_default()
    );
    for (key, n) in &r.tensors {
        println!("  {key}: {n} tensors");
    }
    if !r.has_ema {
        println!("  no 'model_ema' entry: only model.safetensors written (sample with --no-ema)");
    }
    println!(
        "parameters: {} ({:.2} M)",
        r.parameters,
        r.parameters as f64 / 1e6
    );
    let c = &r.config;
    println!(
        "config: encoder {}×{} ({} heads), decoder {}×{} ({} heads), mlp ratio {}, {} tokens \
         ({}×{} grid, patch {}) of width {}, buffer {}, {} classes, Diffusion Loss {}×{} \
         (learn sigma {}), img_size {} at vae_stride {}",
        c.encoder_depth,
        c.encoder_embed_dim,
        c.encoder_num_heads,
        c.decoder_depth,
        c.decoder_embed_dim,
        c.decoder_num_heads,
        c.mlp_ratio,
        c.seq_len,
        c.grid_side(),
        c.grid_side(),
        c.patch_size,
        c.token_embed_dim,
        c.buffer_size,
        c.class_num,
        c.diffloss_d,
        c.diffloss_w,
        c.learn_sigma,
        c.img_size,
        c.vae_stride
    );
    if r.unused.is_empty() {
        println!("unused: none (every tensor of 'model' is used)");
    } else {
        println!(
            "unused by ablate's MAR ({}): {}",
            r.unused.len(),
            r.unused.join(", ")
        );
    }
    for f in &r.files {
        println!("wrote: {}", f.display());
    }
}

/// The tracking database of a root that must already have one (report, list, show, compare).
fn open_db(layout: &Layout) -> anyhow::Result<Db> {
    layout
        .open_existing_db()
        .with_context(|| format!("opening the tracking database {}", layout.db_location()))
}

/// The tracking database at `location`: a postgres:// URL (its artifacts relative to the
/// root), or a SQLite file (created when `create`, else it must exist).
fn open_location(location: &str, layout: &Layout, create: bool) -> anyhow::Result<Db> {
    let db = if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        Db::open_postgres(location, &layout.root)
    } else if create {
        Db::open(std::path::Path::new(location))
    } else {
        Db::open_existing(std::path::Path::new(location))
    };
    db.with_context(|| format!("opening the tracking database {}", db::redact(location)))
}

/// The report files, one a line; the per-run sample grids as one line for their folder.
fn print_report_files(files: &[PathBuf]) {
    let is_grid = |f: &PathBuf| {
        f.parent()
            .and_then(|d| d.file_name())
            .is_some_and(|n| n == "samples")
    };
    for f in files.iter().filter(|f| !is_grid(f)) {
        println!("report: {}", f.display());
    }
    let grids: Vec<&PathBuf> = files.iter().filter(|f| is_grid(f)).collect();
    if let Some(dir) = grids.first().and_then(|f| f.parent()) {
        println!(
            "report: {}/ ({} sample grids, one per run)",
            dir.display(),
            grids.len()
        );
    }
}

/// The `[drift]` tolerances of the spec stored with `experiment` in the database.
fn drift_tolerances(
    db: &Db,
    experiment: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, reports::Tolerance>> {
    let Some((path, source)) = db.experiment_spec(experiment)? else {
        return Err(UsageError(format!(
            "no experiment named '{experiment}' in the tracking database (see `ablate list`)"
        ))
        .into());
    };
    let loaded = spec::load_str(&path, &source, &[]).map_err(|e| {
        UsageError(format!(
            "the spec stored with experiment '{experiment}' no longer loads: {e}"
        ))
    })?;
    if loaded.base.drift.is_empty() {
        return Err(UsageError(format!(
            "the spec of experiment '{experiment}' ({path}) has no [drift] tolerances; add e.g. \
             `[drift]` with `fid = {{ absolute = 2.0 }}` (see experiments/README.md)"
        ))
        .into());
    }
    Ok(loaded
        .base
        .drift
        .iter()
        .map(|(metric, t)| {
            (
                metric.clone(),
                reports::Tolerance {
                    absolute: t.absolute,
                    relative: t.relative,
                    seed_spread: t.seed_spread,
                },
            )
        })
        .collect())
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let layout = Layout {
        root: cli.root.clone(),
        db_url: cli.db.clone(),
    };
    match cli.command {
        Command::Run {
            spec,
            set,
            device,
            no_report,
            jobs,
        } => {
            // the spec is checked completely before anything touches the database
            let loaded = spec::load(&spec, &set)?;
            if let Some(available) = spec::available_memory() {
                spec::check_memory(&loaded, available)?;
            }
            if let Some(d) = &device {
                crate::device::parse_device(d)?;
            }
            if jobs == 0 {
                return Err(UsageError("--jobs: expected at least 1, found 0".into()).into());
            }
            let started = std::time::Instant::now();
            let workers = if jobs > 1 {
                let threads = crate::workers::threads_per_job(jobs);
                std::fs::create_dir_all(&layout.root)
                    .with_context(|| format!("creating {}", layout.root.display()))?;
                let w = crate::workers::spawn(jobs, &layout.root, threads)?;
                eprintln!(
                    "{jobs} processes share the runs, {threads} thread(s) each; workers log to {}",
                    layout.root.join("logs").display()
                );
                Some(w)
            } else {
                None
            };
            let mut runner = Runner::open(layout.clone(), device, cli.quiet)?;
            let outcomes = match runner.run_experiment(&loaded) {
                Ok(o) => o,
                Err(e) => {
                    // a stop (SIGTERM to this process alone, as a scheduler may send it) reaches
                    // the workers too; on any other error they finish their runs
                    if let (Some(w), Some(stopped)) =
                        (workers, e.downcast_ref::<crate::stop::Stopped>())
                    {
                        for problem in w.stop(stopped.0) {
                            eprintln!("{problem}");
                        }
                    }
                    return Err(e);
                }
            };
            // every run this process skipped it waited for, so the outcomes cover the whole spec
            for problem in workers.map(|w| w.wait()).unwrap_or_default() {
                eprintln!("{problem}");
            }
            let failed: Vec<_> = outcomes.iter().filter(|o| o.status != "finished").collect();
            eprintln!(
                "{} run(s): {} finished ({} earlier), {} failed, in {:.1} s",
                outcomes.len(),
                outcomes.len() - failed.len(),
                outcomes.iter().filter(|o| o.cached).count(),
                failed.len(),
                started.elapsed().as_secs_f64()
            );
            for f in &failed {
                eprintln!(
                    "  failed: run {} ({} · {} · seed {}): {}",
                    f.run_id,
                    f.cell,
                    f.arm.as_str(),
                    f.seed,
                    f.error.as_deref().unwrap_or("")
                );
            }
            // a worker of `--jobs` leaves the report to the process that started it, unless that
            // process is gone (killed): then the worker that finishes writes it
            let parent_gone =
                crate::workers::report_parent().is_some_and(|pid| !crate::device::pid_alive(pid));
            if parent_gone {
                eprintln!("the process that started this worker is gone: writing the report");
            }
            if !no_report || parent_gone {
                let out = layout.report_dir(&loaded.base.name);
                // processes sharing the spec write the report one at a time; the last one to
                // finish writes it with every run
                let safe = out.file_name().map(|n| n.to_string_lossy().into_owned());
                let lock = format!("report-{}", safe.unwrap_or_default());
                let _held = crate::lock::lock(&layout, &runner.db, &lock)?;
                match reports::write_report(
                    &runner.db,
                    &loaded.base.name,
                    &out,
                    &reports::Format::ALL,
                ) {
                    Ok(r) => {
                        println!("{}", r.markdown);
                        print_report_files(&r.files);
                    }
                    Err(e) => eprintln!("report not written: {e}"),
                }
            }
            println!("database: {}", layout.db_location());
            Ok(if failed.is_empty() { 0 } else { 1 })
        }
        Command::Slurm {
            spec,
            tasks,
            partition,
            gpus_per_task,
            time,
            set,
            submit,
        } => {
            // checked completely first, as `run` would check it (memory: on the tasks' nodes)
            let loaded = spec::load(&spec, &set)?;
            if tasks == 0 {
                return Err(UsageError("--tasks: expected at least 1, found 0".into()).into());
            }
            let absolute = |p: &std::path::Path| {
                std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
            };
            let root = absolute(&layout.root)?;
            let dir = root.join("slurm").join(
                layout
                    .report_dir(&loaded.base.name)
                    .file_name()
                    .unwrap_or_default(),
            );
            let exe = std::env::current_exe().context("finding the ablate executable")?;
            let opts = crate::slurm::SlurmOptions {
                tasks,
                partition,
                gpus_per_task,
                time,
                set,
                db: layout.db_url.clone(),
            };
            let scripts = crate::slurm::write_scripts(
                &exe,
                &root,
                &absolute(&spec)?,
                &loaded.base.name,
                &opts,
                &dir,
            )?;
            println!("array job:  {}", scripts.array.display());
            println!("report job: {}", scripts.report.display());
            println!("submit:     {}", scripts.submit.display());
            if submit {
                let out = std::process::Command::new("bash")
                    .arg(&scripts.submit)
                    .output()
                    .context("running sbatch (is Slurm installed here?)")?;
                if !out.status.success() {
                    anyhow::bail!(
                        "submitting failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
            Ok(0)
        }
        Command::Plan { spec, set } => {
            let loaded = spec::load(&spec, &set)?;
            let db = if layout.has_db() {
                Some(open_db(&layout)?)
            } else {
                None
            };
            println!(
                "{}: {} cell(s), {} run(s)",
                loaded.base.name,
                loaded.cells.len(),
                loaded.runs().len()
            );
            println!(
                "{:<18} {:<40} {:<14} {:>6}  status",
                "hash", "cell", "arm", "seed"
            );
            // the data's fingerprint is part of a run's identity (read once per data section)
            let mut fingerprints: std::collections::HashMap<String, String> = Default::default();
            for r in loaded.runs() {
                let key = serde_json::to_string(&r.spec.data)?;
                let fingerprint = match fingerprints.get(&key) {
                    Some(f) => f.clone(),
                    None => {
                        let f = crate::data::identity_fingerprint(&r.spec.data)?;
                        fingerprints.insert(key, f.clone());
                        f
                    }
                };
                let hash = r.hash(&fingerprint);
                let status = match &db {
                    Some(db) => db
                        .run_by_hash(&hash)?
                        .map(|row| row.status)
                        .unwrap_or_else(|| "new".into()),
                    None => "new".into(),
                };
                println!(
                    "{:<18} {:<40} {:<14} {:>6}  {}",
                    hash,
                    r.cell,
                    r.arm.as_str(),
                    r.seed,
                    status
                );
            }
            Ok(0)
        }
        Command::Report {
            experiment,
            out,
            format,
            version,
        } => {
            let db = open_db(&layout)?;
            let out = out.unwrap_or_else(|| layout.report_dir(&experiment));
            let formats: Vec<reports::Format> = format.into_iter().map(Into::into).collect();
            let r = reports::write_report_version(&db, &experiment, version, &out, &formats)?;
            if formats.contains(&reports::Format::Markdown) {
                println!("{}", r.markdown);
            }
            print_report_files(&r.files);
            Ok(0)
        }
        Command::Db {
            action: DbAction::Copy { from, to },
        } => {
            let source = open_location(&from, &layout, false)?;
            let dest = open_location(&to, &layout, true)?;
            let counts = source.copy_into(&dest).with_context(|| {
                format!("copying {} into {}", source.location(), dest.location())
            })?;
            for (table, rows) in &counts {
                println!("{table:<20} {rows:>9} row(s)");
            }
            println!("copied {} into {}", source.location(), dest.location());
            Ok(0)
        }
        Command::Baseline {
            action:
                BaselineAction::Pin {
                    experiment,
                    name,
                    force,
                },
        } => {
            if name.trim().is_empty() {
                return Err(UsageError("--name: expected a baseline name, found ''".into()).into());
            }
            let db = open_db(&layout)?;
            if !force && db.baseline(&experiment, &name)?.is_some() {
                return Err(UsageError(format!(
                    "baseline '{name}' of '{experiment}' exists; pass --force to overwrite it, \
                     or pin under another --name"
                ))
                .into());
            }
            let entries = reports::pin_baseline(&db, &experiment, &name)?;
            println!(
                "baseline '{name}' of '{experiment}': {} entries pinned",
                entries.len()
            );
            for e in &entries {
                let sd = e.std.map_or("–".to_string(), |s| format!("{s:.4}"));
                println!(
                    "  {:<4} {:.4} ± {sd} (n={})  {}",
                    e.metric,
                    e.mean,
                    e.n,
                    e.name()
                );
            }
            Ok(0)
        }
        Command::Check {
            experiment,
            baseline,
            junit,
        } => {
            let db = open_db(&layout)?;
            let tolerances = drift_tolerances(&db, &experiment)?;
            let report = reports::check(&db, &experiment, &baseline, &tolerances)?;
            print!("{}", report.render_table());
            if let Some(path) = junit {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                std::fs::write(&path, report.junit_xml())
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("junit: {}", path.display());
            }
            Ok(if report.failed() { 1 } else { 0 })
        }
        Command::List { experiment } => {
            let db = open_db(&layout)?;
            // show runs whose process died as interrupted, not running
            db.reap_dead_runs(
                &crate::device::Environment::detect().host,
                &crate::device::pid_alive,
            )?;
            match experiment {
                None => {
                    println!(
                        "{:<4} {:<24} {:>7} {:>6} {:>9}  created",
                        "id", "experiment", "version", "runs", "finished"
                    );
                    // runs and finished count the latest version
                    for e in db.list_experiments()? {
                        println!(
                            "{:<4} {:<24} {:>7} {:>6} {:>9}  {}",
                            e.id, e.name, e.version, e.runs, e.finished, e.created_at
                        );
                    }
                }
                Some(name) => {
                    if db.experiment_id(&name)?.is_none() {
                        anyhow::bail!("no experiment named '{name}' (see `ablate list`)");
                    }
                    let versions = db.experiment_versions(&name)?;
                    if versions.len() > 1 {
                        for (v, created, runs) in &versions {
                            println!("version {v}: {runs} runs, created {created}");
                        }
                        println!("the runs of the latest version:");
                    }
                    println!(
                        "{:<5} {:<11} {:<12} {:<50} {:<10}",
                        "run", "kind", "status", "name", "stage"
                    );
                    for r in db.list_runs(Some(&name))? {
                        println!(
                            "{:<5} {:<11} {:<12} {:<50} {:<10}",
                            r.id,
                            r.kind,
                            r.status,
                            r.name,
                            r.stage.unwrap_or_default()
                        );
                    }
                }
            }
            Ok(0)
        }
        Command::Fid {
            paths,
            save_stats,
            inception_score,
            weights,
            convention,
            feature_net,
            batch,
        } => {
            let o = crate::fid::FidOptions {
                paths,
                save_stats,
                is: inception_score,
                weights,
                convention,
                feature_net,
                batch,
            };
            crate::fid::run(&layout, &o)?;
            Ok(0)
        }
        Command::Bench {
            device,
            workloads,
            steps,
            precision,
            peak_tflops,
            batch,
            phases,
            profile,
            list,
        } => {
            let all = crate::bench::workloads();
            if list {
                for w in &all {
                    println!(
                        "{:<12} {:?} {}×{} tokens, width {}, depth {}+{}, batch {}",
                        w.name, w.kind, w.side, w.side, w.width, w.depth, w.decoder_depth, w.batch
                    );
                }
                for (name, what) in crate::bench::EVAL_WORKLOADS {
                    println!("{name:<12} {what}");
                }
                return Ok(0);
            }
            let dev = crate::device::parse_device(&device)?;
            if steps == 0 {
                anyhow::bail!("--steps must be at least 1");
            }
            let precision = match precision {
                Some(p) => crate::bench::parse_precision(&p)?,
                None if dev.is_cuda() => models::Precision::Bf16,
                None => models::Precision::F32,
            };
            let peak_tflops = peak_tflops.or(match (dev.is_cuda(), precision) {
                (true, models::Precision::Bf16) => Some(989.0),
                (true, models::Precision::F32) => Some(67.0),
                (false, _) => None,
            });
            // evaluation workloads run only when named
            let (eval, workloads): (Vec<String>, Vec<String>) = workloads
                .into_iter()
                .partition(|w| crate::bench::EVAL_WORKLOADS.iter().any(|(n, _)| n == w));
            for name in &eval {
                let line = crate::bench::run_eval(name, &dev, &device, steps)?;
                println!("{line}");
            }
            if !eval.is_empty() && workloads.is_empty() {
                return Ok(0);
            }
            let chosen: Vec<_> = if workloads.is_empty() {
                all.into_iter()
                    .filter(|w| w.name.ends_with("-tiny") || w.name.ends_with("-tiny-ce"))
                    .collect()
            } else {
                let mut v = Vec::new();
                for name in &workloads {
                    match all.iter().find(|w| w.name == name) {
                        Some(w) => v.push(w.clone()),
                        None => anyhow::bail!(
                            "unknown workload '{name}'; known: {}",
                            all.iter().map(|w| w.name).collect::<Vec<_>>().join(", ")
                        ),
                    }
                }
                v
            };
            if batch == Some(0) {
                anyhow::bail!("--batch must be at least 1");
            }
            for w in &chosen {
                let w = crate::bench::Workload {
                    batch: batch.unwrap_or(w.batch),
                    ..w.clone()
                };
                let o = crate::bench::Options {
                    steps,
                    precision,
                    peak_tflops,
                    phases,
                    profile: profile
                        .as_ref()
                        .map(|p| p.with_extension(format!("{}.txt", w.name))),
                };
                let line = crate::bench::run(&w, &dev, &device, &o)?;
                println!("{line}");
            }
            Ok(0)
        }
        Command::Selftest { device } => {
            let dev = crate::device::parse_device(&device)?;
            let checks = crate::selftest::run(&dev, &device, |group| {
                for c in group {
                    if let Ok(line) = serde_json::to_string(c) {
                        println!("{line}");
                    }
                }
            })?;
            let failed: Vec<&str> = checks
                .iter()
                .filter(|c| !c.pass)
                .map(|c| c.check.as_str())
                .collect();
            if failed.is_empty() {
                eprintln!("selftest: all {} checks passed on {device}", checks.len());
                Ok(0)
            } else {
                eprintln!(
                    "selftest: {} of {} checks failed on {device}: {}",
                    failed.len(),
                    checks.len(),
                    failed.join(", ")
                );
                Ok(1)
            }
        }
        Command::Import {
            checkpoint,
            out,
            heads,
            decoder_heads,
            patch_size,
            vae_stride,
            diffusion_batch_mul,
            num_sampling_steps,
        } => {
            let out = out.unwrap_or_else(|| checkpoint.with_extension(""));
            if out == checkpoint {
                return Err(UsageError(format!(
                    "{}: give --out (the default output folder is the checkpoint path without \
                     its extension)",
                    checkpoint.display()
                ))
                .into());
            }
            let opts = crate::import::ImportOptions {
                heads,
                decoder_heads,
                patch_size,
                vae_stride,
                diffusion_batch_mul,
                num_sampling_steps,
            };
            let r = crate::import::import(&checkpoint, &out, &opts)?;
            print_import(&checkpoint, &r);
            Ok(0)
        }
        Command::Sample {
            weights,
            config,
            no_ema,
            classes,
            count,
            mar_steps,
            cfg,
            cfg_schedule,
            temperature,
            diffusion_steps,
            seed,
            batch,
            device,
            out,
        } => {
            let dev = crate::device::parse_device(&device)?;
            let (file, cfg_path) =
                crate::import::resolve_weights(&weights, config.as_deref(), !no_ema)?;
            let mc = crate::import::read_config(&cfg_path)?;
            if let Some(&c) = classes.iter().find(|&&c| c as usize >= mc.class_num) {
                return Err(UsageError(format!(
                    "--classes: class {c} is out of range: the model has {} classes (0..{})",
                    mc.class_num,
                    mc.class_num - 1
                ))
                .into());
            }
            let classes: Vec<u32> = if classes.is_empty() {
                (0..mc.class_num as u32).collect()
            } else {
                classes
            };
            let count = count.unwrap_or(classes.len());
            if count == 0 || batch == 0 || mar_steps == 0 {
                return Err(
                    UsageError("--count, --batch and --mar-steps must be positive".into()).into(),
                );
            }
            if temperature <= 0.0 || cfg < 0.0 {
                return Err(UsageError(
                    "--temperature must be positive and --cfg non-negative".into(),
                )
                .into());
            }
            let mar = crate::import::load_mar(&file, &mc, &cfg_path, diffusion_steps, &dev)?;
            let labels: Vec<u32> = (0..count).map(|i| classes[i % classes.len()]).collect();
            let opts = models::SampleOptions {
                num_iter: mar_steps.min(mc.seq_len),
                cfg,
                cfg_schedule: match cfg_schedule {
                    CfgScheduleArg::Linear => models::generator::CfgSchedule::Linear,
                    CfgScheduleArg::Constant => models::generator::CfgSchedule::Constant,
                },
                temperature,
            };
            let mut rng = models::Rng::new(seed);
            let started = std::time::Instant::now();
            let mut parts = Vec::new();
            for chunk in labels.chunks(batch) {
                match mar.sample(chunk, &opts, &mut rng)? {
                    models::Tokens::Continuous(t) => {
                        parts.push(t.to_dtype(candle_core::DType::F32)?)
                    }
                    models::Tokens::Discrete(_) => anyhow::bail!("the MAR sampled discrete tokens"),
                }
                if !cli.quiet {
                    eprintln!(
                        "sampled {}/{count} in {:.1} s",
                        parts.iter().map(|p| p.dim(0).unwrap_or(0)).sum::<usize>(),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            let tokens =
                candle_core::Tensor::cat(&parts, 0)?.to_device(&candle_core::Device::Cpu)?;
            let latents = models::mar::unpatchify(&tokens, mc.patch_size)?;
            let label_t = candle_core::Tensor::from_vec(
                labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
                count,
                &candle_core::Device::Cpu,
            )?;
            let tensors: std::collections::HashMap<String, candle_core::Tensor> = [
                ("tokens".to_string(), tokens.clone()),
                ("latents".to_string(), latents.clone()),
                ("labels".to_string(), label_t),
            ]
            .into_iter()
            .collect();
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            crate::import::save_safetensors_atomic(&tensors, &out)?;
            println!(
                "weights: {} ({})",
                file.display(),
                if weights.is_dir() {
                    if no_ema {
                        "model"
                    } else {
                        "model_ema"
                    }
                } else {
                    "file"
                }
            );
            println!(
                "sampled {count} image(s) of classes {:?}: {} MAR steps, cfg {cfg} ({:?}), temperature {temperature}, seed {seed}",
                classes,
                opts.num_iter,
                cfg_schedule
            );
            println!(
                "wrote {}: tokens {:?}, latents {:?}, labels [{count}]",
                out.display(),
                tokens.dims(),
                latents.dims()
            );
            println!("note: images are not decoded (the reference KL-16 VAE is not part of ablate); the official code decodes latents / 0.2325");
            Ok(0)
        }
        Command::Compare { run_a, run_b } => {
            let db = open_db(&layout)?;
            let get = |id: i64| -> anyhow::Result<db::RunRow> {
                db.run(id)?.ok_or_else(|| {
                    anyhow::anyhow!("no run with id {id} (see `ablate list EXPERIMENT`)")
                })
            };
            let (a, b) = (get(run_a)?, get(run_b)?);
            println!("A = run {}: {}", a.id, a.name);
            println!("B = run {}: {}", b.id, b.name);
            let mut pa = a.params.clone();
            let mut pb = b.params.clone();
            for (p, r) in [(&mut pa, &a), (&mut pb, &b)] {
                if let Some(o) = p.as_object_mut() {
                    o.insert("arm".into(), serde_json::json!(r.arm));
                    o.insert("seed".into(), serde_json::json!(r.seed));
                }
            }
            let diff = crate::compare::differing(&pa, &pb);
            if diff.is_empty() {
                println!("parameters: identical");
            } else {
                println!("{:<32} {:<24} {:<24}", "parameter", "A", "B");
                for (k, va, vb) in diff {
                    println!("{k:<32} {va:<24} {vb:<24}");
                }
            }
            let last = |id: i64| -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
                let mut m = std::collections::BTreeMap::new();
                let mut steps = std::collections::BTreeMap::new();
                for e in db.evals_for_run(id)? {
                    if e.step >= *steps.get(&e.metric).unwrap_or(&i64::MIN) {
                        steps.insert(e.metric.clone(), e.step);
                        m.insert(e.metric, e.value);
                    }
                }
                Ok(m)
            };
            let (ea, eb) = (last(a.id)?, last(b.id)?);
            let mut metrics: Vec<&String> = ea.keys().chain(eb.keys()).collect();
            metrics.sort();
            metrics.dedup();
            if !metrics.is_empty() {
                println!("{:<12} {:>12} {:>12} {:>12}", "metric", "A", "B", "B − A");
                for m in metrics {
                    let fmt = |v: Option<&f64>| {
                        v.map(|x| format!("{x:.4}"))
                            .unwrap_or_else(|| "missing".into())
                    };
                    let d = match (ea.get(m), eb.get(m)) {
                        (Some(x), Some(y)) => format!("{:+.4}", y - x),
                        _ => "–".into(),
                    };
                    println!(
                        "{m:<12} {:>12} {:>12} {d:>12}",
                        fmt(ea.get(m)),
                        fmt(eb.get(m))
                    );
                }
            }
            Ok(0)
        }
        Command::Show { run } => {
            let db = open_db(&layout)?;
            let r = db.run(run)?.ok_or_else(|| {
                anyhow::anyhow!("no run with id {run} (see `ablate list EXPERIMENT`)")
            })?;
            println!("run {}: {}", r.id, r.name);
            println!(
                "  kind {} · status {} · stage {}",
                r.kind,
                r.status,
                r.stage.clone().unwrap_or_default()
            );
            println!(
                "  hash {} · seed {} · arm {}",
                r.hash,
                r.seed,
                r.arm.clone().unwrap_or_else(|| "-".into())
            );
            println!(
                "  host {} · device {} · version {} · pid {}",
                r.host,
                r.device,
                r.version,
                r.pid.map(|p| p.to_string()).unwrap_or_default()
            );
            println!(
                "  git {}{}",
                r.git_commit.clone().unwrap_or_else(|| "unknown".into()),
                if r.git_dirty { " (dirty)" } else { "" }
            );
            println!(
                "  created {} · started {} · ended {}",
                r.created_at,
                r.started_at.clone().unwrap_or_default(),
                r.ended_at.clone().unwrap_or_default()
            );
            if let Some(e) = &r.error {
                println!("  error: {e}");
            }
            let metrics = db.metrics(run, None)?;
            let mut last: std::collections::BTreeMap<String, (i64, f64, usize)> =
                Default::default();
            for m in &metrics {
                let e = last.entry(m.key.clone()).or_insert((m.step, m.value, 0));
                if m.step >= e.0 {
                    e.0 = m.step;
                    e.1 = m.value;
                }
                e.2 += 1;
            }
            if !last.is_empty() {
                println!("  metrics (last value, points):");
                for (k, (s, v, n)) in last {
                    println!("    {k:<24} {v:>12.6} at step {s} ({n} points)");
                }
            }
            let evals = db.evals_for_run(run)?;
            if !evals.is_empty() {
                println!("  evals:");
                for e in evals {
                    println!(
                        "    {:<8} {:>10.4}  step {} · {} samples · {} · {}",
                        e.metric, e.value, e.step, e.sample_count, e.feature_net, e.settings
                    );
                }
            }
            let artifacts = db.artifacts(run)?;
            if !artifacts.is_empty() {
                println!("  artifacts:");
                for a in artifacts {
                    println!(
                        "    {:<10} {} ({} bytes, sha256 {})",
                        a.kind,
                        db.resolve(&a.path).display(),
                        a.bytes,
                        &a.sha256[..12.min(a.sha256.len())]
                    );
                }
            }
            println!("  params: {}", serde_json::to_string(&r.params)?);
            Ok(0)
        }
    }
}
