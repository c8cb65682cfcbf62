//! Tests against a real `db::Db` in a temporary directory, filled with known values through
//! `db` (no hand-written SQL).

use std::collections::BTreeMap;
use std::path::Path;

use db::{Db, MetricPoint, NewEval, NewRun, RunKind};
use serde_json::{json, Value};

use super::*;
use crate::stats::{WITHOUT_CFG, WITH_CFG};

const EXP: &str = "table1-test";
const CE: Option<&str> = Some(ARM_CROSS_ENTROPY);
const DL: Option<&str> = Some(ARM_DIFFUSION);

/// Resolved parameters as the runner stores them (the parts the report reads).
fn params(kind: &str, order: &str, cfg: f64, mar_steps: u64) -> Value {
    json!({
        "generator": { "kind": kind, "order": order },
        "sample": { "cfg": cfg, "mar_steps": mar_steps, "temperature": 1.0 },
        "head": { "sampling_steps": 100 },
        "data": { "image_size": 16 },
        "arms": { "cross-entropy": { "tokenizer": "vq" }, "diffusion": { "tokenizer": "kl" } },
        "tokenizers": { "vq": { "patch": 4 }, "kl": { "patch": 4 } },
    })
}

struct Fill<'a> {
    db: &'a Db,
    exp: i64,
}

impl Fill<'_> {
    fn run(&self, cell: &str, arm: Option<&str>, seed: i64, tag: &str, params: &Value) -> i64 {
        self.run_kind(RunKind::Generator, cell, arm, seed, tag, params)
    }

    fn run_kind(
        &self,
        kind: RunKind,
        cell: &str,
        arm: Option<&str>,
        seed: i64,
        tag: &str,
        params: &Value,
    ) -> i64 {
        let hash = format!("{kind}-{cell}-{arm:?}-{seed}-{tag}");
        let run = NewRun {
            hash: &hash,
            kind,
            name: &hash,
            cell,
            arm,
            seed,
            params,
            git_commit: None,
            git_dirty: false,
            host: "test-host",
            device: "cpu",
            version: "0.1.0",
        };
        let id = self.db.create_run(self.exp, &run).unwrap();
        self.db.finish_run(id).unwrap();
        id
    }
}

fn add_eval(db: &Db, run_id: i64, step: i64, metric: &str, value: f64) {
    let settings = json!({ "reference": "test" });
    db.insert_eval(&NewEval {
        run_id,
        step,
        metric,
        value,
        sample_count: 1000,
        feature_net: "inception",
        settings: &settings,
    })
    .unwrap();
}

fn add_loss(db: &Db, run_id: i64, f: impl Fn(i64) -> f64) {
    let points: Vec<MetricPoint> = (0..=10)
        .map(|step| MetricPoint {
            key: LOSS_KEY.to_string(),
            step: step * 10,
            value: f(step),
            wall_time: step as f64,
        })
        .collect();
    db.insert_metrics(run_id, &points).unwrap();
}

