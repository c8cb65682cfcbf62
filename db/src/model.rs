//! Typed rows: what callers pass in and get back. Conversions from the raw SQL rows live here.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Lifecycle of a run. Stored as lower-case text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Finished,
    Failed,
    Interrupted,
}

impl RunStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Finished,
        RunStatus::Failed,
        RunStatus::Interrupted,
    ];

    /// The text stored in `runs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Finished => "finished",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "run status: expected one of queued, running, finished, failed, interrupted; found '{s}'"
                ))
            })
    }
}

/// The arm of the VQ-token + softmax-head side of a pair, as stored in `runs.arm` and written as
/// the spec's `[arms]` key: the one definition the harness and the reports share.
pub const ARM_CROSS_ENTROPY: &str = "cross-entropy";
/// The arm of the continuous-token + Diffusion Loss side of a pair (see [`ARM_CROSS_ENTROPY`]).
pub const ARM_DIFFUSION: &str = "diffusion";

/// What a run trains. Stored as lower-case text in `runs.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// An autoencoder or k-means tokenizer fit (stage 1).
    Tokenizer,
    /// The feature net FID and IS are computed with, when it is trained here.
    Classifier,
    /// An AR or MAR generator (stage 2), with its samples and evaluations.
    Generator,
}

impl RunKind {
    /// Every kind.
    pub const ALL: [RunKind; 3] = [RunKind::Tokenizer, RunKind::Classifier, RunKind::Generator];

    /// The text stored in `runs.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Tokenizer => "tokenizer",
            RunKind::Classifier => "classifier",
            RunKind::Generator => "generator",
        }
    }
}

impl fmt::Display for RunKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        RunKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "run kind: expected one of tokenizer, classifier, generator; found '{s}'"
                ))
            })
    }
}

/// A run to register (see [`crate::Db::create_run`]).
#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    /// Content hash of the resolved configuration; the run's identity.
    pub hash: &'a str,
    pub kind: RunKind,
    pub name: &'a str,
    pub cell: &'a str,
    pub arm: Option<&'a str>,
    pub seed: i64,
    /// Resolved parameters, stored as JSON with sorted keys.
    pub params: &'a serde_json::Value,
    pub git_commit: Option<&'a str>,
    pub git_dirty: bool,
    pub host: &'a str,
    pub device: &'a str,
    pub version: &'a str,
}

/// One row of `runs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub hash: String,
    pub kind: RunKind,
    pub name: String,
    pub cell: String,
    pub arm: Option<String>,
    pub seed: i64,
    pub params: serde_json::Value,
    pub status: RunStatus,
    pub stage: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub git_commit: Option<String>,
    pub git_dirty: bool,
    pub host: String,
    pub device: String,
    pub version: String,
    pub pid: Option<i64>,
    pub error: Option<String>,
}

/// What a generator run is in the paper's terms, recorded by the harness when it builds the model
/// (under the run's `params.descriptor`): what reports read, instead of the spec's layout.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunDescriptor {
    /// "ar" or "mar".
    pub generator: String,
    /// "raster" or "random" (MAR always random).
    pub order: String,
    /// Tokens per image (the built model's sequence length, whatever the tokenizer).
    pub seq_len: u64,
    /// Trainable parameters of the generator, its head included.
    pub param_count: u64,
    pub train_steps: u64,
    /// MAR's sampling steps (AR predicts one token per step).
    pub mar_steps: u64,
    /// Classifier-free guidance scale (1: none).
    pub cfg: f64,
    pub temperature: f64,
    /// Diffusion Loss's sampling steps; None for the cross-entropy head.
    pub sampling_steps: Option<u64>,
    /// The arm's tokenizer: its name in the spec, and its kind ("patch", "kmeans", "vq", "kl").
    pub tokenizer: String,
    pub tokenizer_kind: String,
}

impl RunRow {
    /// The run's [`RunDescriptor`], when the harness recorded one (runs built since results
    /// version 4; earlier rows, and runs not yet built, have none).
    pub fn descriptor(&self) -> Option<RunDescriptor> {
        serde_json::from_value(self.params.get("descriptor")?.clone()).ok()
    }
}

/// One experiment with its run counts.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ExperimentRow {
    pub id: i64,
    pub name: String,
    pub spec_path: String,
    pub created_at: String,
    /// The latest version (a changed configuration under the same name is a new version).
    pub version: i64,
    /// Runs linked to the experiment's latest version (shared runs count in every experiment that
    /// links them).
    pub runs: i64,
    /// Of those, runs with status `finished`.
    pub finished: i64,
}

/// One point of a metric's history. A NaN `value` is stored as NULL and read back as NaN.
#[derive(Debug, Clone)]
pub struct MetricPoint {
    pub key: String,
    pub step: i64,
    pub value: f64,
    /// Seconds since the UNIX epoch.
    pub wall_time: f64,
}

