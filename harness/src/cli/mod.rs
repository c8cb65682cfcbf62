//! The command line: `ablate run | slurm | plan | report | db | list | show | compare | baseline |
//! check | fid | bench | selftest | import | sample`. Exit codes: 0 ok, 1 failure (or drift, for
//! `check`), 2 usage or spec error. This file holds the arguments (one struct per command) and
//! the dispatch; each command is a function in `run.rs` (run, slurm, plan), `results.rs` (what
//! reads the tracking database) or `tools.rs` (fid, bench, selftest, import, sample).
mod results;
mod run;
mod tools;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use db::Db;

use harness::spec;
use harness::{layout::Layout, runner::Runner};

/// `ablate --version`: the version and the backends this binary was built with.
#[cfg(feature = "nccl")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CPU, CUDA, NCCL)");
#[cfg(all(feature = "cuda", not(feature = "nccl")))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CPU, CUDA)");
#[cfg(not(feature = "cuda"))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CPU)");

#[derive(Parser, Debug)]
#[command(
    name = "ablate",
    version = VERSION,
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
    Run(RunArgs),
    /// Write a Slurm array job for a spec: N tasks share its runs on this root, then a job that
    /// depends on the array writes the report (scripts in ROOT/slurm/NAME/)
    Slurm(SlurmArgs),
    /// Print the runs a spec expands to and which are already finished
    Plan(PlanArgs),
    /// Write the paper-style table (Markdown, HTML), plots, sample grids and CSV of an experiment
    Report(ReportArgs),
    /// Pin an experiment's current results as a named baseline
    Baseline(BaselineArgs),
    /// Compare an experiment with a pinned baseline under the spec's [drift] tolerances
    /// (exit 1 on drift)
    Check(CheckArgs),
    /// Tracking-database tools
    Db(DbArgs),
    /// List experiments, or the runs of one
    List(ListArgs),
    /// Show one run: parameters, status, metrics, evals, artifacts
    Show(ShowArgs),
    /// The parameters that differ between two runs, and their metric differences (B − A)
    Compare(CompareArgs),
    /// FID between two image folders or .npz statistics (mu, sigma; pytorch-fid's format)
    Fid(FidArgs),
    /// Measure training and sampling throughput of named workloads (one JSON object per line)
    Bench(BenchArgs),
    /// Check that a device computes what the CPU computes (one JSON object per check; exit 1 on a
    /// failed check)
    ///
    /// Builds each generator variant (MAR and AR, Diffusion Loss and cross-entropy, f32 and bf16),
    /// the VQ and KL tokenizers, the classifier and Inception-v3 from the same seed on the CPU and
    /// on DEVICE, with the same batches, masks and noise, and compares initial weights, losses,
    /// gradients, weights after three AdamW steps, guided samples and features.
    Selftest(SelftestArgs),
    /// Convert an official MAR PyTorch checkpoint (.pth) to safetensors plus config.json
    ///
    /// Reads the dict the official MAR code saves ({'model', 'model_ema', 'optimizer', 'epoch',
    /// 'args'}), infers the MAR configuration from the tensor shapes (widths, depths, sequence
    /// length, buffer size, token width, class count, Diffusion Loss width and depth), checks every
    /// tensor our MAR needs (names are the reference state_dict names) and writes
    /// OUT/model.safetensors, OUT/model_ema.safetensors and OUT/config.json. Nothing is written
    /// when anything is missing or mis-shaped.
    Import(ImportArgs),
    /// Sample tokens from imported MAR weights (see `ablate import`) with ablate's MAR sampler
    ///
    /// Writes OUT (safetensors) with `tokens` (B, L, token_dim), the same as tokenizer latents
    /// `latents` (B, C, H, W) (the reference's unpatchify) and `labels` (B). Images are not
    /// decoded: the reference's KL-16 VAE is not part of ablate; the official code decodes
    /// `latents / 0.2325` with it.
    Sample(SampleArgs),
    /// On node K of a multi-node `ablate run --nnodes M`: start this node's --nproc ranks for each
    /// training node 0 posts under ROOT/ranks/, until node 0's runs are done
    Ranks(RanksArgs),
    /// One data-parallel rank of a training that `ablate run --nproc N` started (rank 0 starts
    /// this; it is not meant to be run by hand)
    #[command(hide = true)]
    Rank(RankArgs),
}