/// Known values, rows in creation order:
/// - AR raster ("generator.kind=ar"), 3 seeds per arm. Without CFG: FID ce [10, 12, 14],
///   diffusion [7, 9, 11.5]; IS ce [50, 52, 54], diffusion [60, 61, 65]; stale evals at step
///   100 and a "kid" metric that must be ignored. With CFG (cells "· sample.cfg=2" / "=3"):
///   ce FID cfg 2 [8, 9, 10], cfg 3 [7, 8, 9.5] → cfg 3 is its best; diffusion FID cfg 2
///   [5, 6, 7], cfg 3 [6, 7, 8] → cfg 2; IS ce cfg 3 [75, 76, 77], diffusion cfg 2 [80, 82, 84].
/// - MAR, 4 steps for 16 tokens ("generator.kind=mar"): cross-entropy only; FID [20, 22],
///   IS [40] (seed 1 has no IS).
/// - AR random ("generator.kind=ar · generator.order=random"): 2 seeds; FID ce [5, 6],
///   diffusion [9, 10.5]; IS ce [30, 31], diffusion [30.5, 30.5]; seed 0 of ce was re-run and
///   the later run wins.
/// - MAR, 16 steps for 16 tokens ("… · sample.mar_steps=16"): a run without any eval.
/// - a tokenizer run with a "fid" eval and a huge loss that must not show up.
fn fill(db: &Db) {
    let exp = db
        .upsert_experiment(EXP, "experiments/test.toml", "seeds = [0, 1, 2]")
        .unwrap();
    let f = Fill { db, exp };
    let ar = |cfg| params("ar", "raster", cfg, 4);

    let fid_ce = [10.0, 12.0, 14.0];
    let fid_dl = [7.0, 9.0, 11.5];
    let is_ce = [50.0, 52.0, 54.0];
    let is_dl = [60.0, 61.0, 65.0];
    for seed in 0..3 {
        let s = seed as usize;
        let r = f.run("generator.kind=ar", CE, seed, "", &ar(1.0));
        add_eval(db, r, 100, "fid", 99.0);
        add_eval(db, r, 100, "is", 1.0);
        add_eval(db, r, 200, "fid", fid_ce[s]);
        add_eval(db, r, 200, "is", is_ce[s]);
        add_eval(db, r, 200, "kid", 0.5);
        add_loss(db, r, |step| 2.0 - 0.1 * step as f64 + 0.05 * seed as f64);
        let r = f.run("generator.kind=ar", DL, seed, "", &ar(1.0));
        add_eval(db, r, 200, "fid", fid_dl[s]);
        add_eval(db, r, 200, "is", is_dl[s]);
        add_loss(db, r, |step| 1.5 - 0.08 * step as f64 + 0.05 * seed as f64);
    }
    let guided = [
        (CE, 2.0, [8.0, 9.0, 10.0], [70.0, 71.0, 72.0]),
        (CE, 3.0, [7.0, 8.0, 9.5], [75.0, 76.0, 77.0]),
        (DL, 2.0, [5.0, 6.0, 7.0], [80.0, 82.0, 84.0]),
        (DL, 3.0, [6.0, 7.0, 8.0], [90.0, 91.0, 92.0]),
    ];
    for (arm, cfg, fids, iss) in guided {
        for seed in 0..3 {
            let cell = format!("generator.kind=ar · sample.cfg={cfg}");
            let r = f.run(&cell, arm, seed, "", &ar(cfg));
            add_eval(db, r, 200, "fid", fids[seed as usize]);
            add_eval(db, r, 200, "is", iss[seed as usize]);
        }
    }

    let mar = params("mar", "raster", 1.0, 4);
    let r = f.run("generator.kind=mar", CE, 0, "", &mar);
    add_eval(db, r, 50, "fid", 20.0);
    add_eval(db, r, 50, "is", 40.0);
    let r = f.run("generator.kind=mar", CE, 1, "", &mar);
    add_eval(db, r, 50, "fid", 22.0);

    let cell = "generator.kind=ar · generator.order=random";
    let random = params("ar", "random", 1.0, 4);
    let stale = f.run(cell, CE, 0, "old", &random);
    add_eval(db, stale, 200, "fid", 500.0);
    add_eval(db, stale, 200, "is", 500.0);
    for (seed, (fc, fd, ic, id)) in [(5.0, 9.0, 30.0, 30.5), (6.0, 10.5, 31.0, 30.5)]
        .into_iter()
        .enumerate()
    {
        let seed = seed as i64;
        let r = f.run(cell, CE, seed, "new", &random);
        add_eval(db, r, 200, "fid", fc);
        add_eval(db, r, 200, "is", ic);
        let r = f.run(cell, DL, seed, "new", &random);
        add_eval(db, r, 200, "fid", fd);
        add_eval(db, r, 200, "is", id);
    }

    let one_step = params("mar", "random", 1.0, 16);
    let running = f.run(
        "generator.kind=mar · sample.mar_steps=16",
        DL,
        0,
        "",
        &one_step,
    );
    // Still running, no result yet: the report calls the experiment partial.
    db.start_run(running, 1, "test-host", "cpu", None, false)
        .unwrap();

    let tok = f.run_kind(RunKind::Tokenizer, "vq", CE, 0, "", &json!({}));
    add_eval(db, tok, 10, "fid", 1000.0);
    add_loss(db, tok, |_| 100.0);
}

fn open_filled(dir: &Path) -> Db {
    let db = Db::open(&dir.join("ablate.sqlite")).unwrap();
    fill(&db);
    db
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

// runs recorded without a parameter count (as before the harness recorded one) show "? / ?"
const AR: &str = "| AR | raster | causal | 1 | ? / ? | – |";
const AR_RANDOM: &str = "| AR | random | causal | 1 | ? / ? | – |";
const MAR_MANY: &str = "| MAR | random | bidirectional | many (4 steps) | ? / ? | – |";
const MAR_ONE: &str = "| MAR | random | bidirectional | 1 | ? / ? | sample.mar_steps=16 |";

/// The table row starting with `prefix` (its descriptor cells), split into its columns.
fn row<'a>(md: &'a str, prefix: &str) -> Vec<&'a str> {
    let line = md
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no row {prefix} in\n{md}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

const ALL: [Format; 3] = Format::ALL;