/// A metric point with the identity of its run, for cross-run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricRecord {
    pub run_id: i64,
    pub cell: String,
    pub arm: Option<String>,
    pub seed: i64,
    pub key: String,
    pub step: i64,
    pub value: f64,
    pub wall_time: f64,
}

/// An evaluation result to record (see [`crate::Db::insert_eval`]).
#[derive(Debug, Clone)]
pub struct NewEval<'a> {
    pub run_id: i64,
    /// Checkpoint step the evaluation was made at.
    pub step: i64,
    pub metric: &'a str,
    pub value: f64,
    pub sample_count: i64,
    pub feature_net: &'a str,
    /// Evaluation settings, stored as JSON with sorted keys (part of the row's identity).
    pub settings: &'a serde_json::Value,
}

/// An evaluation result joined with its run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRecord {
    pub run_id: i64,
    pub run_name: String,
    pub kind: RunKind,
    pub cell: String,
    pub arm: Option<String>,
    pub seed: i64,
    pub step: i64,
    pub metric: String,
    pub value: f64,
    pub sample_count: i64,
    pub feature_net: String,
    /// Settings as stored: JSON text with sorted keys.
    pub settings: String,
    /// The run's position in the experiment (for [`crate::Db::evals_for_run`]: its smallest
    /// position over all experiments that link it, 0 when none does).
    pub position: i64,
}

/// One row of `artifacts`.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ArtifactRow {
    pub id: i64,
    pub run_id: i64,
    pub kind: String,
    pub path: String,
    pub sha256: String,
    pub bytes: i64,
    pub created_at: String,
}

/// `runs` as SQL returns it; `params` still text.
#[derive(sqlx::FromRow)]
pub(crate) struct RunRaw {
    id: i64,
    hash: String,
    kind: String,
    name: String,
    cell: String,
    arm: Option<String>,
    seed: i64,
    params: String,
    status: String,
    stage: Option<String>,
    created_at: String,
    started_at: Option<String>,
    ended_at: Option<String>,
    git_commit: Option<String>,
    git_dirty: i64,
    host: String,
    device: String,
    version: String,
    pid: Option<i64>,
    error: Option<String>,
}

impl TryFrom<RunRaw> for RunRow {
    type Error = Error;

    fn try_from(r: RunRaw) -> Result<RunRow> {
        Ok(RunRow {
            params: serde_json::from_str(&r.params)?,
            id: r.id,
            hash: r.hash,
            kind: r.kind.parse()?,
            name: r.name,
            cell: r.cell,
            arm: r.arm,
            seed: r.seed,
            status: r.status.parse()?,
            stage: r.stage,
            created_at: r.created_at,
            started_at: r.started_at,
            ended_at: r.ended_at,
            git_commit: r.git_commit,
            git_dirty: r.git_dirty != 0,
            host: r.host,
            device: r.device,
            version: r.version,
            pid: r.pid,
            error: r.error,
        })
    }
}

/// `metrics` joined with `runs`; `value` may be NULL (a stored NaN).
#[derive(sqlx::FromRow)]
pub(crate) struct MetricRecordRaw {
    run_id: i64,
    cell: String,
    arm: Option<String>,
    seed: i64,
    key: String,
    step: i64,
    value: Option<f64>,
    wall_time: f64,
}

impl From<MetricRecordRaw> for MetricRecord {
    fn from(r: MetricRecordRaw) -> MetricRecord {
        MetricRecord {
            run_id: r.run_id,
            cell: r.cell,
            arm: r.arm,
            seed: r.seed,
            key: r.key,
            step: r.step,
            value: r.value.unwrap_or(f64::NAN),
            wall_time: r.wall_time,
        }
    }
}

/// `evals` joined with `runs`; `value` may be NULL (a stored NaN).
#[derive(sqlx::FromRow)]
pub(crate) struct EvalRecordRaw {
    run_id: i64,
    run_name: String,
    kind: String,
    cell: String,
    arm: Option<String>,
    seed: i64,
    step: i64,
    metric: String,
    value: Option<f64>,
    sample_count: i64,
    feature_net: String,
    settings: String,
    position: i64,
}

impl TryFrom<EvalRecordRaw> for EvalRecord {
    type Error = Error;

    fn try_from(r: EvalRecordRaw) -> Result<EvalRecord> {
        Ok(EvalRecord {
            run_id: r.run_id,
            run_name: r.run_name,
            kind: r.kind.parse()?,
            cell: r.cell,
            arm: r.arm,
            seed: r.seed,
            step: r.step,
            metric: r.metric,
            value: r.value.unwrap_or(f64::NAN),
            sample_count: r.sample_count,
            feature_net: r.feature_net,
            settings: r.settings,
            position: r.position,
        })
    }
}

/// JSON text with object keys sorted at every level, so equal values always store equal text
/// (`evals.settings` is part of a UNIQUE key) whatever serde_json's map ordering is.
pub(crate) fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(key.as_str()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
