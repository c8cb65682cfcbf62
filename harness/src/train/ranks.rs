//! Data-parallel ranks as processes (`ablate run --nproc N`), one process per device.
//!
//! Rank 0 is the `ablate run` process: it plans, records and evaluates as always. For each
//! generator training it listens on a TCP port, writes a [`RankJob`] (the run, the devices, its
//! address) under `ROOT/ranks/`, and starts ranks 1..N as `ablate rank JOB --rank R`. Each rank
//! loads the data and the tokenizer that rank 0 has already cached, builds the same seeded model,
//! connects, and trains its share of every batch without a [`Lead`]: it writes nothing. The ranks
//! sum through rank 0 ([`TcpRanks`]), in rank order, as the threads of
//! [`LocalGroup`](crate::train::collective::LocalGroup) do.
//!
//! A rank that dies closes its connection, so every other rank's next sum fails instead of
//! waiting; rank 0 then reports the dead rank's exit status and the end of its log.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use models::init::seeded_var_builder;
use models::Generator;
use serde::{Deserialize, Serialize};

use crate::spec::PlannedRun;
use crate::tokenize::Tokenizer;
use crate::train::collective::{Collective, CollectiveError};
use crate::train::generator::{train_generator, Lead, TrainJob, TrainTokens};
use crate::train::Ema;
use crate::{Error, Result};

/// How long rank 0 waits for the other ranks to load their data and connect.
const CONNECT_PATIENCE: Duration = Duration::from_secs(600);

/// How long a stopped `ablate ranks` waits for node 0 to checkpoint and end.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// What a rank process needs to train its share of one run, written by rank 0 as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct RankJob {
    pub run: PlannedRun,
    /// ranks in all, over every node
    pub world: usize,
    /// the devices of each node's ranks, its first rank's first: rank r uses
    /// `devices[r % devices.len()]` (one entry per process of a node)
    pub devices: Vec<String>,
    /// rank 0's listening address, host:port
    pub address: String,
    /// names this training's ranks: a connection that brings another number is turned away
    pub token: u64,
    /// the fitted tokenizer rank 0 cached (nothing is read for patch tokenizers)
    pub tokenizer: PathBuf,
    /// the training's checkpoint folder: every rank resumes from rank 0's checkpoint
    pub dir: PathBuf,
}

impl RankJob {
    /// Rank `rank`'s device.
    pub fn device(&self, rank: usize) -> &str {
        &self.devices[rank % self.devices.len().max(1)]
    }

    pub fn read(path: &Path) -> Result<RankJob> {
        let text = std::fs::read_to_string(path).map_err(Error::file(path))?;
        let job: RankJob = serde_json::from_str(&text).map_err(|e| {
            Error::Usage(format!(
                "{}: not a rank job written by `ablate run --nproc`: {e}",
                path.display()
            ))
        })?;
        if job.world < 2 || job.devices.is_empty() {
            return Err(Error::Usage(format!(
                "{}: a rank job needs at least 2 ranks and a device, found {} and {:?}",
                path.display(),
                job.world,
                job.devices
            )));
        }
        Ok(job)
    }
}

/// Ranks 1..N of one training (rank `rank` of [`RankJob::world`]): train this rank's share.
/// Returns when the training ends; rank 0 saves the weights.
pub fn train_rank(job: &RankJob, rank: usize) -> Result<()> {
    let world = job.world;
    if rank == 0 || rank >= world {
        return Err(Error::Usage(format!(
            "--rank {rank}: this job has ranks 1 to {} (rank 0 is the `ablate run` process)",
            world - 1
        )));
    }
    let run = &job.run;
    let device = crate::device::parse_device(job.device(rank))?;
    let ds = crate::data::load(&run.spec.data)?;
    let tok = Tokenizer::load(
        run.tokenizer(),
        ds.train.channels,
        ds.train.size,
        &job.tokenizer,
        &device,
    )?;
    let data = tok.encode(&ds.train)?;
    let tokens = TrainTokens::new(&tok, &data, &ds.train, run)?;
    let cfg = crate::generator::config(run, &tok, ds.classes);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, run.seed, DType::F32, &device);
    let generator = Generator::new(&cfg, vb)?;
    let tcp = TcpRanks::connect(&job.address, rank, world, job.token)?;
    let ranks = rank_collective(tcp, &job.devices, &device)?;
    let train = TrainJob {
        tokens: &tokens,
        train: &ds.train,
        run,
        tok: &tok,
        dir: &job.dir,
        quiet: true,
    };
    train_generator(&train, &generator, &varmap, &device, ranks.as_ref(), None)?;
    Ok(())
}

