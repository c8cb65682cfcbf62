//! Baselines and drift checks: `pin` stores the table's per-arm entries (mean, std over seeds,
//! n) as a named baseline through `db`; `check` compares the current entries with a baseline
//! under per-metric tolerances, direction-aware (FID may fall freely but not rise past its
//! tolerance; IS may rise freely but not fall), and renders the result as a text table and as
//! JUnit XML.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::stats::{Summary, FID, IS, WITHOUT_CFG};
use crate::{Error, Result};

/// Format tag stored in every baseline payload.
pub const BASELINE_FORMAT: &str = "ablate-baseline/1";

/// Allowed change of one metric. When several are given they add up, like numpy's `isclose`:
/// allowed = absolute + relative · |baseline mean| + seed_spread · baseline std over seeds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tolerance {
    /// In the metric's own units.
    pub absolute: Option<f64>,
    /// As a fraction of the baseline mean.
    pub relative: Option<f64>,
    /// In units of the baseline's sample std over seeds (noise-aware; needs n ≥ 2 seeds in the
    /// baseline).
    pub seed_spread: Option<f64>,
}

/// One entry of the table: a (row, guidance, arm, metric) with its statistics over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Table 1 row key (the cell label without its CFG scale).
    pub row: String,
    /// Row descriptor for people ("AR · raster · causal · 1").
    pub label: String,
    /// "without" or "with" (CFG).
    pub guidance: String,
    pub arm: String,
    pub metric: String,
    pub cfg: f64,
    pub mean: f64,
    pub std: Option<f64>,
    pub n: i64,
}

impl Entry {
    fn key(&self) -> (&str, &str, &str, &str) {
        (&self.row, &self.guidance, &self.arm, &self.metric)
    }

    /// "AR · raster · causal · 1 / no CFG / diffusion".
    pub fn name(&self) -> String {
        let guidance = if self.guidance == WITHOUT_CFG {
            "no CFG".to_string()
        } else {
            format!("CFG {}", crate::fmt::fmt_num(self.cfg))
        };
        format!("{} / {guidance} / {}", self.label, self.arm)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    format: String,
    experiment: String,
    entries: Vec<Entry>,
}

/// The entries of a summary, labelled with their rows' descriptors.
pub(crate) fn entries(summary: &Summary, labels: &BTreeMap<String, String>) -> Vec<Entry> {
    summary
        .arms
        .iter()
        .map(|a| Entry {
            row: a.row.clone(),
            label: labels.get(&a.row).cloned().unwrap_or_else(|| a.row.clone()),
            guidance: a.guidance.clone(),
            arm: a.arm.clone(),
            metric: a.metric.clone(),
            cfg: a.cfg,
            mean: a.mean,
            std: a.std,
            n: a.n,
        })
        .collect()
}

/// Stores `entries` as baseline `name` of `experiment` (replacing one of the same name).
pub(crate) fn pin(db: &db::Db, experiment: &str, name: &str, entries: Vec<Entry>) -> Result<()> {
    let payload = Payload {
        format: BASELINE_FORMAT.to_string(),
        experiment: experiment.to_string(),
        entries,
    };
    let value = serde_json::to_value(&payload).map_err(|e| Error::Baseline {
        name: name.to_string(),
        message: e.to_string(),
    })?;
    db.pin_baseline(experiment, name, &value)?;
    Ok(())
}

/// The entries of baseline `name`, or [`Error::UnknownBaseline`].
pub(crate) fn load(db: &db::Db, experiment: &str, name: &str) -> Result<Vec<Entry>> {
    let value = db
        .baseline(experiment, name)?
        .ok_or_else(|| Error::UnknownBaseline {
            experiment: experiment.to_string(),
            name: name.to_string(),
        })?;
    let payload: Payload = serde_json::from_value(value).map_err(|e| Error::Baseline {
        name: name.to_string(),
        message: format!("not an {BASELINE_FORMAT} payload: {e}"),
    })?;
    if payload.format != BASELINE_FORMAT {
        return Err(Error::Baseline {
            name: name.to_string(),
            message: format!(
                "format '{}', this version reads '{BASELINE_FORMAT}'",
                payload.format
            ),
        });
    }
    Ok(payload.entries)
}

/// The outcome of one compared entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Within tolerance (or better).
    Ok,
    /// Moved the wrong way by more than the tolerance.
    Drift,
    /// In the baseline, but no current result.
    Missing,
    /// Only a seed-spread tolerance, and the baseline has fewer than 2 seeds.
    NoSpread,
    /// No tolerance is given for this metric: shown, not judged.
    Unchecked,
    /// A current result the baseline does not have: shown, not judged.
    New,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Drift => "DRIFT",
            Status::Missing => "MISSING",
            Status::NoSpread => "NO-SPREAD",
            Status::Unchecked => "unchecked",
            Status::New => "new",
        }
    }

    /// Whether this status fails the check.
    pub fn fails(self) -> bool {
        matches!(self, Status::Drift | Status::Missing | Status::NoSpread)
    }
}