/// The arguments of `ablate ranks`.
#[derive(clap::Args, Debug)]
pub struct RanksArgs {
    /// Ranks on this node (node 0's `ablate run --nproc`)
    #[arg(long, value_name = "N")]
    pub nproc: usize,
    /// Nodes in all (node 0's `ablate run --nnodes`)
    #[arg(long, value_name = "M")]
    pub nnodes: usize,
    /// This node, 1 to M − 1 (node 0 runs `ablate run`)
    #[arg(long, value_name = "K")]
    pub node_rank: usize,
    /// node 0's `ablate run --rendezvous`. A NAME used for one job only (node.sh uses the Slurm
    /// job id) also lets a node that starts after node 0 has finished see that it is done;
    /// without one, start this before or with node 0's `ablate run`
    #[arg(long, value_name = "NAME")]
    pub rendezvous: Option<String>,
}

/// The arguments of the hidden `ablate rank`.
#[derive(clap::Args, Debug)]
pub struct RankArgs {
    /// The job file rank 0 wrote under ROOT/ranks/
    pub job: PathBuf,
    /// This process's rank, 1 to N − 1
    #[arg(long)]
    pub rank: usize,
}

/// The arguments of `ablate run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    pub spec: PathBuf,
    /// Override a key of the spec: --set train.steps=200
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// cpu or cuda:N (overrides the spec's `device`)
    #[arg(long)]
    pub device: Option<String>,
    /// Do not write the report at the end
    #[arg(long)]
    pub no_report: bool,
    /// Processes sharing the runs: this one and N − 1 workers (logs in ROOT/logs/), each
    /// with cores / N threads unless RAYON_NUM_THREADS is set
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub jobs: usize,
    /// Data-parallel processes per training: this one (rank 0, which records) and N − 1 rank
    /// processes, one per device of `train.devices` (or N on the run's device), each computing
    /// batch / N rows of every step
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nproc: usize,
    /// Nodes of each training: this is node 0, and `ablate ranks --node-rank K` on each other
    /// node (same root, same --nproc and --nnodes) starts that node's ranks
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub nnodes: usize,
    /// The name or address under which the other nodes reach this one (default: its host name)
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// Where the nodes of one job meet: ROOT/ranks/NAME (default ROOT/ranks), so that several
    /// multi-node jobs can share a root (e.g. NAME = the Slurm job id)
    #[arg(long, value_name = "NAME")]
    pub rendezvous: Option<String>,
}

/// The arguments of `ablate slurm`.
#[derive(clap::Args, Debug)]
pub struct SlurmArgs {
    pub spec: PathBuf,
    /// Array tasks: processes sharing the spec's runs
    #[arg(long)]
    pub tasks: usize,
    #[arg(long)]
    pub partition: Option<String>,
    /// GPUs per task (each task then trains on cuda:0 of its allocation)
    #[arg(long)]
    pub gpus_per_task: Option<usize>,
    /// Wall-time limit per task, e.g. 04:00:00
    #[arg(long)]
    pub time: Option<String>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Also submit: sbatch the array and the dependent report job, print their ids
    #[arg(long)]
    pub submit: bool,
    /// Nodes per task: each task trains every run data-parallel over its nodes (one Slurm task
    /// per node runs ROOT/slurm/NAME/node.sh)
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub nodes: usize,
    /// Data-parallel processes per node (`ablate run --nproc`); with --gpus-per-task, one per GPU
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nproc: usize,
}

/// The arguments of `ablate plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    pub spec: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// The arguments of `ablate report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    pub experiment: String,
    /// Output folder (default: ROOT/reports/EXPERIMENT)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Formats to write, comma-separated
    #[arg(long, value_enum, value_delimiter = ',', default_value = "md,html,csv")]
    pub format: Vec<ReportFormat>,
    /// Version of the experiment to report (a changed configuration under the same name is a
    /// new version; see `ablate list`) [default: the latest]
    #[arg(long)]
    pub version: Option<i64>,
}

/// The arguments of `ablate baseline`.
#[derive(clap::Args, Debug)]
pub struct BaselineArgs {
    #[command(subcommand)]
    pub action: BaselineAction,
}

/// The arguments of `ablate check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    pub experiment: String,
    /// Name of the baseline (see `ablate baseline pin`)
    #[arg(long)]
    pub baseline: String,
    /// Also write the result as JUnit XML to this file
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

/// The arguments of `ablate db`.
#[derive(clap::Args, Debug)]
pub struct DbArgs {
    #[command(subcommand)]
    pub action: DbAction,
}

/// The arguments of `ablate list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Show the runs of this experiment
    pub experiment: Option<String>,
}

/// The arguments of `ablate show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    pub run: i64,
}

/// The arguments of `ablate compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    pub run_a: i64,
    pub run_b: i64,
}