/// How the rank processes of a training on `devices` (one node's, one per process) sum their
/// gradients: `"nccl"` on the GPUs (built with `--features nccl`, every device CUDA and none
/// named twice: NCCL refuses two ranks on one GPU), else `"tcp"` through host memory.
pub fn gradient_collective(devices: &[String]) -> &'static str {
    let all_cuda = devices.iter().all(|d| d.starts_with("cuda"));
    let distinct = devices
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len()
        == devices.len();
    if cfg!(feature = "nccl") && all_cuda && distinct {
        "nccl"
    } else {
        "tcp"
    }
}

/// One rank's collective over its connection `tcp`: with NCCL ([`gradient_collective`]) the
/// gradients go over NCCL and the few host values of a step over `tcp`; else all over `tcp`.
/// Every rank decides alike, from the job's devices.
fn rank_collective(
    tcp: TcpRanks,
    devices: &[String],
    device: &Device,
) -> Result<Box<dyn Collective>> {
    if gradient_collective(devices) == "nccl" {
        #[cfg(feature = "nccl")]
        return Ok(Box::new(crate::train::nccl::NcclRanks::new(tcp, device)?));
    }
    let _ = device;
    Ok(Box::new(tcp))
}

/// How rank 0 starts the other ranks.
#[derive(Debug, Clone)]
pub struct ProcessRanks {
    /// ranks per node, rank 0's process included on node 0
    pub nproc: usize,
    /// nodes: the ranks of nodes 1.. are started by `ablate ranks` on each ([`serve_node`])
    pub nnodes: usize,
    /// the name or address under which the other nodes reach rank 0 (unused on one node)
    pub master_addr: String,
    /// the `ablate` executable the ranks run
    pub exe: PathBuf,
    /// CPU threads of each rank (`RAYON_NUM_THREADS`)
    pub threads: usize,
    /// the folder where rank 0 posts its job files and the other nodes look for them
    /// (`ROOT/ranks`, or `ROOT/ranks/NAME` with `--rendezvous NAME`)
    pub rendezvous: PathBuf,
}

/// Where the ranks of one training log, and what they read besides the job.
pub struct RankFiles<'a> {
    /// the ranks' logs (`ROOT/logs`)
    pub logs: &'a Path,
    /// the fitted tokenizer
    pub tokenizer: &'a Path,
}