#[test]
fn summary_numbers_match_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    let l = load(&db, EXP, None).unwrap();
    let s = &l.summary;
    let keys: Vec<&str> = l.rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "generator.kind=ar",
            "generator.kind=mar",
            "generator.kind=ar · generator.order=random",
            "generator.kind=mar · sample.mar_steps=16"
        ]
    );
    let ar = "generator.kind=ar";

    let a = s.arm(ar, WITHOUT_CFG, ARM_CROSS_ENTROPY, "fid").unwrap();
    assert!(
        approx(a.mean, 12.0) && approx(a.std.unwrap(), 2.0) && a.n == 3 && a.cfg == 1.0,
        "{a:?}"
    );
    let a = s.arm(ar, WITHOUT_CFG, ARM_DIFFUSION, "fid").unwrap();
    assert!(approx(a.mean, 27.5 / 3.0), "{a:?}");
    assert!(approx(a.std.unwrap(), (61.0f64 / 12.0).sqrt()), "{a:?}");
    // With CFG each arm keeps its best (lowest mean FID) scale: 3 for ce, 2 for diffusion.
    let a = s.arm(ar, WITH_CFG, ARM_CROSS_ENTROPY, "fid").unwrap();
    assert!(a.cfg == 3.0 && approx(a.mean, 24.5 / 3.0), "{a:?}");
    let a = s.arm(ar, WITH_CFG, ARM_CROSS_ENTROPY, "is").unwrap();
    assert!(a.cfg == 3.0 && approx(a.mean, 76.0), "{a:?}");
    let a = s.arm(ar, WITH_CFG, ARM_DIFFUSION, "fid").unwrap();
    assert!(
        a.cfg == 2.0 && approx(a.mean, 6.0) && approx(a.std.unwrap(), 1.0),
        "{a:?}"
    );
    let a = s
        .arm("generator.kind=mar", WITHOUT_CFG, ARM_CROSS_ENTROPY, "is")
        .unwrap();
    assert!(approx(a.mean, 40.0) && a.std.is_none() && a.n == 1, "{a:?}");
    assert!(s
        .arm("generator.kind=mar", WITHOUT_CFG, ARM_DIFFUSION, "fid")
        .is_none());
    // The re-run of seed 0 replaces the stale run.
    let random = "generator.kind=ar · generator.order=random";
    let a = s
        .arm(random, WITHOUT_CFG, ARM_CROSS_ENTROPY, "fid")
        .unwrap();
    assert!(approx(a.mean, 5.5) && a.n == 2, "{a:?}");
    // Tokenizer runs and unknown metrics never enter.
    assert!(s.arms.iter().all(|a| a.metric == "fid" || a.metric == "is"));
    assert!(s.arms.iter().all(|a| a.mean < 100.0));

    // ΔFID on AR: diffs [-3, -3, -2.5]; mean -17/6, sd sqrt(1/12), t(2) = 4.303.
    let p = s.pair(ar, WITHOUT_CFG, "fid").unwrap();
    let half = 4.303 * (1.0f64 / 12.0).sqrt() / 3f64.sqrt();
    assert_eq!(p.n, 3);
    assert!(approx(p.mean, -17.0 / 6.0), "{p:?}");
    assert!(approx(p.lo.unwrap(), -17.0 / 6.0 - half), "{p:?}");
    assert!(approx(p.hi.unwrap(), -17.0 / 6.0 + half), "{p:?}");
    assert_eq!(p.verdict, "better");
    // ΔIS on AR: diffs [10, 9, 11]; higher is better.
    let p = s.pair(ar, WITHOUT_CFG, "is").unwrap();
    let half = 4.303 / 3f64.sqrt();
    assert!(
        approx(p.lo.unwrap(), 10.0 - half) && approx(p.hi.unwrap(), 10.0 + half),
        "{p:?}"
    );
    assert_eq!(p.verdict, "better");
    // With CFG the pairs are diffusion at cfg 2 against ce at cfg 3: [-2, -2, -2.5].
    let p = s.pair(ar, WITH_CFG, "fid").unwrap();
    let half = 4.303 * (1.0f64 / 12.0).sqrt() / 3f64.sqrt();
    assert!(
        approx(p.mean, -13.0 / 6.0) && approx(p.hi.unwrap(), -13.0 / 6.0 + half),
        "{p:?}"
    );
    assert_eq!(p.verdict, "better");
    // AR random: FID got worse with a CI excluding 0, IS inconclusive.
    let p = s.pair(random, WITHOUT_CFG, "fid").unwrap();
    let half = 12.706 * 0.125f64.sqrt() / 2f64.sqrt();
    assert!(
        approx(p.mean, 4.25) && approx(p.lo.unwrap(), 4.25 - half),
        "{p:?}"
    );
    assert_eq!(p.verdict, "worse");
    let p = s.pair(random, WITHOUT_CFG, "is").unwrap();
    assert!(approx(p.mean, 0.0));
    assert_eq!(p.verdict, "inconclusive");
    // No pairs where an arm is missing, nothing with CFG where no run used it.
    assert!(s.pair("generator.kind=mar", WITHOUT_CFG, "fid").is_none());
    assert!(s.pair(random, WITH_CFG, "fid").is_none());
}

