//! What each generator run is in the paper's terms, read from the descriptor the harness recorded
//! with the run (`db::RunDescriptor`): the Table 1 row it belongs to (generator, order,
//! attention, predictions per step and whatever else the grid varies), whether it samples with
//! classifier-free guidance, and its sampling settings (the axes a sweep plot can have). Runs
//! recorded before descriptors existed (results version 3 and earlier) are read from their stored
//! parameters instead ([`Paper::from_params`]), the one place that knows the spec's layout.

use db::{RunDescriptor, RunKind, RunRow, RunStatus};
use serde_json::Value;

use crate::fmt::fmt_num;

/// Grid keys whose values are sampling settings; a sweep over one of them is plotted against it.
pub(crate) const SWEEP_AXES: [SweepAxis; 4] = [
    SweepAxis {
        key: "sample.cfg",
        name: "CFG scale",
        file: "cfg",
    },
    SweepAxis {
        key: "sample.temperature",
        name: "temperature",
        file: "temperature",
    },
    SweepAxis {
        key: "sample.mar_steps",
        name: "MAR sampling steps",
        file: "mar_steps",
    },
    SweepAxis {
        key: "head.sampling_steps",
        name: "diffusion sampling steps",
        file: "sampling_steps",
    },
];

/// Cell-label components that the Table 1 descriptor columns already show.
const DESCRIBED_KEYS: [&str; 2] = ["generator.kind", "generator.order"];

#[derive(Debug, Clone, Copy)]
pub(crate) struct SweepAxis {
    /// Dotted spec key, as written in cell labels.
    pub key: &'static str,
    /// Axis title.
    pub name: &'static str,
    /// File-name part of the plot.
    pub file: &'static str,
}

/// The Table 1 descriptor of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowInfo {
    /// Row identity: the cell label without its `sample.cfg` part (the CFG sweep becomes the
    /// "without / with CFG" columns).
    pub key: String,
    /// "AR" or "MAR" ("?" when the parameters do not say).
    pub generator: String,
    /// "raster" or "random".
    pub order: String,
    /// "causal" (AR) or "bidirectional" (MAR).
    pub attention: String,
    /// "1" or "many (K steps)".
    pub preds: String,
    /// The rest of the cell label (grid keys the descriptor does not show), "" when none.
    pub setting: String,
}

impl RowInfo {
    /// "AR · raster · causal · 1" plus the setting, for plot labels.
    pub fn short(&self) -> String {
        let base = format!(
            "{} · {} · {} · {}",
            self.generator, self.order, self.attention, self.preds
        );
        if self.setting.is_empty() {
            base
        } else {
            format!("{base} · {}", self.setting)
        }
    }
}

/// One generator run with what the report needs from its parameters.
#[derive(Debug, Clone)]
pub(crate) struct RunInfo {
    pub run_id: i64,
    pub arm: Option<String>,
    pub seed: i64,
    pub status: RunStatus,
    pub row: RowInfo,
    /// CFG scale (1 = no guidance).
    pub cfg: f64,
    /// Values of [`SWEEP_AXES`], in that order; NaN when the parameters lack one.
    pub sweep: [f64; 4],
    /// The built model's parameter count, as the harness recorded it (`model.param_count`).
    pub param_count: Option<u64>,
}

impl RunInfo {
    /// True when the run samples with classifier-free guidance (scale ≠ 1).
    pub fn guided(&self) -> bool {
        self.cfg != 1.0
    }

    /// Series key of a sweep plot along `SWEEP_AXES[axis]`: the cell label without any sweep
    /// axis, plus the values of the other sweep axes (so points on one line differ only in
    /// the swept setting).
    pub fn sweep_group(&self, axis: usize, varying: &[bool; 4]) -> String {
        let r = &self.row;
        let mut parts = vec![r.generator.clone(), r.order.clone(), r.attention.clone()];
        // Predictions per step follow from the MAR steps: not a series of its own on that axis.
        if SWEEP_AXES[axis].key != "sample.mar_steps" {
            parts.push(r.preds.clone());
        }
        parts.extend(
            label_parts(&r.setting)
                .filter(|p| !SWEEP_AXES.iter().any(|a| has_key(p, a.key)))
                .map(str::to_string),
        );
        for (k, a) in SWEEP_AXES.iter().enumerate() {
            if k != axis && varying[k] {
                parts.push(format!("{}={}", a.key, fmt_num(self.sweep[k])));
            }
        }
        parts.join(" · ")
    }
}