/// Stage 2 with the ranks as processes: rank 0 trains `model` here with the `lead`, ranks
/// 1..nproc train as `ablate rank` processes on `devices[1..]` (one per process of a node), and
/// the ranks of nodes 1.. as the `ablate ranks` of those nodes start them. A rank that fails stops
/// the others; a local rank's error (exit status and the end of its log) comes first.
pub fn train_process_ranks(
    job: &TrainJob,
    launch: &ProcessRanks,
    devices: &[String],
    files: &RankFiles,
    (generator, varmap, device): (&Generator, &VarMap, &Device),
    lead: Lead,
) -> Result<Option<Ema>> {
    let world = launch.nproc * launch.nnodes;
    // one node: the loopback interface alone; several: every interface, under the master's name
    let host = if launch.nnodes > 1 {
        "0.0.0.0"
    } else {
        "127.0.0.1"
    };
    let listener = TcpListener::bind((host, 0))
        .map_err(|e| Error::Other(format!("data-parallel ranks: cannot listen on TCP: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("data-parallel ranks: {e}")))?
        .port();
    let address = match launch.nnodes {
        1 => format!("127.0.0.1:{port}"),
        _ => format!("{}:{port}", launch.master_addr),
    };
    let name = job
        .dir
        .file_name()
        .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
    let rank_job = RankJob {
        run: job.run.clone(),
        world,
        devices: devices.to_vec(),
        address,
        token: fresh_token(),
        tokenizer: files.tokenizer.to_path_buf(),
        dir: job.dir.to_path_buf(),
    };
    let jobs = &launch.rendezvous;
    let job_path = jobs.join(format!("{name}.json"));
    db::files::create_folder(jobs).map_err(Error::file(jobs))?;
    db::files::create_folder(files.logs).map_err(Error::file(files.logs))?;
    let text = serde_json::to_vec_pretty(&rank_job)?;
    db::files::write_atomic(&job_path, |tmp| std::fs::write(tmp, &text))
        .map_err(Error::file(&job_path))?;
    // gone however this ends, so that no node serves a training that is over
    let _posted = RemoveOnDrop(job_path.clone());

    let mut children = Vec::new();
    for rank in 1..launch.nproc {
        match RankProcess::start(launch, &job_path, rank, files.logs, &name) {
            Ok(p) => children.push(p),
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
    }
    let token = rank_job.token;
    // a rank of another node that failed: its node posted why
    let remote = || remote_failure(jobs, &name, token, launch.nproc..world);
    // the shared folder is read about once a second while the ranks connect
    let mut looked = Instant::now();
    let accepted = TcpRanks::accept(&listener, world, token, CONNECT_PATIENCE, || {
        let local = children.iter_mut().find_map(RankProcess::ended);
        if local.is_some() || launch.nnodes == 1 || looked.elapsed() < Duration::from_secs(1) {
            return local;
        }
        looked = Instant::now();
        remote()
    });
    let ranks = match accepted.and_then(|tcp| rank_collective(tcp, devices, device)) {
        Ok(r) => r,
        Err(e) => {
            stop_all(&mut children);
            return Err(e);
        }
    };
    let lead = train_generator(job, generator, varmap, device, ranks.as_ref(), Some(lead));
    // closing the connections ends a rank still waiting for a sum (rank 0 failed)
    drop(ranks);
    // a rank that failed on its own (not because another one stopped, exit code 3) is the cause
    let (mut cause, mut echo) = (None, None);
    for mut p in children {
        let status = p.child.wait();
        let code = status.as_ref().ok().and_then(|s| s.code());
        if status.as_ref().is_ok_and(|s| s.success()) {
            continue;
        }
        let text = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let slot = if code == Some(3) {
            &mut echo
        } else {
            &mut cause
        };
        if slot.is_none() {
            *slot = Some(p.failure(&text));
        }
    }
    let someone_stopped = echo.is_some() || matches!(lead, Err(Error::Collective(_)));
    if cause.is_none() && someone_stopped && launch.nnodes > 1 {
        // a rank of another node stopped: give its node a moment to post why
        let deadline = Instant::now() + Duration::from_secs(5);
        while cause.is_none() && Instant::now() < deadline {
            cause = remote();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for rank in launch.nproc..world {
        let _ = std::fs::remove_file(failure_report(jobs, &name, token, rank));
    }
    // the rank that failed on its own comes first; the others' sums then failed
    match (lead, cause.or(echo)) {
        (Err(Error::Collective(_)), Some(f)) => Err(f),
        (Err(e), _) => Err(e),
        (Ok(_), Some(f)) => Err(f),
        (Ok(ema), None) => Ok(ema),
    }
}

/// Where a node's `ablate ranks` says why rank `rank` of training `name` (job `token`) failed,
/// for rank 0 to report it.
fn failure_report(jobs: &Path, name: &str, token: u64, rank: usize) -> PathBuf {
    jobs.join(format!("{name}-{token:016x}.rank-{rank}.failed"))
}

/// The first failure another node posted for these ranks of the training, if any.
fn remote_failure(
    jobs: &Path,
    name: &str,
    token: u64,
    ranks: std::ops::Range<usize>,
) -> Option<Error> {
    ranks
        .filter_map(|r| std::fs::read_to_string(failure_report(jobs, name, token, r)).ok())
        .find(|text| !text.is_empty())
        .map(Error::Other)
}

/// The file with which `ablate run --nnodes` tells the other nodes that its runs are done.
pub fn end_marker(jobs: &Path) -> PathBuf {
    jobs.join("END")
}

/// Node 0's side of a multi-node rendezvous folder: cleared of an earlier run's files when it is
/// opened, and marked ended ([`end_marker`]) when dropped, however node 0's `ablate run` ends
/// (an error, a stop, a panic), so that the other nodes' `ablate ranks` end too.
pub struct NodeZero {
    dir: PathBuf,
}

impl NodeZero {
    /// `named`: the folder was named for this job (`--rendezvous`), and a folder that an earlier
    /// job ended in is refused, since that job's nodes could take its end for this one's.
    pub fn open(dir: &Path, named: bool) -> Result<NodeZero> {
        let end = end_marker(dir);
        if named && end.exists() {
            return Err(Error::Usage(format!(
                "--rendezvous: {} was used by a job that has ended (it holds END); give each job \
                 its own name (node.sh uses the Slurm job id), or remove the folder",
                dir.display()
            )));
        }
        db::files::create_folder(dir).map_err(Error::file(dir))?;
        // an earlier run's end marker and the job files of a node 0 that was killed
        let stale = std::fs::read_dir(dir).map_err(Error::file(dir))?;
        for entry in stale.flatten() {
            let path = entry.path();
            let stale = path
                .extension()
                .is_some_and(|x| x == "json" || x == "failed");
            if path == end || stale {
                std::fs::remove_file(&path).map_err(Error::file(&path))?;
            }
        }
        Ok(NodeZero {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for NodeZero {
    fn drop(&mut self) {
        let end = end_marker(&self.dir);
        if let Err(e) = db::files::write_atomic(&end, |tmp| std::fs::write(tmp, b"")) {
            eprintln!(
                "could not tell the other nodes that the runs are done ({}): {e}",
                end.display()
            );
        }
    }
}

/// `ablate ranks` on node `node` (1 ≤ node < nnodes): start this node's `nproc` ranks for every
/// training that rank 0 posts in the rendezvous folder, one training after the other, until
/// rank 0's process says its runs are done ([`end_marker`]) or a stop. Each training's ranks log to
/// `logs`; a training whose ranks failed is reported and the next one is served.
///
/// In a rendezvous folder used once (`own_folder`: named after a Slurm job) any end marker is
/// this job's, even one written before this process started; in a shared folder only a marker
/// newer than this process counts, since an older one is an earlier run's.
pub fn serve_node(
    logs: &Path,
    launch: &ProcessRanks,
    node: usize,
    own_folder: bool,
    say: &dyn Fn(String),
) -> Result<usize> {
    if node == 0 || node >= launch.nnodes {
        return Err(Error::Usage(format!(
            "--node-rank {node}: expected 1 to {} (node 0 runs `ablate run`)",
            launch.nnodes.saturating_sub(1)
        )));
    }
    let world = launch.nproc * launch.nnodes;
    let jobs = &launch.rendezvous;
    db::files::create_folder(logs).map_err(Error::file(logs))?;
    // node 0 removes an earlier end marker when it starts and writes its own when it is done, so
    // a marker counts once it differs from the one seen now (the file server's times alone are
    // compared, never this machine's clock); in a job's own folder any marker is the job's
    let modified = || {
        std::fs::metadata(end_marker(jobs))
            .and_then(|m| m.modified())
            .ok()
    };
    let earlier = if own_folder { None } else { modified() };
    let mut served: std::collections::HashSet<(PathBuf, u64)> = Default::default();
    let mut count = 0;
    let ended = || modified().is_some_and(|t| Some(t) != earlier);
    loop {
        if ended() {
            return Ok(count);
        }
        if crate::stop::requested().is_some() {
            // a stop (scancel, the time limit) reached every process of the job: node 0 is
            // checkpointing; wait for it to end, so that this node's early exit does not end the
            // job step under it (srun --kill-on-bad-exit), then end without an error
            let deadline = Instant::now() + STOP_GRACE;
            while !ended() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            say(format!("node {node}: stopped"));
            return Ok(count);
        }
        let mut posted: Vec<PathBuf> = std::fs::read_dir(jobs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        posted.retain(|p| p.extension().is_some_and(|x| x == "json"));
        posted.sort();
        for path in posted {
            // a file being replaced or already removed is looked at again next time
            let Ok(job) = RankJob::read(&path) else {
                continue;
            };
            if !served.insert((path.clone(), job.token)) {
                continue;
            }
            if job.world != world || job.devices.len() != launch.nproc {
                say(format!(
                    "not serving {}: node 0 runs {} ranks, {} per node, and this node was started \
                     for {world}, {} per node (give `ablate ranks` node 0's --nproc and --nnodes)",
                    path.display(),
                    job.world,
                    job.devices.len(),
                    launch.nproc
                ));
                continue;
            }
            let name = path
                .file_stem()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            say(format!(
                "training {name}: ranks {} to {}",
                node * launch.nproc,
                (node + 1) * launch.nproc - 1
            ));
            // a failed rank is posted as soon as it ends, for rank 0 to report
            let post = |rank: usize, e: Error| {
                let text = format!("node {node}: {e}");
                say(format!("  {text}"));
                let report = failure_report(jobs, &name, job.token, rank);
                if let Err(e) = db::files::write_atomic(&report, |tmp| std::fs::write(tmp, &text)) {
                    say(format!(
                        "  could not post it to node 0 ({}): {e}",
                        report.display()
                    ));
                }
            };
            let mut running = Vec::new();
            for rank in node * launch.nproc..(node + 1) * launch.nproc {
                match RankProcess::start(launch, &path, rank, logs, &name) {
                    Ok(p) => running.push(p),
                    Err(e) => post(rank, e),
                }
            }
            while !running.is_empty() {
                let mut still = Vec::new();
                for mut p in running {
                    // a rank stopped by a signal (SIGINT, SIGTERM: 128 + it) or by another
                    // rank's stop (3) did not fail on its own: nothing to post
                    match p.child.try_wait() {
                        Ok(None) => still.push(p),
                        Ok(Some(s)) if s.success() => {}
                        Ok(Some(s)) if matches!(s.code(), Some(3 | 130 | 143)) => {}
                        Ok(Some(s)) => post(p.rank, p.failure(&s.to_string())),
                        Err(e) => post(p.rank, p.failure(&e.to_string())),
                    }
                }
                running = still;
                std::thread::sleep(Duration::from_millis(50));
            }
            count += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A file removed when this is dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A rank process and its log.
struct RankProcess {
    rank: usize,
    child: Child,
    log: PathBuf,
}

impl RankProcess {
    /// Start rank `rank` of the training posted at `job` (named `name`), logging to
    /// `logs/rank-NAME-RANK.log`.
    fn start(
        launch: &ProcessRanks,
        job: &Path,
        rank: usize,
        logs: &Path,
        name: &str,
    ) -> Result<RankProcess> {
        let log = logs.join(format!("rank-{name}-{rank}.log"));
        let file = std::fs::File::create(&log).map_err(Error::file(&log))?;
        let err = file.try_clone().map_err(Error::file(&log))?;
        let child = Command::new(&launch.exe)
            .arg("rank")
            .arg(job)
            .arg("--rank")
            .arg(rank.to_string())
            .env("RAYON_NUM_THREADS", launch.threads.to_string())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                Error::Other(format!(
                    "starting data-parallel rank {rank} ({}): {e}",
                    launch.exe.display()
                ))
            })?;
        Ok(RankProcess { rank, child, log })
    }

    /// The error of this rank, ended with `status`: its log's last lines say why.
    fn failure(&self, status: &str) -> Error {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n    ");
        Error::Other(format!(
            "data-parallel rank {} ended with {status}; its log {}:\n    {tail}",
            self.rank,
            self.log.display()
        ))
    }

    /// Some(why) when the process has already ended (before connecting).
    fn ended(&mut self) -> Option<Error> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(self.failure(&status.to_string())),
            Ok(None) => None,
            Err(e) => Some(self.failure(&e.to_string())),
        }
    }
}

fn stop_all(children: &mut [RankProcess]) {
    for p in children {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}

/// A number no other training's ranks bring: the clock and this process.
fn fresh_token() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// The ranks of one training over TCP, in a star: rank 0 holds a connection to every other rank,
/// receives their buffers in rank order, sums them after its own and sends the sum back.
#[derive(Debug)]
pub struct TcpRanks {
    rank: usize,
    world: usize,
    /// rank 0: the connections to ranks 1..N in order; another rank: its connection to rank 0
    links: Vec<TcpStream>,
}

impl TcpRanks {
    /// Rank 0: wait for ranks 1..`world` to connect with `token`. Gives up after `patience`, or
    /// as soon as `ended` reports that a rank's process is gone.
    pub fn accept(
        listener: &TcpListener,
        world: usize,
        token: u64,
        patience: Duration,
        mut ended: impl FnMut() -> Option<Error>,
    ) -> Result<TcpRanks> {
        let fail = |reason: String| CollectiveError {
            rank: 0,
            world,
            reason,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let deadline = Instant::now() + patience;
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, _)) => {
                    // a stray connection (another program, a rank of an earlier training) is
                    // turned away; a rank of this one says who it is
                    if let Some((rank, stream)) = hello(stream, world, token) {
                        if slots[rank - 1].is_none() {
                            slots[rank - 1] = Some(stream);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(e) = ended() {
                        return Err(e);
                    }
                    crate::stop::check()?;
                    if Instant::now() > deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(fail(format!(
                            "ranks {} did not connect within {} s",
                            missing.join(", "),
                            patience.as_secs()
                        ))
                        .into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // a connection that went away before it was taken, or a signal: try again
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(fail(e.to_string()).into()),
            }
        }
        Ok(TcpRanks {
            rank: 0,
            world,
            links: slots.into_iter().flatten().collect(),
        })
    }

    /// Rank `rank` (≥ 1): connect to rank 0 at `address` and say who this is.
    pub fn connect(address: &str, rank: usize, world: usize, token: u64) -> Result<TcpRanks> {
        let fail = |reason: String| CollectiveError {
            rank,
            world,
            reason,
        };
        let mut stream = TcpStream::connect(address)
            .map_err(|e| fail(format!("cannot reach rank 0 at {address}: {e}")))?;
        let _ = stream.set_nodelay(true);
        keep_alive(&stream);
        let mut intro = Vec::with_capacity(24);
        for v in [token, rank as u64, world as u64] {
            intro.extend(v.to_le_bytes());
        }
        stream
            .write_all(&intro)
            .map_err(|e| fail(format!("introducing this rank to rank 0: {e}")))?;
        Ok(TcpRanks {
            rank,
            world,
            links: vec![stream],
        })
    }
}

/// Read a connecting rank's introduction: its rank when it belongs to this training.
fn hello(mut stream: TcpStream, world: usize, token: u64) -> Option<(usize, TcpStream)> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut intro = [0u8; 24];
    stream.read_exact(&mut intro).ok()?;
    let word = |i: usize| u64::from_le_bytes(intro[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let (their_token, rank, their_world) = (word(0), word(1) as usize, word(2) as usize);
    if their_token != token || their_world != world || rank == 0 || rank >= world {
        return None;
    }
    stream.set_read_timeout(None).ok()?;
    let _ = stream.set_nodelay(true);
    keep_alive(&stream);
    Some((rank, stream))
}

/// Probe an idle connection, so that a rank on a machine that vanished (no close ever comes)
/// fails the others' sums within about two minutes instead of leaving them waiting: the first
/// probe after 60 s of silence, then every 10 s, 6 unanswered ones end it; and data unacknowledged
/// for 2 minutes (a send blocked on a large buffer) ends it too. Best effort; on Linux (elsewhere
/// only the system's default keepalive).
fn keep_alive(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    #[cfg(target_os = "linux")]
    let options = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 120_000),
    ];
    #[cfg(not(target_os = "linux"))]
    let options = [(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)];
    for (level, name, value) in options {
        let value: libc::c_int = value;
        // SAFETY: setsockopt(2) on an open socket this stream owns, with a pointer to a c_int
        // and its size; nothing else is touched
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Send `values` as a length and little-endian floats.
fn send(mut stream: &TcpStream, values: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + 4 * values.len());
    bytes.extend((values.len() as u64).to_le_bytes());
    for v in values {
        bytes.extend(v.to_le_bytes());
    }
    stream.write_all(&bytes)
}

/// Receive a buffer sent by [`send`] into `out` (its length must match).
fn receive(mut stream: &TcpStream, out: &mut [f32]) -> std::io::Result<()> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    if u64::from_le_bytes(len) != out.len() as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "ranks summed buffers of different lengths ({} and {})",
                u64::from_le_bytes(len),
                out.len()
            ),
        ));
    }
    let mut bytes = vec![0u8; 4 * out.len()];
    stream.read_exact(&mut bytes)?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

impl Collective for TcpRanks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> std::result::Result<(), CollectiveError> {
        let fail = |peer: usize, e: std::io::Error| CollectiveError {
            rank: self.rank,
            world: self.world,
            reason: match e.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe => format!("rank {peer} stopped"),
                std::io::ErrorKind::TimedOut => {
                    format!("rank {peer} stopped answering (its machine or the network is gone)")
                }
                _ => format!("exchange with rank {peer}: {e}"),
            },
        };
        if self.rank == 0 {
            // from zero, in rank order: the additions of the in-process group, on every run
            // (0 + v is v, but for −0, which becomes +0: adding 0 in place does the same)
            for v in values.iter_mut() {
                *v += 0.0;
            }
            let mut part = vec![0f32; values.len()];
            for (i, link) in self.links.iter().enumerate() {
                receive(link, &mut part).map_err(|e| fail(i + 1, e))?;
                for (s, p) in values.iter_mut().zip(&part) {
                    *s += p;
                }
            }
            for (i, link) in self.links.iter().enumerate() {
                send(link, values).map_err(|e| fail(i + 1, e))?;
            }
        } else {
            let link = &self.links[0];
            send(link, values).map_err(|e| fail(0, e))?;
            receive(link, values).map_err(|e| fail(0, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::collective::LocalGroup;

    #[test]
    fn gradients_go_over_nccl_only_between_distinct_gpus_of_an_nccl_build() {
        let on = |names: &[&str]| {
            let devices: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            gradient_collective(&devices)
        };
        let nccl = if cfg!(feature = "nccl") {
            "nccl"
        } else {
            "tcp"
        };
        assert_eq!(on(&["cuda:0", "cuda:1"]), nccl);
        assert_eq!(on(&["cuda:0"]), nccl);
        // NCCL refuses two ranks on one GPU; a CPU rank has no NCCL
        assert_eq!(on(&["cuda:0", "cuda:0"]), "tcp");
        assert_eq!(on(&["cuda:0", "cpu"]), "tcp");
        assert_eq!(on(&["cpu", "cpu"]), "tcp");
    }

    /// Three ranks over TCP (threads here, processes in `ablate run --nproc`) get exactly the
    /// sums the in-process group gives, round after round; a stray connection is turned away, and
    /// a rank that stops fails the others' next sum instead of leaving them waiting.
    #[test]
    fn tcp_ranks_sum_like_the_in_process_group_and_a_stopped_rank_fails_the_others() {
        let world = 3;
        let rounds = |r: usize| -> Vec<Vec<f32>> {
            (0..20)
                .map(|k| {
                    (0..257)
                        .map(|j| ((r * 31 + k * 7 + j) as f32).sin())
                        .collect()
                })
                .collect()
        };
        let group = LocalGroup::new(world);
        let expected: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let group = &group;
                    s.spawn(move || {
                        let rank = group.rank(r);
                        let out = rounds(r)
                            .into_iter()
                            .map(|mut v| {
                                rank.all_reduce_sum(&mut v).expect("sum");
                                v
                            })
                            .collect::<Vec<_>>();
                        rank.finish();
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("rank")).collect()
        });

        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("listen");
        let address = listener.local_addr().expect("address").to_string();
        let token = 42;
        let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            // a connection with the wrong token is turned away before the ranks arrive
            let stray = TcpRanks::connect(&address, 1, world, token + 1).expect("stray connects");
            let others: Vec<_> = (1..world)
                .map(|r| {
                    let address = address.clone();
                    s.spawn(move || {
                        let ranks = TcpRanks::connect(&address, r, world, token).expect("connect");
                        rounds(r)
                            .into_iter()
                            .map(|mut v| {
                                ranks.all_reduce_sum(&mut v).expect("sum");
                                v
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let lead = TcpRanks::accept(&listener, world, token, Duration::from_secs(30), || None)
                .expect("accept");
            drop(stray);
            let mut all = vec![rounds(0)
                .into_iter()
                .map(|mut v| {
                    lead.all_reduce_sum(&mut v).expect("sum");
                    v
                })
                .collect::<Vec<_>>()];
            all.extend(others.into_iter().map(|h| h.join().expect("rank")));
            all
        });
        assert_eq!(got, expected, "bit for bit the in-process group's sums");

        // rank 2 stops after one sum: rank 0 and rank 1 fail at the next one
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("listen");
        let address = listener.local_addr().expect("address").to_string();
        std::thread::scope(|s| {
            let a = address.clone();
            let one = s.spawn(move || {
                let ranks = TcpRanks::connect(&a, 1, world, token).expect("connect");
                let mut v = vec![1.0f32; 4];
                ranks.all_reduce_sum(&mut v).expect("first sum");
                ranks.all_reduce_sum(&mut v)
            });
            let two = s.spawn(move || {
                let ranks = TcpRanks::connect(&address, 2, world, token).expect("connect");
                let mut v = vec![1.0f32; 4];
                ranks.all_reduce_sum(&mut v).expect("first sum");
                assert_eq!(v, vec![3.0; 4]);
            });
            let lead = TcpRanks::accept(&listener, world, token, Duration::from_secs(30), || None)
                .expect("accept");
            let mut v = vec![1.0f32; 4];
            lead.all_reduce_sum(&mut v).expect("first sum");
            two.join().expect("rank 2");
            let err = lead.all_reduce_sum(&mut v).expect_err("rank 2 is gone");
            assert!(err.reason.contains("rank 2 stopped"), "{err}");
            drop(lead);
            let err = one.join().expect("rank 1").expect_err("rank 0 is gone");
            assert!(err.reason.contains("rank 0"), "{err}");
        });

        // a rank that never connects: rank 0 gives up when told the process ended
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("listen");
        let err = TcpRanks::accept(&listener, 2, token, Duration::from_secs(30), || {
            Some(Error::Other("rank 1 exited".into()))
        })
        .expect_err("rank 1 ended");
        assert!(err.to_string().contains("rank 1 exited"), "{err}");
    }
}