#[test]
fn single_pair_is_inconclusive_without_interval() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("a.sqlite")).unwrap();
    let exp = db.upsert_experiment("one", "one.toml", "").unwrap();
    let f = Fill { db: &db, exp };
    let sized = |n: u64| {
        let mut p = params("ar", "raster", 1.0, 4);
        p["model"] = json!({ "param_count": n, "seq_len": 16 });
        p
    };
    let r = f.run("base", CE, 0, "", &sized(7248));
    add_eval(&db, r, 1, "fid", 30.0);
    let r = f.run("base", DL, 0, "", &sized(2_930_976));
    add_eval(&db, r, 1, "fid", 10.0);
    let out = write_report(&db, "one", &dir.path().join("out"), &ALL).unwrap();
    let cols = row(&out.markdown, "| AR | raster | causal | 1 |");
    assert_eq!(cols.len(), 5 + 16, "no setting column: {cols:?}");
    assert_eq!(cols[4], "7.2k / 2.93M", "each arm's recorded size");
    let cols = &cols[1..];
    assert_eq!(
        cols[4..8],
        [
            "30.00 ± – (n=1)",
            "10.00 ± – (n=1)",
            "-20.00 [–] (n=1)",
            "inconclusive"
        ]
    );
    assert_eq!(cols[8..12], ["missing", "missing", "missing", "–"]);
    // Nothing sampled with CFG: those columns are missing, not 0.
    assert!(cols[12..].iter().all(|c| *c == "missing" || *c == "–"));
    // No loss recorded: no loss plot; no CFG sweep: no sweep or trade-off plot.
    for absent in [
        "loss_curves.png",
        "sweep_cfg.png",
        "fid_is_tradeoff.png",
        "fid_bars_cfg.png",
    ] {
        assert!(!dir.path().join("out").join(absent).exists(), "{absent}");
    }
    assert!(dir.path().join("out/fid_bars.png").exists());
}