/// What a report needs to know of a generator run: its descriptor's fields, each `None` (or NaN)
/// where an old run's parameters do not say.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Paper {
    /// "ar" or "mar".
    pub generator: Option<String>,
    pub order: Option<String>,
    pub seq_len: Option<u64>,
    pub mar_steps: Option<u64>,
    pub cfg: f64,
    pub temperature: f64,
    pub sampling_steps: f64,
    pub param_count: Option<u64>,
    /// The arm's tokenizer, by its name in the spec.
    pub tokenizer: Option<String>,
}

impl Paper {
    /// A run's: its descriptor, else its stored parameters.
    pub fn of(run: &RunRow) -> Paper {
        match run.descriptor() {
            Some(d) => Paper::from_descriptor(&d),
            None => Paper::from_params(&run.params, run.arm.as_deref()),
        }
    }

    pub fn from_descriptor(d: &RunDescriptor) -> Paper {
        Paper {
            generator: Some(d.generator.clone()),
            order: Some(d.order.clone()),
            seq_len: Some(d.seq_len),
            mar_steps: Some(d.mar_steps),
            cfg: d.cfg,
            temperature: d.temperature,
            sampling_steps: d.sampling_steps.map_or(f64::NAN, |n| n as f64),
            param_count: Some(d.param_count),
            tokenizer: Some(d.tokenizer.clone()),
        }
    }

