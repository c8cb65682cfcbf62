//! Tests against a real `db::Db` in a temporary directory, filled with known values.

use std::path::Path;

use db::{Db, MetricPoint, MetricRecord, NewEval, NewRun};
use serde_json::json;

use super::*;
use crate::stats::{loss_curves, summarize};

const EXP: &str = "table1-test";

fn add_run(
    db: &Db,
    exp: i64,
    kind: &str,
    cell: &str,
    arm: Option<&str>,
    seed: i64,
    tag: &str,
) -> i64 {
    let params = json!({ "cell": cell, "seed": seed, "tag": tag });
    let hash = format!("{kind}-{cell}-{arm:?}-{seed}-{tag}");
    let run = NewRun {
        hash: &hash,
        kind,
        name: &hash,
        cell,
        arm,
        seed,
        params: &params,
        git_commit: None,
        git_dirty: false,
        host: "test-host",
        device: "cpu",
        version: "0.1.0",
    };
    db.create_run(exp, &run).unwrap()
}

fn add_eval(db: &Db, run_id: i64, step: i64, metric: &str, value: f64) {
    let settings = json!({ "cfg": 1.0 });
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

/// Known values (cells in creation order = position order):
/// - "ar": 3 seeds per arm; FID ce [10, 12, 14], diffusion [7, 9, 11.5]; IS ce [50, 52, 54],
///   diffusion [60, 61, 65]; stale evals at step 100 and a "kid" metric that must be ignored.
/// - "mar": cross-entropy only; FID [20, 22], IS [40] (seed 1 has no IS).
/// - "ar · order=random": 2 seeds; FID ce [5, 6], diffusion [9, 10.5]; IS ce [30, 31],
///   diffusion [30.5, 30.5]; seed 0 of ce was re-run and the later run wins.
/// - "mar · sample.cfg=3": a generator run without any eval.
/// - a tokenizer run with a "fid" eval and a huge loss that must not show up.
fn fill(db: &Db) {
    let exp = db
        .upsert_experiment(EXP, "experiments/test.toml", "seeds = [0, 1, 2]")
        .unwrap();
    let ce = Some(ARM_CROSS_ENTROPY);
    let dl = Some(ARM_DIFFUSION);

    let fid_ce = [10.0, 12.0, 14.0];
    let fid_dl = [7.0, 9.0, 11.5];
    let is_ce = [50.0, 52.0, 54.0];
    let is_dl = [60.0, 61.0, 65.0];
    for seed in 0..3 {
        let s = seed as usize;
        let r = add_run(db, exp, KIND_GENERATOR, "ar", ce, seed, "");
        add_eval(db, r, 100, "fid", 99.0);
        add_eval(db, r, 100, "is", 1.0);
        add_eval(db, r, 200, "fid", fid_ce[s]);
        add_eval(db, r, 200, "is", is_ce[s]);
        add_eval(db, r, 200, "kid", 0.5);
        add_loss(db, r, |step| 2.0 - 0.1 * step as f64 + 0.05 * seed as f64);
        let r = add_run(db, exp, KIND_GENERATOR, "ar", dl, seed, "");
        add_eval(db, r, 200, "fid", fid_dl[s]);
        add_eval(db, r, 200, "is", is_dl[s]);
        add_loss(db, r, |step| 1.5 - 0.08 * step as f64 + 0.05 * seed as f64);
    }

    let r = add_run(db, exp, KIND_GENERATOR, "mar", ce, 0, "");
    add_eval(db, r, 50, "fid", 20.0);
    add_eval(db, r, 50, "is", 40.0);
    let r = add_run(db, exp, KIND_GENERATOR, "mar", ce, 1, "");
    add_eval(db, r, 50, "fid", 22.0);

    let cell = "ar · order=random";
    let stale = add_run(db, exp, KIND_GENERATOR, cell, ce, 0, "old");
    add_eval(db, stale, 200, "fid", 500.0);
    add_eval(db, stale, 200, "is", 500.0);
    for (seed, (fc, fd, ic, id)) in [(5.0, 9.0, 30.0, 30.5), (6.0, 10.5, 31.0, 30.5)]
        .into_iter()
        .enumerate()
    {
        let seed = seed as i64;
        let r = add_run(db, exp, KIND_GENERATOR, cell, ce, seed, "new");
        add_eval(db, r, 200, "fid", fc);
        add_eval(db, r, 200, "is", ic);
        let r = add_run(db, exp, KIND_GENERATOR, cell, dl, seed, "new");
        add_eval(db, r, 200, "fid", fd);
        add_eval(db, r, 200, "is", id);
    }

    add_run(db, exp, KIND_GENERATOR, "mar · sample.cfg=3", dl, 0, "");

    let tok = add_run(db, exp, "tokenizer", "vq", ce, 0, "");
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

/// The table row whose first column is `cell`, split into its columns.
fn row<'a>(md: &'a str, cell: &str) -> Vec<&'a str> {
    let line = md
        .lines()
        .find(|l| l.starts_with(&format!("| {cell} |")))
        .unwrap_or_else(|| panic!("no row for {cell} in\n{md}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert!(
        bytes.len() > 5_000,
        "{} is only {} bytes",
        path.display(),
        bytes.len()
    );
}

#[test]
fn summary_numbers_match_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    let evals = db.evals_for_experiment(EXP).unwrap();
    let s = summarize(&frames::evals_frame(&evals).unwrap()).unwrap();

    assert_eq!(s.cells, ["ar", "mar", "ar · order=random"]);

    let a = s.arm("ar", ARM_CROSS_ENTROPY, "fid").unwrap();
    assert!(
        approx(a.mean, 12.0) && approx(a.std.unwrap(), 2.0) && a.n == 3,
        "{a:?}"
    );
    let a = s.arm("ar", ARM_DIFFUSION, "fid").unwrap();
    assert!(approx(a.mean, 27.5 / 3.0), "{a:?}");
    assert!(approx(a.std.unwrap(), (61.0f64 / 12.0).sqrt()), "{a:?}");
    let a = s.arm("mar", ARM_CROSS_ENTROPY, "is").unwrap();
    assert!(approx(a.mean, 40.0) && a.std.is_none() && a.n == 1, "{a:?}");
    assert!(s.arm("mar", ARM_DIFFUSION, "fid").is_none());
    // The re-run of seed 0 replaces the stale run.
    let a = s
        .arm("ar · order=random", ARM_CROSS_ENTROPY, "fid")
        .unwrap();
    assert!(approx(a.mean, 5.5) && a.n == 2, "{a:?}");
    // Tokenizer runs and unknown metrics never enter.
    assert!(s.arm("vq", ARM_CROSS_ENTROPY, "fid").is_none());
    assert!(s.arms.iter().all(|a| a.metric == "fid" || a.metric == "is"));

    // ΔFID on "ar": diffs [-3, -3, -2.5]; mean -17/6, sd sqrt(1/12), t(2) = 4.303.
    let p = s.pair("ar", "fid").unwrap();
    let half = 4.303 * (1.0f64 / 12.0).sqrt() / 3f64.sqrt();
    assert_eq!(p.n, 3);
    assert!(approx(p.mean, -17.0 / 6.0), "{p:?}");
    assert!(approx(p.lo.unwrap(), -17.0 / 6.0 - half), "{p:?}");
    assert!(approx(p.hi.unwrap(), -17.0 / 6.0 + half), "{p:?}");
    assert_eq!(p.verdict, "better");
    // ΔIS on "ar": diffs [10, 9, 11]; higher is better.
    let p = s.pair("ar", "is").unwrap();
    let half = 4.303 / 3f64.sqrt();
    assert!(
        approx(p.lo.unwrap(), 10.0 - half) && approx(p.hi.unwrap(), 10.0 + half),
        "{p:?}"
    );
    assert_eq!(p.verdict, "better");
    // "ar · order=random": FID got worse with a CI excluding 0, IS inconclusive.
    let p = s.pair("ar · order=random", "fid").unwrap();
    let half = 12.706 * 0.125f64.sqrt() / 2f64.sqrt();
    assert!(
        approx(p.mean, 4.25) && approx(p.lo.unwrap(), 4.25 - half),
        "{p:?}"
    );
    assert_eq!(p.verdict, "worse");
    let p = s.pair("ar · order=random", "is").unwrap();
    assert!(approx(p.mean, 0.0));
    assert_eq!(p.verdict, "inconclusive");
    // No pairs where an arm is missing.
    assert!(s.pair("mar", "fid").is_none());
}