#[test]
fn report_table_files_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    // A sample grid artifact for one run, one whose file is gone, and one whose bytes no longer
    // match their recorded sha256.
    let runs = db.list_runs(Some(EXP)).unwrap();
    let png = dir.path().join("grid.png");
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x18\0\0\0\x18".to_vec();
    bytes.extend([0u8; 64]);
    std::fs::write(&png, &bytes).unwrap();
    let sha = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&bytes))
    };
    db.insert_artifact(
        runs[0].id,
        SAMPLES_ARTIFACT,
        &png.display().to_string(),
        &sha,
        88,
    )
    .unwrap();
    db.insert_artifact(
        runs[2].id,
        SAMPLES_ARTIFACT,
        &png.display().to_string(),
        "0000 (not the file's hash)",
        88,
    )
    .unwrap();
    db.insert_artifact(
        runs[1].id,
        SAMPLES_ARTIFACT,
        "/nonexistent/samples.png",
        "y",
        1,
    )
    .unwrap();

    let out_dir = match std::env::var_os("REPORTS_TEST_OUT") {
        Some(p) => std::path::PathBuf::from(p),
        None => dir.path().join("report"),
    };
    let out = write_report(&db, EXP, &out_dir, &ALL).unwrap();
    let md = &out.markdown;

    assert!(md.starts_with(&format!("# Ablation report: {EXP}\n")));
    assert!(md.contains("paired t interval"));
    assert!(md.contains("How to read"));
    assert!(md.contains(
        "| generator | order | attention | preds/step | parameters (CE / diffusion) | setting \
         | FID cross-entropy | FID diffusion \
         | ΔFID (95% CI) | verdict | IS cross-entropy | IS diffusion | ΔIS (95% CI) | verdict \
         | FID+CFG cross-entropy | FID+CFG diffusion | ΔFID+CFG (95% CI) | verdict \
         | IS+CFG cross-entropy | IS+CFG diffusion | ΔIS+CFG (95% CI) | verdict |"
    ));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("report.md")).unwrap(),
        *md
    );

    assert_eq!(
        row(md, AR)[6..],
        [
            "12.00 ± 2.00 (n=3)",
            "9.17 ± 2.25 (n=3)",
            "-2.83 [-3.55, -2.12] (n=3)",
            "better",
            "52.00 ± 2.00 (n=3)",
            "62.00 ± 2.65 (n=3)",
            "+10.00 [+7.52, +12.48] (n=3)",
            "better",
            "8.17 ± 1.26 (n=3, cfg 3)",
            "6.00 ± 1.00 (n=3, cfg 2)",
            "-2.17 [-2.88, -1.45] (n=3)",
            "better",
            "76.00 ± 1.00 (n=3, cfg 3)",
            "82.00 ± 2.00 (n=3, cfg 2)",
            "+6.00 [+3.52, +8.48] (n=3)",
            "better",
        ]
    );
    let mar = row(md, MAR_MANY);
    assert_eq!(
        mar[6..14],
        [
            "21.00 ± 1.41 (n=2)",
            "missing",
            "missing",
            "–",
            "40.00 ± – (n=1)",
            "missing",
            "missing",
            "–",
        ]
    );
    assert!(mar[14..].iter().all(|c| *c == "missing" || *c == "–"));
    assert_eq!(
        row(md, AR_RANDOM)[6..14],
        [
            "5.50 ± 0.71 (n=2)",
            "9.75 ± 1.06 (n=2)",
            "+4.25 [+1.07, +7.43] (n=2)",
            "worse",
            "30.50 ± 0.71 (n=2)",
            "30.50 ± 0.00 (n=2)",
            "+0.00 [-6.35, +6.35] (n=2)",
            "inconclusive",
        ]
    );
    let missing_row = row(md, MAR_ONE);
    assert!(
        missing_row[6..]
            .iter()
            .all(|c| *c == "missing" || *c == "–"),
        "{missing_row:?}"
    );
    // Rows in position order; the tokenizer never appears; the partial run is noted.
    let pos = |prefix: &str| md.find(prefix).unwrap();
    assert!(pos(AR) < pos(MAR_MANY));
    assert!(pos(MAR_MANY) < pos(AR_RANDOM));
    assert!(pos(AR_RANDOM) < pos(MAR_ONE));
    assert!(md.contains("Partial experiment: 1 of 26 generator runs are not finished (1 running)"));
    for link in [
        "(fid_bars.png)",
        "(fid_bars.svg)",
        "(fid_bars_cfg.png)",
        "(loss_curves.png)",
        "(sweep_cfg.png)",
        "(fid_is_tradeoff.png)",
        "(samples/run-1.png)",
        "(metrics.csv)",
    ] {
        assert!(md.contains(link), "missing link {link}");
    }

    let names: Vec<String> = out
        .files
        .iter()
        .map(|p| {
            p.strip_prefix(&out_dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "report.md",
            "report.html",
            "fid_bars.png",
            "fid_bars.svg",
            "fid_bars_cfg.png",
            "fid_bars_cfg.svg",
            "loss_curves.png",
            "loss_curves.svg",
            "fid_over_training.png",
            "fid_over_training.svg",
            "sweep_cfg.png",
            "sweep_cfg.svg",
            "fid_is_tradeoff.png",
            "fid_is_tradeoff.svg",
            "samples/run-1.png",
            "metrics.csv",
        ]
    );
    assert!(out.files.iter().all(|p| p.is_file()));
    for f in out
        .files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
    {
        let bytes = std::fs::read(f).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", f.display());
        if !f.starts_with(out_dir.join("samples")) {
            assert!(
                bytes.len() > 5_000,
                "{} is only {} bytes",
                f.display(),
                bytes.len()
            );
        }
    }
    let svg = std::fs::read_to_string(out_dir.join("fid_bars.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("cross-entropy") && svg.contains("diffusion"));
    assert!(svg.contains("AR · raster") && svg.contains("preds/step: many (4 steps)"));

    // The HTML report stands alone: the same numbers, inline SVG, the grid as a data URI,
    // and nothing fetched from elsewhere.
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("8.17 ± 1.26<br>(n=3, cfg 3)"));
    assert!(html.contains("<td class=\"better\">better</td>"));
    assert!(html.contains("<td class=\"worse\">worse</td>"));
    assert_eq!(html.matches("<svg").count(), 6, "one inline SVG per plot");
    assert!(html.contains(&format!(
        "src=\"data:image/png;base64,{}\"",
        html::base64(&bytes)
    )));
    assert!(
        html.contains("width=\"48\""),
        "small grids shown at twice their size"
    );
    assert!(html.contains("grid file missing (/nonexistent/samples.png)"));
    // each grid not shown is named in the report's notes, with the reason
    let md = &out.markdown;
    assert!(
        md.contains(&format!(
            "The sample grid of run {} (/nonexistent/samples.png) cannot be read",
            runs[1].id
        )),
        "{md}"
    );
    assert!(
        md.contains(&format!("The sample grid of run {} (", runs[2].id))
            && md.contains("does not match the sha256"),
        "{md}"
    );
    assert_eq!(
        html.matches(&format!(
            "src=\"data:image/png;base64,{}\"",
            html::base64(&bytes)
        ))
        .count(),
        1,
        "the damaged copy is not embedded"
    );
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http") && !html.contains("<link")
    );

    let csv = std::fs::read_to_string(out_dir.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "run_id,run_name,kind,cell,arm,seed,step,metric,value,sample_count,feature_net,settings,position,row,guidance,cfg"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), db.evals_for_experiment(EXP).unwrap().len());
    assert!(rows[0].starts_with("1,") && rows[0].ends_with(",generator.kind=ar,without,1.0"));
}

#[test]
fn formats_choose_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    let out_dir = dir.path().join("csv-only");
    let out = write_report(&db, EXP, &out_dir, &[Format::Csv]).unwrap();
    assert_eq!(out.files, [out_dir.join("metrics.csv")]);
    assert!(!out_dir.join("fid_bars.png").exists() && !out_dir.join("report.md").exists());
    let out_dir = dir.path().join("md-only");
    let out = write_report(&db, EXP, &out_dir, &[Format::Markdown]).unwrap();
    assert_eq!(out.files[0], out_dir.join("report.md"));
    assert!(!out_dir.join("report.html").exists() && !out_dir.join("metrics.csv").exists());
    assert!(!out.markdown.contains("metrics.csv"));
}