    /// For runs recorded without a descriptor: the resolved spec stored as the run's parameters
    /// (and the `model` entry the harness added to it).
    pub fn from_params(params: &Value, arm: Option<&str>) -> Paper {
        let num = |path: &[&str], default: f64| {
            get(params, path).and_then(Value::as_f64).unwrap_or(default)
        };
        let text = |path: &[&str]| {
            get(params, path)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Paper {
            generator: text(&["generator", "kind"]),
            order: text(&["generator", "order"]),
            seq_len: tokens_per_image(params, arm),
            mar_steps: get(params, &["sample", "mar_steps"]).and_then(Value::as_u64),
            cfg: num(&["sample", "cfg"], 1.0),
            temperature: num(&["sample", "temperature"], f64::NAN),
            sampling_steps: num(&["head", "sampling_steps"], f64::NAN),
            param_count: get(params, &["model", "param_count"]).and_then(Value::as_u64),
            tokenizer: arm.and_then(|a| text(&["arms", a, "tokenizer"])),
        }
    }
}

/// The generator runs of an experiment, in the experiment's run order.
pub(crate) fn describe(runs: &[RunRow]) -> Vec<RunInfo> {
    runs.iter()
        .filter(|r| r.kind == RunKind::Generator)
        .map(|r| {
            let paper = Paper::of(r);
            RunInfo {
                run_id: r.id,
                arm: r.arm.clone(),
                seed: r.seed,
                status: r.status,
                row: row_info(&r.cell, &paper),
                cfg: paper.cfg,
                sweep: [
                    paper.cfg,
                    paper.temperature,
                    paper.mar_steps.map_or(f64::NAN, |n| n as f64),
                    paper.sampling_steps,
                ],
                param_count: paper.param_count,
            }
        })
        .collect()
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn label_parts(cell: &str) -> impl Iterator<Item = &str> {
    cell.split(" · ").filter(|p| !p.is_empty() && *p != "base")
}

fn has_key(part: &str, key: &str) -> bool {
    part.split_once('=').is_some_and(|(k, _)| k == key)
}

/// The Table 1 descriptor of a run from its cell label and what it is.
pub(crate) fn row_info(cell: &str, paper: &Paper) -> RowInfo {
    let key_parts: Vec<&str> = label_parts(cell)
        .filter(|p| !has_key(p, "sample.cfg"))
        .collect();
    let key = if key_parts.is_empty() {
        "base".to_string()
    } else {
        key_parts.join(" · ")
    };
    let setting = key_parts
        .iter()
        .filter(|p| !DESCRIBED_KEYS.iter().any(|k| has_key(p, k)))
        .copied()
        .collect::<Vec<_>>()
        .join(" · ");
    let kind = paper.generator.as_deref();
    let (generator, attention) = match kind {
        Some("ar") => ("AR", "causal"),
        Some("mar") => ("MAR", "bidirectional"),
        _ => ("?", "?"),
    };
    let order = match kind {
        // MAR always generates in a random order.
        Some("mar") => "random".to_string(),
        _ => paper.order.clone().unwrap_or_else(|| "?".into()),
    };
    let preds = match kind {
        Some("ar") => "1".to_string(),
        Some("mar") => match (paper.mar_steps, paper.seq_len) {
            (Some(s), Some(t)) if s >= t => "1".to_string(),
            (Some(s), _) => format!("many ({s} steps)"),
            _ => "?".to_string(),
        },
        _ => "?".to_string(),
    };
    RowInfo {
        key,
        generator: generator.to_string(),
        order,
        attention: attention.to_string(),
        preds,
        setting,
    }
}

/// Tokens per image: the sequence length the harness recorded for the built model
/// (`model.seq_len`); for runs recorded before it, (image_size / patch)² of the arm's tokenizer
/// (the diffusion arm's when the arm is unknown), which holds for patch tokenizers only.
fn tokens_per_image(params: &Value, arm: Option<&str>) -> Option<u64> {
    if let Some(n) = get(params, &["model", "seq_len"]).and_then(Value::as_u64) {
        return Some(n);
    }
    let arm = arm.unwrap_or(crate::ARM_DIFFUSION);
    let tok = get(params, &["arms", arm, "tokenizer"])?.as_str()?;
    let patch = get(params, &["tokenizers", tok, "patch"])?.as_u64()?;
    let size = get(params, &["data", "image_size"])?.as_u64()?;
    (patch > 0).then(|| (size / patch).pow(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(kind: &str, order: &str, mar_steps: u64) -> Value {
        json!({
            "generator": { "kind": kind, "order": order },
            "sample": { "cfg": 1.0, "mar_steps": mar_steps, "temperature": 1.0 },
            "data": { "image_size": 16 },
            "arms": { "diffusion": { "tokenizer": "kl" }, "cross-entropy": { "tokenizer": "vq" } },
            "tokenizers": { "kl": { "patch": 4 }, "vq": { "patch": 4 } },
        })
    }

    #[test]
    fn table1_descriptors_follow_the_paper() {
        let r = row_info(
            "generator.kind=ar · sample.cfg=3.0",
            &Paper::from_params(&params("ar", "raster", 4), None),
        );
        assert_eq!(
            (r.generator.as_str(), r.order.as_str(), r.attention.as_str()),
            ("AR", "raster", "causal")
        );
        assert_eq!(
            (r.preds.as_str(), r.key.as_str()),
            ("1", "generator.kind=ar")
        );
        assert_eq!(r.setting, "");
        // 16 tokens, 16 steps: one prediction per step; 4 steps: many.
        let r = row_info(
            "base",
            &Paper::from_params(&params("mar", "raster", 16), Some("diffusion")),
        );
        assert_eq!(
            (r.order.as_str(), r.attention.as_str(), r.preds.as_str()),
            ("random", "bidirectional", "1")
        );
        assert_eq!(r.key, "base");
        let r = row_info(
            "generator.kind=mar · train.steps=20",
            &Paper::from_params(&params("mar", "raster", 4), Some("cross-entropy")),
        );
        assert_eq!(r.preds, "many (4 steps)");
        assert_eq!(r.setting, "train.steps=20");
        let r = row_info("x", &Paper::from_params(&json!({}), None));
        assert_eq!((r.generator.as_str(), r.preds.as_str()), ("?", "?"));
    }

    #[test]
    fn preds_per_step_count_the_recorded_sequence_not_the_patch() {
        // an autoencoder tokenizer downsamples 16 px by 8: 4 tokens, though `patch` says 16
        let mut p = params("mar", "raster", 4);
        p["model"] = json!({ "seq_len": 4, "param_count": 1000 });
        let preds = |p: &Value| row_info("base", &Paper::from_params(p, Some("diffusion"))).preds;
        assert_eq!(preds(&p), "1");
        p["model"]["seq_len"] = json!(64);
        assert_eq!(preds(&p), "many (4 steps)");
    }

    /// A run with a descriptor is read from it alone (its parameters need not hold the spec),
    /// and reads as the same row as an old run's parameters that say the same.
    #[test]
    fn a_descriptor_is_read_without_the_spec() {
        let d = RunDescriptor {
            generator: "mar".into(),
            order: "random".into(),
            seq_len: 16,
            param_count: 1234,
            train_steps: 20,
            mar_steps: 4,
            cfg: 3.0,
            temperature: 0.9,
            sampling_steps: Some(50),
            tokenizer: "kl".into(),
            tokenizer_kind: "kl".into(),
        };
        let mut run = crate::tokenizers::tests::run(
            1,
            RunKind::Generator,
            "g",
            Some("diffusion"),
            json!({ "descriptor": d }),
        );
        run.cell = "generator.kind=mar".into();
        let info = &describe(std::slice::from_ref(&run))[0];
        assert_eq!(
            info.row.short(),
            "MAR · random · bidirectional · many (4 steps)"
        );
        assert_eq!(info.cfg, 3.0);
        assert_eq!(info.sweep, [3.0, 0.9, 4.0, 50.0]);
        assert_eq!(info.param_count, Some(1234));
        let mut old = params("mar", "raster", 4);
        old["model"] = json!({ "seq_len": 16 });
        assert_eq!(
            info.row,
            row_info(
                "generator.kind=mar",
                &Paper::from_params(&old, Some("diffusion"))
            )
        );
    }
}