#[test]
fn single_pair_is_inconclusive_without_interval() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("a.sqlite")).unwrap();
    let exp = db.upsert_experiment("one", "one.toml", "").unwrap();
    let r = add_run(
        &db,
        exp,
        KIND_GENERATOR,
        "ar",
        Some(ARM_CROSS_ENTROPY),
        0,
        "",
    );
    add_eval(&db, r, 1, "fid", 30.0);
    let r = add_run(&db, exp, KIND_GENERATOR, "ar", Some(ARM_DIFFUSION), 0, "");
    add_eval(&db, r, 1, "fid", 10.0);
    let out = write_report(&db, "one", &dir.path().join("out")).unwrap();
    let cols = row(&out.markdown, "ar");
    assert_eq!(cols[1], "30.00 ± – (n=1)");
    assert_eq!(cols[2], "10.00 ± – (n=1)");
    assert_eq!(cols[3], "-20.00 [–] (n=1)");
    assert_eq!(cols[4], "inconclusive");
    assert_eq!(cols[5..], ["missing", "missing", "missing", "–"]);
    // No loss recorded: no loss plot, and the report says so.
    assert!(!dir.path().join("out/loss_curves.png").exists());
    assert!(out.markdown.contains("no `train/loss` was recorded"));
}

#[test]
fn report_table_files_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    let out_dir = match std::env::var_os("REPORTS_TEST_OUT") {
        Some(p) => std::path::PathBuf::from(p),
        None => dir.path().join("report"),
    };
    let out = write_report(&db, EXP, &out_dir).unwrap();
    let md = &out.markdown;

    assert!(md.starts_with(&format!("# Ablation report: {EXP}\n")));
    assert!(md.contains("paired t"));
    assert!(md.contains("How to read"));
    assert!(md.contains(
        "| cell | FID cross-entropy | FID diffusion | ΔFID (95% CI) | verdict \
         | IS cross-entropy | IS diffusion | ΔIS (95% CI) | verdict |"
    ));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("report.md")).unwrap(),
        *md
    );

    assert_eq!(
        row(md, "ar"),
        [
            "ar",
            "12.00 ± 2.00 (n=3)",
            "9.17 ± 2.25 (n=3)",
            "-2.83 [-3.55, -2.12] (n=3)",
            "better",
            "52.00 ± 2.00 (n=3)",
            "62.00 ± 2.65 (n=3)",
            "+10.00 [+7.52, +12.48] (n=3)",
            "better",
        ]
    );
    assert_eq!(
        row(md, "mar"),
        [
            "mar",
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
    assert_eq!(
        row(md, "ar · order=random"),
        [
            "ar · order=random",
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
    let missing_cell = row(md, "mar · sample.cfg=3");
    assert!(
        missing_cell[1..]
            .iter()
            .all(|c| *c == "missing" || *c == "–"),
        "{missing_cell:?}"
    );
    // Rows in position order; the tokenizer's cell never appears.
    let pos = |cell: &str| md.find(&format!("| {cell} |")).unwrap();
    assert!(pos("ar") < pos("mar"));
    assert!(pos("mar") < pos("ar · order=random"));
    assert!(pos("ar · order=random") < pos("mar · sample.cfg=3"));
    assert!(!md.contains("| vq |"));
    for link in [
        "(fid_bars.png)",
        "(fid_bars.svg)",
        "(loss_curves.png)",
        "(metrics.csv)",
    ] {
        assert!(md.contains(link), "missing link {link}");
    }

    let names: Vec<String> = out
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "report.md",
            "fid_bars.png",
            "fid_bars.svg",
            "loss_curves.png",
            "metrics.csv"
        ]
    );
    assert!(out.files.iter().all(|p| p.is_file()));
    assert_png(&out_dir.join("fid_bars.png"));
    assert_png(&out_dir.join("loss_curves.png"));
    let svg = std::fs::read_to_string(out_dir.join("fid_bars.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("cross-entropy") && svg.contains("diffusion"));

    let csv = std::fs::read_to_string(out_dir.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "run_id,run_name,kind,cell,arm,seed,step,metric,value,sample_count,feature_net,settings,position"
    );
    assert_eq!(lines.count(), db.evals_for_experiment(EXP).unwrap().len());
}

#[test]
fn loss_curves_average_generator_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_filled(dir.path());
    let losses = db.metrics_for_experiment(EXP, LOSS_KEY).unwrap();
    let generators: Vec<i64> = db
        .list_runs(Some(EXP))
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == KIND_GENERATOR)
        .map(|r| r.id)
        .collect();
    let curves = loss_curves(&frames::metrics_frame(&losses).unwrap(), &generators).unwrap();
    // One cell with losses (few cells): one curve per (cell, arm).
    let labels: Vec<&str> = curves.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(labels, ["ar / cross-entropy", "ar / diffusion"]);
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
}

#[test]
fn many_cells_give_one_loss_curve_per_arm() {
    let records: Vec<MetricRecord> = (0..4)
        .flat_map(|c| {
            [ARM_CROSS_ENTROPY, ARM_DIFFUSION].map(move |arm| MetricRecord {
                run_id: c * 2 + i64::from(arm == ARM_DIFFUSION),
                cell: format!("cell{c}"),
                arm: Some(arm.to_string()),
                seed: 0,
                key: LOSS_KEY.to_string(),
                step: 5,
                value: c as f64 + if arm == ARM_DIFFUSION { 10.0 } else { 0.0 },
                wall_time: 0.0,
            })
        })
        .collect();
    let ids: Vec<i64> = (0..8).collect();
    let curves = loss_curves(&frames::metrics_frame(&records).unwrap(), &ids).unwrap();
    let labels: Vec<&str> = curves.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(labels, [ARM_CROSS_ENTROPY, ARM_DIFFUSION]);
    assert!(approx(curves[0].points[0].1, 1.5));
    assert!(approx(curves[1].points[0].1, 11.5));
}

#[test]
fn empty_or_unknown_experiment_is_no_results() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("a.sqlite")).unwrap();
    db.upsert_experiment("empty", "empty.toml", "").unwrap();
    for name in ["empty", "nonexistent"] {
        match write_report(&db, name, &dir.path().join("out")) {
            Err(Error::NoResults(n)) => assert_eq!(n, name),
            other => panic!("expected NoResults for {name}, got {other:?}"),
        }
    }
}