#[test]
fn loss_curves_average_generator_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    let l = load(&db, EXP, None).unwrap();
    let losses = db.metrics_for_experiment(EXP, LOSS_KEY).unwrap();
    let curves = stats::loss_curves(&frames::metrics_frame(&losses).unwrap(), &l.runs_df).unwrap();
    // One row with losses (few rows): one curve per (row, arm).
    let labels: Vec<&str> = curves.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "AR · raster · causal · 1 / cross-entropy",
            "AR · raster · causal · 1 / diffusion"
        ]
    );
    let ce = &curves[0];
    assert_eq!(ce.points.len(), 11);
    // Step 0: seeds give 2.0, 2.05, 2.1 → mean 2.05, sd 0.05.
    let (x, m, s) = ce.points[0];
    assert!(
        x == 0.0 && approx(m, 2.05) && approx(s.unwrap(), 0.05),
        "{:?}",
        ce.points[0]
    );
    let (x, m, _) = ce.points[10];
    assert!(x == 100.0 && approx(m, 1.05), "{:?}", ce.points[10]);
    assert!(curves.iter().flat_map(|c| &c.points).all(|p| p.1 < 10.0));
    // Only the AR cross-entropy runs were evaluated at two steps (100 and 200): FID over
    // training has that one curve.
    let over = stats::fid_over_training(&l.evals_df, &l.runs_df).unwrap();
    assert_eq!(over.len(), 1, "{over:?}");
    let c = &over[0];
    assert_eq!(c.label, "AR · raster · causal · 1 · cfg 1 / cross-entropy");
    assert_eq!(c.points.len(), 2);
    assert!(
        approx(c.points[0].1, 99.0) && approx(c.points[1].1, 12.0),
        "{c:?}"
    );
}

#[test]
fn fid_over_training_and_sweeps_follow_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("a.sqlite")).unwrap();
    let exp = db.upsert_experiment("sweep", "s.toml", "").unwrap();
    let f = Fill { db: &db, exp };
    for t in [0.5, 1.0] {
        for seed in 0..2 {
            let mut p = params("mar", "random", 1.0, 4);
            p["sample"]["temperature"] = json!(t);
            let cell = format!("sample.temperature={t}");
            for (arm, offset) in [(CE, 0.0), (DL, -1.0)] {
                let r = f.run(&cell, arm, seed, "", &p);
                for step in [100, 200] {
                    let fid = 10.0 * t + offset + seed as f64 - step as f64 / 100.0;
                    add_eval(&db, r, step, "fid", fid);
                    add_eval(&db, r, step, "is", 5.0 + t);
                }
            }
        }
    }
    let out = write_report(&db, "sweep", &dir.path().join("out"), &ALL).unwrap();
    let l = load(&db, "sweep", None).unwrap();
    let curves = stats::fid_over_training(&l.evals_df, &l.runs_df).unwrap();
    // Two rows (temperature 0.5 and 1), two arms, two steps each.
    assert_eq!(curves.len(), 4, "{curves:?}");
    let c = &curves[0];
    assert_eq!(c.label, "MAR · random · bidirectional · many (4 steps) · sample.temperature=0.5 · cfg 1 / cross-entropy");
    // seeds 0 and 1 at step 100: 5 + 0 − 1, 5 + 1 − 1 → 4.5.
    assert!(
        c.points[0].0 == 100.0 && approx(c.points[0].1, 4.5),
        "{c:?}"
    );
    let runs = db.list_runs(Some("sweep")).unwrap();
    let infos = rows::describe(&runs);
    let varying = [false, true, false, false];
    let axis = frames::axis_frame(&infos, 1, &varying).unwrap();
    let sweep = stats::sweep(&l.evals_df, &l.runs_df, &axis).unwrap();
    assert_eq!(sweep.fid.len(), 2, "one line per arm: {:?}", sweep.fid);
    assert_eq!(
        sweep.fid[0].label,
        "MAR · random · bidirectional · many (4 steps) / cross-entropy"
    );
    // Last step (200): 10t + seed − 2 → t = 0.5: 3.5; t = 1: 8.5.
    let pts: Vec<(f64, f64)> = sweep.fid[0].points.iter().map(|p| (p.0, p.1)).collect();
    assert!(
        approx(pts[0].1, 3.5) && approx(pts[1].1, 8.5) && pts[0].0 == 0.5,
        "{pts:?}"
    );
    let names: Vec<String> = out
        .files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for f in ["fid_over_training.svg", "sweep_temperature.png"] {
        assert!(names.iter().any(|n| n == f), "{f} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("fid_is_tradeoff")));
}

#[test]
fn unknown_experiment_is_a_usage_error_and_empty_one_reports_nothing_yet() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("a.sqlite")).unwrap();
    db.upsert_experiment("empty", "empty.toml", "").unwrap();
    match write_report(&db, "nonexistent", &dir.path().join("out"), &ALL) {
        Err(e @ Error::UnknownExperiment(_)) => assert!(e.is_usage()),
        other => panic!("expected UnknownExperiment, got {other:?}"),
    }
    let out = write_report(&db, "empty", &dir.path().join("out"), &ALL).unwrap();
    assert!(out.markdown.contains("No generator runs recorded"));
    match pin_baseline(&db, "empty", "main") {
        Err(Error::NoResults(n)) => assert_eq!(n, "empty"),
        other => panic!("expected NoResults, got {other:?}"),
    }
}

