//! The tokenizer table, after the paper's tokenizer comparison (its Table 2): each tokenizer of
//! the experiment with its reconstruction quality (rFID, PSNR, codebook use) beside the FID and IS
//! of the generators trained on its tokens, sampled without guidance. Mean ± std over the
//! tokenizer's seeds (reconstruction) and over the generator runs (generation), aggregated in
//! polars.

use db::{EvalRecord, RunKind, RunRow};
use polars::prelude::*;

use crate::fmt::{esc, MISSING, NONE};
use crate::rows::Paper;

/// Reconstruction metrics of a tokenizer run, and their column titles.
const RECON: [(&str, &str); 4] = [
    ("recon/rfid", "rFID"),
    ("recon/psnr", "PSNR (dB)"),
    ("codebook/used", "codes used"),
    ("codebook/perplexity", "perplexity"),
];

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenizerTable {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// One value for the table: which tokenizer, which column, the number.
struct Point {
    tokenizer: String,
    column: String,
    value: f64,
}

/// The tokenizer's name in the spec: the key under `tokenizers` whose settings equal the ones the
/// tokenizer run was fitted with, else the name the run was given ("tokenizer NAME · seed S").
fn tokenizer_name(run: &RunRow, generators: &[&RunRow]) -> String {
    let fitted = &run.params["tokenizer"];
    for g in generators {
        if let Some(map) = g.params["tokenizers"].as_object() {
            if let Some((name, _)) = map.iter().find(|(_, spec)| *spec == fitted) {
                return name.clone();
            }
        }
    }
    run.name
        .strip_prefix("tokenizer ")
        .and_then(|s| s.split(" · ").next())
        .unwrap_or(&run.name)
        .to_string()
}

/// The table, or `None` when the experiment has no tokenizer runs with reconstruction metrics.
/// `recon`: (run id, key, value) of the tokenizer runs' last reconstruction metrics.
pub(crate) fn tokenizer_table(
    runs: &[RunRow],
    recon: &[(i64, String, f64)],
    evals: &[EvalRecord],
) -> PolarsResult<Option<TokenizerTable>> {
    let generators: Vec<&RunRow> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
    let tokenizer_runs: Vec<&RunRow> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Tokenizer)
        .collect();
    let mut order: Vec<(String, String)> = Vec::new(); // (name, kind) in first-seen order
    let mut points = Vec::new();
    for t in &tokenizer_runs {
        let name = tokenizer_name(t, &generators);
        if !order.iter().any(|(n, _)| *n == name) {
            let kind = t.params["tokenizer"]["kind"].as_str().unwrap_or("?");
            order.push((name.clone(), kind.to_string()));
        }
        for (run_id, key, value) in recon {
            if *run_id != t.id {
                continue;
            }
            if let Some((_, title)) = RECON.iter().find(|(k, _)| k == key) {
                points.push(Point {
                    tokenizer: name.clone(),
                    column: title.to_string(),
                    value: *value,
                });
            }
        }
    }
    if points.is_empty() {
        return Ok(None);
    }
    // generation: the last FID / IS of each unguided generator run, under its arm's tokenizer
    let mut generation_columns: Vec<String> = Vec::new();
    for g in &generators {
        if g.arm.is_none() {
            continue;
        }
        let paper = Paper::of(g);
        let Some(name) = paper.tokenizer.as_deref() else {
            continue;
        };
        if paper.cfg != 1.0 {
            continue;
        }
        let label = paper
            .generator
            .as_deref()
            .map_or_else(|| "?".into(), str::to_uppercase);
        for (metric, title) in [("fid", "FID"), ("is", "IS")] {
            let last = evals
                .iter()
                .filter(|e| e.run_id == g.id && e.metric == metric)
                .max_by_key(|e| e.step);
            if let Some(e) = last {
                let column = format!("{label} {title}");
                if !generation_columns.contains(&column) {
                    generation_columns.push(column.clone());
                }
                points.push(Point {
                    tokenizer: name.to_string(),
                    column,
                    value: e.value,
                });
            }
        }
    }
    generation_columns.sort();
    let stats = aggregate(&points)?;
    let columns: Vec<String> = RECON
        .iter()
        .map(|(_, t)| t.to_string())
        .filter(|c| stats.iter().any(|s| &s.1 == c))
        .chain(generation_columns)
        .collect();
    let mut header = vec!["tokenizer".to_string(), "kind".to_string()];
    header.extend(columns.iter().cloned());
    let rows = order
        .iter()
        .map(|(name, kind)| {
            let mut row = vec![name.clone(), kind.clone()];
            for c in &columns {
                let s = stats.iter().find(|s| &s.0 == name && &s.1 == c);
                row.push(match s {
                    None if RECON[2..].iter().any(|(_, t)| t == c) => NONE.to_string(),
                    None => MISSING.to_string(),
                    Some((_, _, mean, std, n)) => {
                        let std = std.map_or(NONE.to_string(), |v| format!("{v:.2}"));
                        format!("{mean:.2} ± {std} (n={n})")
                    }
                });
            }
            row
        })
        .collect();
    Ok(Some(TokenizerTable { header, rows }))
}