/// One line of a drift check.
#[derive(Debug, Clone)]
pub struct CheckRow {
    /// The baseline entry (or, for [`Status::New`], the current one).
    pub entry: Entry,
    pub current: Option<Entry>,
    /// current mean − baseline mean.
    pub delta: Option<f64>,
    /// The allowed change in the unfavourable direction.
    pub allowed: Option<f64>,
    pub status: Status,
    /// Why, in words.
    pub message: String,
}

/// The result of `ablate check`.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub experiment: String,
    pub baseline: String,
    pub rows: Vec<CheckRow>,
    /// Tolerances for metrics the table does not have, and similar remarks.
    pub warnings: Vec<String>,
}

/// +1 when a rise is the unfavourable direction (FID), −1 when a fall is (IS), 0 when either is.
fn harmful_sign(metric: &str) -> f64 {
    match metric {
        FID => 1.0,
        IS => -1.0,
        _ => 0.0,
    }
}

/// Compares `current` with `baseline` under `tolerances` (metric → tolerance).
pub fn compare(
    experiment: &str,
    baseline_name: &str,
    baseline: &[Entry],
    current: &[Entry],
    tolerances: &BTreeMap<String, Tolerance>,
) -> CheckReport {
    let mut rows = Vec::new();
    for b in baseline {
        let now = current.iter().find(|c| c.key() == b.key()).cloned();
        rows.push(judge(b, now, tolerances.get(&b.metric)));
    }
    for c in current {
        if !baseline.iter().any(|b| b.key() == c.key()) {
            rows.push(CheckRow {
                entry: c.clone(),
                current: Some(c.clone()),
                delta: None,
                allowed: None,
                status: Status::New,
                message: "not in the baseline".into(),
            });
        }
    }
    let warnings = tolerances
        .keys()
        .filter(|m| !baseline.iter().any(|b| &b.metric == *m))
        .map(|m| format!("a tolerance is given for '{m}', but the baseline has no such metric"))
        .collect();
    CheckReport {
        experiment: experiment.to_string(),
        baseline: baseline_name.to_string(),
        rows,
        warnings,
    }
}

fn judge(b: &Entry, now: Option<Entry>, tol: Option<&Tolerance>) -> CheckRow {
    let row = |status, delta, allowed, message: String, current| CheckRow {
        entry: b.clone(),
        current,
        delta,
        allowed,
        status,
        message,
    };
    let Some(c) = now else {
        return row(
            Status::Missing,
            None,
            None,
            "in the baseline, no current result".into(),
            None,
        );
    };
    let delta = c.mean - b.mean;
    let Some(tol) = tol else {
        return row(
            Status::Unchecked,
            Some(delta),
            None,
            format!("no [drift] tolerance for '{}'", b.metric),
            Some(c),
        );
    };
    let spread = match (tol.seed_spread, b.std) {
        (Some(k), Some(sd)) => Some(k * sd),
        (Some(_), None) if tol.absolute.is_none() && tol.relative.is_none() => {
            return row(
                Status::NoSpread,
                Some(delta),
                None,
                format!(
                    "seed_spread needs a baseline over 2 or more seeds (it has n={})",
                    b.n
                ),
                Some(c),
            );
        }
        _ => None,
    };
    let allowed = tol.absolute.unwrap_or(0.0)
        + tol.relative.unwrap_or(0.0) * b.mean.abs()
        + spread.unwrap_or(0.0);
    let sign = harmful_sign(&b.metric);
    let harmful = if sign == 0.0 {
        delta.abs()
    } else {
        sign * delta
    };
    let mut parts = Vec::new();
    if let Some(a) = tol.absolute {
        parts.push(format!("absolute {a}"));
    }
    if let Some(r) = tol.relative {
        parts.push(format!("relative {r} × {:.4}", b.mean.abs()));
    }
    match (tol.seed_spread, b.std) {
        (Some(k), Some(sd)) => parts.push(format!("seed_spread {k} × std {sd:.4}")),
        (Some(_), None) => parts.push(format!("seed_spread ignored: baseline n={}", b.n)),
        _ => {}
    }
    let direction = match sign {
        s if s > 0.0 => "rise",
        s if s < 0.0 => "fall",
        _ => "change",
    };
    let (status, message) = if !harmful.is_finite() {
        (Status::Drift, "current value is not finite".to_string())
    } else if harmful > allowed + 1e-12 * allowed.abs().max(1.0) {
        (
            Status::Drift,
            format!(
                "{} {direction} of {:.4} exceeds the allowed {allowed:.4} ({})",
                b.metric,
                harmful,
                parts.join(" + ")
            ),
        )
    } else {
        (
            Status::Ok,
            format!(
                "{} moved {delta:+.4}; allowed {direction} {allowed:.4} ({})",
                b.metric,
                parts.join(" + ")
            ),
        )
    };
    row(status, Some(delta), Some(allowed), message, Some(c))
}