// ------------------------------------------------------------------ drift

fn tol(absolute: Option<f64>, relative: Option<f64>, seed_spread: Option<f64>) -> Tolerance {
    Tolerance {
        absolute,
        relative,
        seed_spread,
    }
}

/// Replaces the FID (or IS) of every seed of (cell, arm) at step 200 through `db`.
fn set_values(db: &Db, cell: &str, arm: &str, metric: &str, values: &[f64]) {
    let runs = db.list_runs(Some(EXP)).unwrap();
    let mut runs: Vec<_> = runs
        .into_iter()
        .filter(|r| r.cell == cell && r.arm.as_deref() == Some(arm) && r.kind == RunKind::Generator)
        .collect();
    runs.sort_by_key(|r| r.seed);
    assert_eq!(runs.len(), values.len());
    for (r, v) in runs.iter().zip(values) {
        add_eval(db, r.id, 200, metric, *v);
    }
}

fn status_of<'a>(
    report: &'a CheckReport,
    label: &str,
    guidance: &str,
    arm: &str,
    metric: &str,
) -> &'a CheckRow {
    report
        .rows
        .iter()
        .find(|r| {
            r.entry.label == label
                && r.entry.guidance == guidance
                && r.entry.arm == arm
                && r.entry.metric == metric
        })
        .unwrap_or_else(|| panic!("no check row for {label} {guidance} {arm} {metric}"))
}

const AR_LABEL: &str = "AR · raster · causal · 1";

#[test]
fn check_passes_within_and_fails_outside_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    let pinned = pin_baseline(&db, EXP, "main").unwrap();
    assert_eq!(pinned.len(), db_entries(&db));
    assert_eq!(
        pinned[0].name(),
        "AR · raster · causal · 1 / no CFG / cross-entropy"
    );
    let tolerances = BTreeMap::from([
        ("fid".to_string(), tol(Some(1.0), None, None)),
        ("is".to_string(), tol(None, Some(0.1), None)),
    ]);
    // Unchanged: everything ok.
    let report = check(&db, EXP, "main", &tolerances).unwrap();
    assert!(!report.failed(), "{}", report.render_table());
    assert!(report.rows.iter().all(|r| r.status == Status::Ok));

    // ce FID +0.5 on every seed (within 1.0); diffusion FID −4 (falls freely).
    set_values(
        &db,
        "generator.kind=ar",
        ARM_CROSS_ENTROPY,
        "fid",
        &[10.5, 12.5, 14.5],
    );
    set_values(
        &db,
        "generator.kind=ar",
        ARM_DIFFUSION,
        "fid",
        &[3.0, 5.0, 7.5],
    );
    // diffusion IS rises by 20 (rises freely); ce IS falls 4 (within 10% of 52 = 5.2).
    set_values(
        &db,
        "generator.kind=ar",
        ARM_DIFFUSION,
        "is",
        &[80.0, 81.0, 85.0],
    );
    set_values(
        &db,
        "generator.kind=ar",
        ARM_CROSS_ENTROPY,
        "is",
        &[46.0, 48.0, 50.0],
    );
    let report = check(&db, EXP, "main", &tolerances).unwrap();
    assert!(!report.failed(), "{}", report.render_table());
    let r = status_of(&report, AR_LABEL, WITHOUT_CFG, ARM_CROSS_ENTROPY, "fid");
    assert!(
        approx(r.delta.unwrap(), 0.5) && approx(r.allowed.unwrap(), 1.0),
        "{r:?}"
    );
    let r = status_of(&report, AR_LABEL, WITHOUT_CFG, ARM_CROSS_ENTROPY, "is");
    assert!(
        approx(r.delta.unwrap(), -4.0) && approx(r.allowed.unwrap(), 5.2),
        "{r:?}"
    );

    // ce FID +1.5 (past 1.0) and ce IS −6 (past 5.2): drift, exit-worthy.
    set_values(
        &db,
        "generator.kind=ar",
        ARM_CROSS_ENTROPY,
        "fid",
        &[11.5, 13.5, 15.5],
    );
    set_values(
        &db,
        "generator.kind=ar",
        ARM_CROSS_ENTROPY,
        "is",
        &[44.0, 46.0, 48.0],
    );
    let report = check(&db, EXP, "main", &tolerances).unwrap();
    assert!(report.failed());
    assert_eq!(report.failures(), 2, "{}", report.render_table());
    let r = status_of(&report, AR_LABEL, WITHOUT_CFG, ARM_CROSS_ENTROPY, "fid");
    assert_eq!(r.status, Status::Drift);
    assert!(
        r.message
            .contains("fid rise of 1.5000 exceeds the allowed 1.0000"),
        "{}",
        r.message
    );
    let r = status_of(&report, AR_LABEL, WITHOUT_CFG, ARM_CROSS_ENTROPY, "is");
    assert_eq!(r.status, Status::Drift);
    let table = report.render_table();
    assert!(
        table.contains("DRIFT") && table.contains("2 failing: DRIFT"),
        "{table}"
    );

    let xml = report.junit_xml();
    assert!(xml.starts_with("<?xml"));
    assert!(xml.contains(&format!("tests=\"{}\" failures=\"2\"", report.rows.len())));
    assert_eq!(xml.matches("<failure type=\"DRIFT\"").count(), 2);
    assert!(xml.contains(
        "classname=\"ablate.check.table1-test.fid\" name=\"AR · raster · causal · 1 / no CFG / cross-entropy\""
    ));

    // Unknown baseline: a usage error.
    match check(&db, EXP, "nope", &tolerances) {
        Err(e @ Error::UnknownBaseline { .. }) => assert!(e.is_usage()),
        other => panic!("expected UnknownBaseline, got {other:?}"),
    }
}