/// (tokenizer, column, mean, sample std (None for n = 1), n), through a polars group-by.
type Stat = (String, String, f64, Option<f64>, u32);

fn aggregate(points: &[Point]) -> PolarsResult<Vec<Stat>> {
    let df = DataFrame::new(
        points.len(),
        vec![
            Column::new(
                "tokenizer".into(),
                points
                    .iter()
                    .map(|p| p.tokenizer.as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "column".into(),
                points.iter().map(|p| p.column.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "value".into(),
                points.iter().map(|p| p.value).collect::<Vec<f64>>(),
            ),
        ],
    )?;
    let out = df
        .lazy()
        .group_by([col("tokenizer"), col("column")])
        .agg([
            col("value").mean().alias("mean"),
            col("value").std(1).alias("std"),
            col("value").count().alias("n"),
        ])
        .collect()?;
    let tokenizer = out.column("tokenizer")?.str()?.clone();
    let column = out.column("column")?.str()?.clone();
    let mean = out.column("mean")?.f64()?.clone();
    let std = out.column("std")?.f64()?.clone();
    let n = out.column("n")?.cast(&DataType::UInt32)?;
    let n = n.u32()?;
    Ok((0..out.height())
        .map(|i| {
            let count = n.get(i).unwrap_or(0);
            (
                tokenizer.get(i).unwrap_or_default().to_string(),
                column.get(i).unwrap_or_default().to_string(),
                mean.get(i).unwrap_or(f64::NAN),
                std.get(i).filter(|_| count > 1),
                count,
            )
        })
        .collect())
}

/// The table as Markdown (a section of `report.md`).
pub(crate) fn markdown(t: &TokenizerTable) -> String {
    let mut md = String::from(
        "## Tokenizers\n\nEach tokenizer's reconstruction of the held-out split (rFID: FID of \
         the reconstructions against the originals, same feature net as generation) beside the \
         FID and IS of the generators trained on its tokens (without CFG); mean ± std (n).\n\n",
    );
    md.push_str(&format!("| {} |\n", t.header.join(" | ")));
    let align: Vec<&str> = (0..t.header.len())
        .map(|i| if i < 2 { "---" } else { "---:" })
        .collect();
    md.push_str(&format!("|{}|\n", align.join("|")));
    for row in &t.rows {
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    md.push('\n');
    md
}

/// The table as an HTML section (for `report.html`).
pub(crate) fn html(t: &TokenizerTable) -> String {
    let mut h = String::from(
        "<h2>Tokenizers</h2>\n<p class=\"note\">Each tokenizer's reconstruction of the held-out \
         split (rFID: FID of the reconstructions against the originals) beside the FID and IS of \
         the generators trained on its tokens (without CFG); mean ± std (n).</p>\n<table>\n<tr>",
    );
    for c in &t.header {
        h.push_str(&format!("<th>{}</th>", esc(c)));
    }
    h.push_str("</tr>\n");
    for row in &t.rows {
        h.push_str("<tr>");
        for c in row {
            h.push_str(&format!("<td>{}</td>", esc(c)));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    h
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use db::RunStatus;
    use serde_json::{json, Value};

    /// A finished run row with these fields (the rest empty), for tests.
    pub(crate) fn run(
        id: i64,
        kind: RunKind,
        name: &str,
        arm: Option<&str>,
        params: Value,
    ) -> RunRow {
        RunRow {
            id,
            hash: format!("h{id}"),
            kind,
            name: name.into(),
            cell: String::new(),
            arm: arm.map(str::to_string),
            seed: 0,
            params,
            status: RunStatus::Finished,
            stage: None,
            created_at: String::new(),
            started_at: None,
            ended_at: None,
            git_commit: None,
            git_dirty: false,
            host: "h".into(),
            device: "cpu".into(),
            version: "0".into(),
            pid: None,
            error: None,
        }
    }

    fn eval(run_id: i64, metric: &str, value: f64) -> EvalRecord {
        EvalRecord {
            run_id,
            run_name: String::new(),
            kind: RunKind::Generator,
            cell: String::new(),
            arm: None,
            seed: 0,
            step: 10,
            metric: metric.into(),
            value,
            sample_count: 100,
            feature_net: "classifier:x".into(),
            settings: "{}".into(),
            position: 0,
        }
    }

    #[test]
    fn recon_and_generation_columns_per_tokenizer() {
        let vq = json!({"kind": "vq", "codebook": 64});
        let kl = json!({"kind": "kl"});
        let gen = |kind: &str, cfg: f64| {
            json!({
                "tokenizers": {"vq": vq, "kl": kl},
                "arms": {"cross-entropy": {"tokenizer": "vq"}, "diffusion": {"tokenizer": "kl"}},
                "generator": {"kind": kind},
                "sample": {"cfg": cfg},
            })
        };
        let runs = vec![
            run(
                1,
                RunKind::Tokenizer,
                "tokenizer vq · seed 0",
                None,
                json!({"tokenizer": vq, "seed": 0}),
            ),
            run(
                2,
                RunKind::Tokenizer,
                "tokenizer kl · seed 0",
                None,
                json!({"tokenizer": kl, "seed": 0}),
            ),
            run(
                3,
                RunKind::Generator,
                "g",
                Some("cross-entropy"),
                gen("mar", 1.0),
            ),
            run(
                4,
                RunKind::Generator,
                "g",
                Some("cross-entropy"),
                gen("mar", 1.0),
            ),
            run(
                5,
                RunKind::Generator,
                "g",
                Some("diffusion"),
                gen("mar", 1.0),
            ),
            // guided: not in the table
            run(
                6,
                RunKind::Generator,
                "g",
                Some("diffusion"),
                gen("mar", 3.0),
            ),
        ];
        let recon = vec![
            (1, "recon/rfid".to_string(), 12.0),
            (1, "recon/psnr".to_string(), 20.0),
            (1, "codebook/used".to_string(), 50.0),
            (2, "recon/rfid".to_string(), 4.0),
            (2, "recon/psnr".to_string(), 25.0),
        ];
        let evals = vec![
            eval(3, "fid", 30.0),
            eval(4, "fid", 34.0),
            eval(3, "is", 2.0),
            eval(4, "is", 2.0),
            eval(5, "fid", 20.0),
            eval(6, "fid", 1.0),
        ];
        let t = tokenizer_table(&runs, &recon, &evals).unwrap().unwrap();
        assert_eq!(
            t.header,
            [
                "tokenizer",
                "kind",
                "rFID",
                "PSNR (dB)",
                "codes used",
                "MAR FID",
                "MAR IS"
            ]
        );
        assert_eq!(
            t.rows[0],
            [
                "vq",
                "vq",
                "12.00 ± – (n=1)",
                "20.00 ± – (n=1)",
                "50.00 ± – (n=1)",
                "32.00 ± 2.83 (n=2)",
                "2.00 ± 0.00 (n=2)"
            ]
        );
        // no codebook for KL: "–", not zero; IS never evaluated for its generators: missing
        assert_eq!(
            t.rows[1],
            [
                "kl",
                "kl",
                "4.00 ± – (n=1)",
                "25.00 ± – (n=1)",
                "–",
                "20.00 ± – (n=1)",
                "missing"
            ]
        );
        assert!(markdown(&t).contains("| vq | vq | 12.00 ± – (n=1) |"));
    }

    #[test]
    fn no_tokenizer_metrics_no_table() {
        let runs = vec![run(
            1,
            RunKind::Generator,
            "g",
            Some("diffusion"),
            json!({}),
        )];
        assert!(tokenizer_table(&runs, &[], &[]).unwrap().is_none());
    }
}