impl CheckReport {
    /// True when any entry drifted, went missing or could not be judged for lack of spread.
    pub fn failed(&self) -> bool {
        self.rows.iter().any(|r| r.status.fails())
    }

    /// Number of failing entries.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.status.fails()).count()
    }

    /// A fixed-width table for the terminal.
    pub fn render_table(&self) -> String {
        let header = [
            "status",
            "metric",
            "row / guidance / arm",
            "baseline",
            "current",
            "Δ",
            "allowed",
        ];
        let fmt_stat = |e: &Entry| {
            let sd = e.std.map_or("–".to_string(), |s| format!("{s:.3}"));
            format!("{:.3} ± {sd} (n={})", e.mean, e.n)
        };
        let lines: Vec<[String; 7]> = self
            .rows
            .iter()
            .map(|r| {
                let is_new = r.status == Status::New;
                [
                    r.status.as_str().to_string(),
                    r.entry.metric.clone(),
                    r.entry.name(),
                    if is_new {
                        "–".into()
                    } else {
                        fmt_stat(&r.entry)
                    },
                    r.current.as_ref().map_or("missing".into(), fmt_stat),
                    r.delta.map_or("–".into(), |d| format!("{d:+.3}")),
                    r.allowed.map_or("–".into(), |a| format!("{a:.3}")),
                ]
            })
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for l in &lines {
            for (w, c) in widths.iter_mut().zip(l) {
                *w = (*w).max(c.chars().count());
            }
        }
        let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w - s.chars().count()));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drift check: experiment '{}' against baseline '{}'",
            self.experiment, self.baseline
        );
        let head: Vec<String> = header
            .iter()
            .zip(&widths)
            .map(|(h, &w)| pad(h, w))
            .collect();
        let _ = writeln!(out, "{}", head.join("  ").trim_end());
        for l in &lines {
            let cells: Vec<String> = l.iter().zip(&widths).map(|(c, &w)| pad(c, w)).collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
        for r in self.rows.iter().filter(|r| r.status.fails()) {
            let _ = writeln!(
                out,
                "{}: {}: {}",
                r.status.as_str(),
                r.entry.name(),
                r.message
            );
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        let _ = writeln!(
            out,
            "{} entries, {} failing: {}",
            self.rows.len(),
            self.failures(),
            if self.failed() { "DRIFT" } else { "ok" }
        );
        out
    }

    /// JUnit XML: one test suite, one test case per entry (failure = drift, missing, no
    /// spread; skipped = unchecked or new).
    pub fn junit_xml(&self) -> String {
        let skipped = self
            .rows
            .iter()
            .filter(|r| matches!(r.status, Status::Unchecked | Status::New))
            .count();
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let suite = format!(
            "ablate check {} against baseline {}",
            self.experiment, self.baseline
        );
        let _ = writeln!(
            x,
            "<testsuites name=\"ablate check\" tests=\"{}\" failures=\"{}\" skipped=\"{skipped}\">",
            self.rows.len(),
            self.failures()
        );
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" skipped=\"{skipped}\" errors=\"0\">",
            xml(&suite),
            self.rows.len(),
            self.failures()
        );
        for r in &self.rows {
            let _ = write!(
                x,
                "    <testcase classname=\"ablate.check.{}.{}\" name=\"{}\">",
                xml(&self.experiment),
                xml(&r.entry.metric),
                xml(&r.entry.name())
            );
            match r.status {
                Status::Ok => {}
                Status::Unchecked | Status::New => {
                    let _ = write!(x, "<skipped message=\"{}\"/>", xml(&r.message));
                }
                s => {
                    let _ = write!(
                        x,
                        "<failure type=\"{}\" message=\"{}\">{}</failure>",
                        s.as_str(),
                        xml(&r.message),
                        xml(&format!(
                            "baseline {:.6} (n={}), current {}",
                            r.entry.mean,
                            r.entry.n,
                            r.current
                                .as_ref()
                                .map_or("missing".into(), |c| format!("{:.6} (n={})", c.mean, c.n))
                        ))
                    );
                }
            }
            x.push_str("</testcase>\n");
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(
                x,
                "    <system-out>{}</system-out>",
                xml(&self.warnings.join("\n"))
            );
        }
        x.push_str("  </testsuite>\n</testsuites>\n");
        x
    }
}

fn xml(s: &str) -> String {
    crate::fmt::esc(s)
}