/// The arguments of `ablate fid`.
#[derive(clap::Args, Debug)]
pub struct FidArgs {
    /// A B (each an image folder of PNGs or an .npz), or FOLDER OUT.npz with --save-stats
    #[arg(value_name = "PATH", num_args = 2)]
    pub paths: Vec<PathBuf>,
    /// Write the statistics of FOLDER to OUT.npz instead of computing FID
    #[arg(long)]
    pub save_stats: bool,
    /// Also print the Inception Score (10 splits) of each folder
    #[arg(long = "is")]
    pub inception_score: bool,
    /// Inception-v3 weights: pt_inception-2015-12-05-6726825d.pth or a safetensors copy
    /// (default: ROOT/weights/pt_inception-2015-12-05-6726825d.pth)
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Resize and normalisation: torch-fidelity (the paper's numbers) or pytorch-fid
    #[arg(long, default_value = "torch-fidelity")]
    pub convention: String,
    /// inception (default), or classifier:RUN for the harness's classifier of a run (id or hash)
    #[arg(long)]
    pub feature_net: Option<String>,
    /// Images per forward pass
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

/// The arguments of `ablate bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Workloads to run (default: the tiny ones); see `--list`
    #[arg(long = "workload")]
    pub workloads: Vec<String>,
    /// Timed training steps (after 2 warm-up steps); the median is reported
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Arithmetic of the generator's matrix products: f32, or bf16 with f32 master weights
    /// (as `train.precision`) [default: f32 on the CPU, bf16 on CUDA]
    #[arg(long)]
    pub precision: Option<String>,
    /// The device's peak dense TFLOP/s at that precision, for the `mfu` field [default on
    /// CUDA: 989 for bf16 and 67 for f32, an H100/H200 SXM; none on the CPU]
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Images per training step, for every workload chosen [default: each workload's own]
    #[arg(long)]
    pub batch: Option<usize>,
    /// Also time each phase of a step (forward, backward, clipping, optimizer) with the device
    /// synchronised between them, and how long the host took to queue each one
    #[arg(long)]
    pub phases: bool,
    /// Write a sampling profile of the host over the timed training steps to this file (the
    /// workload's name is added before the extension); needs a build with `--features profile`
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// List the workloads and exit
    #[arg(long)]
    pub list: bool,
}

/// The arguments of `ablate selftest`.
#[derive(clap::Args, Debug)]
pub struct SelftestArgs {
    /// cuda:N (cpu compares the CPU with itself: a determinism check)
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The arguments of `ablate import`.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The checkpoint, e.g. checkpoint-last.pth
    pub checkpoint: PathBuf,
    /// Output folder (default: the checkpoint's path without its extension)
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Attention heads of encoder and decoder (not stored in the weights; default: the
    /// reference model's from the checkpoint's args.model, else width / 64)
    #[arg(long)]
    pub heads: Option<usize>,
    /// Attention heads of the decoder (default: args.decoder_num_heads, else --heads or the
    /// encoder's)
    #[arg(long)]
    pub decoder_heads: Option<usize>,
    /// Patch size over the tokenizer latents (default: args.patch_size, else 1)
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Tokenizer stride, to state img_size (default: args.vae_stride, else 16, the KL-16 VAE)
    #[arg(long)]
    pub vae_stride: Option<usize>,
    /// Diffusion Loss noise draws per token in training (default: args, else 4)
    #[arg(long)]
    pub diffusion_batch_mul: Option<usize>,
    /// Diffusion Loss sampling steps (default: args.num_sampling_steps, else 100)
    #[arg(long)]
    pub num_sampling_steps: Option<String>,
}

/// The arguments of `ablate sample`.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// An imported folder (uses model_ema.safetensors, or model.safetensors with --no-ema)
    /// or one safetensors file
    #[arg(long, value_name = "DIR_OR_FILE")]
    pub weights: PathBuf,
    /// The config.json (default: the one in the folder / beside the file)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Use the trained weights (`model`) instead of their EMA (`model_ema`)
    #[arg(long)]
    pub no_ema: bool,
    /// Class labels to sample, comma-separated; cycled to --count (default: all classes)
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<u32>,
    /// Number of samples (default: one per class of --classes, or per class of the model)
    #[arg(long)]
    pub count: Option<usize>,
    /// MAR sampling steps (clamped to the number of tokens)
    #[arg(long, default_value_t = 64)]
    pub mar_steps: usize,
    /// Classifier-free guidance scale (1 = none)
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f64,
    /// How the guidance scale grows over the steps
    #[arg(long, value_enum, default_value = "linear")]
    pub cfg_schedule: CfgScheduleArg,
    /// Temperature of the Diffusion Loss sampler
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Diffusion Loss sampling steps (default: config.json's num_sampling_steps)
    #[arg(long)]
    pub diffusion_steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images sampled together
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output safetensors file
    #[arg(long, value_name = "FILE", default_value = "samples.safetensors")]
    pub out: PathBuf,
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
pub(crate) use harness::Error::Usage as UsageError;

/// The exit code of a failed command, from its error's kind: the library's errors say theirs
/// ([`harness::Error::exit_code`]: 128 + the signal for a stop, 2 for a request at fault, else
/// 1, and the CLI's own mistakes are its `Usage`); the spec's and the reports' usage errors are
/// 2; anything else is 1.
fn exit_code(e: &anyhow::Error) -> i32 {
    if let Some(e) = e.downcast_ref::<harness::Error>() {
        return e.exit_code();
    }
    if let Some(stopped) = e.downcast_ref::<harness::stop::Stopped>() {
        return stopped.exit_code();
    }
    let usage = e.downcast_ref::<spec::SpecError>().is_some()
        || e.downcast_ref::<harness::import::CheckpointError>()
            .is_some()
        || e.downcast_ref::<reports::Error>()
            .is_some_and(reports::Error::is_usage);
    if usage {
        2
    } else {
        1
    }
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
        // colour codes only for a terminal, not in logs and pipes
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = harness::stop::install() {
        eprintln!("warning: SIGINT/SIGTERM will end ablate without a checkpoint: {e}");
    }
    // processes on this machine, each with its share of the cores
    let processes = match &cli.command {
        Command::Run(RunArgs { jobs, nproc, .. }) => jobs * nproc,
        _ => 1,
    };
    if processes > 1 {
        // before the thread pool exists: rayon and candle's CPU kernels both read it
        let threads = crate::workers::threads_per_job(processes);
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    match crate::workers::on_cpu_pool(move || run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", harness::error::describe(e.as_ref()));
            exit_code(&e)
        }
    }
}

/// The summary of `ablate import`.
fn print_import(checkpoint: &std::path::Path, r: &harness::import::ImportReport) {
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

/// "opening the tracking database LOCATION" around an error that does not name it already.
pub(crate) fn opening(location: &str) -> impl FnOnce(db::Error) -> anyhow::Error + '_ {
    move |e| match e {
        e @ db::Error::Unwritable { .. } => e.into(),
        e => anyhow::Error::new(e).context(format!("opening the tracking database {location}")),
    }
}

/// The tracking database of a root that must already have one (report, list, show, compare).
fn open_db(layout: &Layout) -> anyhow::Result<Db> {
    layout
        .open_existing_db()
        .map_err(opening(&layout.db_location()))
}

/// [`open_db`] for commands that only read the database (report, list, show, compare, check,
/// plan): read-only where this user cannot write it, with a note on stderr.
fn open_db_to_read(layout: &Layout) -> anyhow::Result<Db> {
    let db = layout
        .open_db_to_read()
        .map_err(opening(&layout.db_location()))?;
    if db.is_read_only() {
        eprintln!(
            "note: {} cannot be written here; it is opened read-only",
            layout.db_location()
        );
    }
    Ok(db)
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
    db.map_err(opening(&db::redact(location)))
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

/// Run the command; its exit code.
fn run(cli: Cli) -> anyhow::Result<i32> {
    let layout = Layout {
        root: cli.root.clone(),
        db_url: cli.db.clone(),
    };
    match cli.command {
        Command::Run(args) => run::run_spec(&layout, cli.quiet, args),
        Command::Slurm(args) => run::slurm(&layout, args),
        Command::Plan(args) => run::plan(&layout, args),
        Command::Report(args) => results::report(&layout, args),
        Command::Db(args) => results::db(&layout, args),
        Command::Baseline(args) => results::baseline(&layout, args),
        Command::Check(args) => results::check(&layout, args),
        Command::List(args) => results::list(&layout, args),
        Command::Fid(args) => tools::fid(&layout, args),
        Command::Bench(args) => tools::bench(args),
        Command::Selftest(args) => tools::selftest(args),
        Command::Import(args) => tools::import(args),
        Command::Sample(args) => tools::sample(cli.quiet, args),
        Command::Compare(args) => results::compare(&layout, args),
        Command::Show(args) => results::show(&layout, args),
        Command::Rank(args) => run::rank(args),
        Command::Ranks(args) => run::ranks(&layout, args),
    }
}