fn db_entries(db: &Db) -> usize {
    current_entries(db, EXP).unwrap().len()
}

#[test]
fn check_in_units_of_the_seed_spread() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    pin_baseline(&db, EXP, "noise").unwrap();
    // Baseline ce FID on AR: mean 12, std 2 → 1.5 std allows a rise of 3.
    let tolerances = BTreeMap::from([("fid".to_string(), tol(None, None, Some(1.5)))]);
    set_values(
        &db,
        "generator.kind=ar",
        ARM_CROSS_ENTROPY,
        "fid",
        &[12.5, 14.5, 16.5],
    );
    let report = check(&db, EXP, "noise", &tolerances).unwrap();
    let r = status_of(&report, AR_LABEL, WITHOUT_CFG, ARM_CROSS_ENTROPY, "fid");
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(approx(r.allowed.unwrap(), 3.0) && approx(r.delta.unwrap(), 2.5));
    set_values(
        &db,
        "generator.kind=ar",
        ARM_CROSS_ENTROPY,
        "fid",
        &[13.5, 15.5, 17.5],
    );
    let report = check(&db, EXP, "noise", &tolerances).unwrap();
    let r = status_of(&report, AR_LABEL, WITHOUT_CFG, ARM_CROSS_ENTROPY, "fid");
    assert_eq!(r.status, Status::Drift, "{r:?}");
    assert!(
        r.message.contains("seed_spread 1.5 × std 2.0000"),
        "{}",
        r.message
    );
    // MAR ce has one IS seed… but IS has no tolerance here: shown, not judged.
    let mar = "MAR · random · bidirectional · many (4 steps)";
    let r = status_of(&report, mar, WITHOUT_CFG, ARM_CROSS_ENTROPY, "is");
    assert_eq!(r.status, Status::Unchecked);
    // A seed-spread-only tolerance on a one-seed baseline cannot judge anything: it fails.
    let only_spread = BTreeMap::from([("is".to_string(), tol(None, None, Some(2.0)))]);
    let report = check(&db, EXP, "noise", &only_spread).unwrap();
    let r = status_of(&report, mar, WITHOUT_CFG, ARM_CROSS_ENTROPY, "is");
    assert_eq!(r.status, Status::NoSpread);
    assert!(report.failed());
    // With an absolute part as well, the absolute part alone judges it.
    let mixed = BTreeMap::from([("is".to_string(), tol(Some(0.5), None, Some(2.0)))]);
    let report = check(&db, EXP, "noise", &mixed).unwrap();
    let r = status_of(&report, mar, WITHOUT_CFG, ARM_CROSS_ENTROPY, "is");
    assert_eq!(r.status, Status::Ok);
    assert!(approx(r.allowed.unwrap(), 0.5));
}

#[test]
fn compare_flags_missing_and_new_entries() {
    let entry = |row: &str, metric: &str, mean: f64| Entry {
        row: row.into(),
        label: row.into(),
        guidance: WITHOUT_CFG.into(),
        arm: ARM_DIFFUSION.into(),
        metric: metric.into(),
        cfg: 1.0,
        mean,
        std: Some(1.0),
        n: 3,
    };
    let baseline = [entry("a", "fid", 10.0), entry("b", "fid", 10.0)];
    let current = [entry("a", "fid", 9.0), entry("c", "fid", 50.0)];
    let tolerances = BTreeMap::from([
        ("fid".to_string(), tol(Some(0.1), None, None)),
        ("kid".to_string(), tol(Some(0.1), None, None)),
    ]);
    let report = drift::compare("e", "base", &baseline, &current, &tolerances);
    let statuses: Vec<Status> = report.rows.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Status::Ok, Status::Missing, Status::New]);
    assert!(report.failed());
    assert_eq!(
        report.warnings.len(),
        1,
        "kid has no entries: {:?}",
        report.warnings
    );
    let xml = report.junit_xml();
    assert!(xml.contains("failures=\"1\" skipped=\"1\""), "{xml}");
    // A non-finite current value is drift whatever the tolerance.
    let report = drift::compare(
        "e",
        "base",
        &baseline[..1],
        &[entry("a", "fid", f64::NAN)],
        &tolerances,
    );
    assert_eq!(report.rows[0].status, Status::Drift);
}
