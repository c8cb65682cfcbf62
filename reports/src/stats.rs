//! Aggregation in polars: per-arm mean ± std over seeds for each Table 1 row and guidance
//! setting, the paired difference diffusion − cross-entropy with a 95% paired-t interval and its
//! verdict, the mean training-loss and FID-over-training curves, and the sweep curves.

use polars::prelude::*;

use db::RunKind;

use crate::{ARM_CROSS_ENTROPY, ARM_DIFFUSION};

/// The metrics of the main table, with the favourable direction of each.
pub(crate) const FID: &str = "fid";
pub(crate) const IS: &str = "is";

/// With at most this many rows the loss plot draws one line per (row, arm), else per arm.
const MAX_ROWS_PER_ROW_CURVES: u32 = 3;

/// Guidance column of the table: runs sampled with a CFG scale of 1 …
pub(crate) const WITHOUT_CFG: &str = "without";
/// … and runs sampled with classifier-free guidance (the best scale per row and arm).
pub(crate) const WITH_CFG: &str = "with";

/// mean ± sample std (ddof 1) over seeds of one (row, guidance, arm, metric).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArmStat {
    pub row: String,
    pub guidance: String,
    pub arm: String,
    /// The CFG scale the entry was sampled at (for [`WITH_CFG`]: the one with the lowest mean
    /// FID of this row and arm).
    pub cfg: f64,
    pub metric: String,
    pub mean: f64,
    /// `None` when n = 1.
    pub std: Option<f64>,
    pub n: i64,
}

/// Paired difference diffusion − cross-entropy over the seeds both arms share.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PairStat {
    pub row: String,
    pub guidance: String,
    pub metric: String,
    pub mean: f64,
    /// 95% paired-t interval; `None` when n < 2.
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub n: i64,
    /// "better", "worse" or "inconclusive" (for Diffusion Loss against cross-entropy).
    pub verdict: String,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Summary {
    pub arms: Vec<ArmStat>,
    pub pairs: Vec<PairStat>,
}

impl Summary {
    pub fn arm(&self, row: &str, guidance: &str, arm: &str, metric: &str) -> Option<&ArmStat> {
        self.arms
            .iter()
            .find(|s| s.row == row && s.guidance == guidance && s.arm == arm && s.metric == metric)
    }

    pub fn pair(&self, row: &str, guidance: &str, metric: &str) -> Option<&PairStat> {
        self.pairs
            .iter()
            .find(|p| p.row == row && p.guidance == guidance && p.metric == metric)
    }
}

/// One line of a line plot: mean (and std over runs) of a value at each x.
#[derive(Debug, Clone)]
pub(crate) struct Curve {
    pub label: String,
    pub arm: String,
    /// (x, mean, std over runs — `None` where one run has that x)
    pub points: Vec<(f64, f64, Option<f64>)>,
}

/// Two-sided 95% Student-t quantile t(0.975, df).
pub(crate) fn t975(df: i64) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        d if d < 1 => f64::NAN,
        d if d <= 30 => TABLE[(d - 1) as usize],
        d => {
            // Cornish–Fisher expansion around the normal quantile; < 1e-4 off for df > 30.
            let z: f64 = 1.959_963_984_540_054;
            let n = d as f64;
            z + (z.powi(3) + z) / (4.0 * n)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * n * n)
                + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z)
                    / (384.0 * n.powi(3))
        }
    }
}

/// A lookup frame `df → t` for df = 1..=max_df, joined onto the pair statistics.
fn t_table(max_df: i64) -> PolarsResult<DataFrame> {
    let dfs: Vec<i64> = (1..=max_df.max(1)).collect();
    let ts: Vec<f64> = dfs.iter().map(|&d| t975(d)).collect();
    DataFrame::new(
        dfs.len(),
        vec![Column::new("df".into(), dfs), Column::new("t".into(), ts)],
    )
}

/// The last evaluated step of every generator run's FID and IS, with the run's row, guidance
/// and CFG scale (`runs`: see [`crate::frames::runs_frame`]).
fn last_evals(evals: &DataFrame, runs: &DataFrame) -> PolarsResult<LazyFrame> {
    let table_metric = col("metric").eq(lit(FID)).or(col("metric").eq(lit(IS)));
    Ok(evals
        .clone()
        .lazy()
        .filter(
            col("kind")
                .eq(lit(RunKind::Generator.as_str()))
                .and(col("arm").is_not_null())
                .and(table_metric),
        )
        .filter(col("step").eq(col("step").max().over([col("run_id")])?))
        .join(
            runs.clone()
                .lazy()
                .select([col("run_id"), col("row"), col("guidance"), col("cfg")]),
            [col("run_id")],
            [col("run_id")],
            JoinArgs::new(JoinType::Inner),
        ))
}

/// The table's input: one value per (row, guidance, arm, seed, metric), taken from each run's
/// evals at its highest evaluated step; when a (row, CFG scale, arm, seed) has several runs, the
/// latest run (highest id) wins. With CFG, each (row, arm) keeps the scale with the lowest mean
/// FID over seeds (the paper reports each model at its best guidance scale).
fn per_seed(evals: &DataFrame, runs: &DataFrame) -> PolarsResult<LazyFrame> {
    let all = last_evals(evals, runs)?
        .group_by([
            col("row"),
            col("guidance"),
            col("cfg"),
            col("arm"),
            col("seed"),
            col("metric"),
        ])
        .agg([col("value")
            .sort_by([col("run_id")], SortMultipleOptions::default())
            .last()
            .alias("value")]);
    let keys = || [col("row"), col("guidance"), col("arm")];
    let best_scale = all
        .clone()
        .group_by([col("row"), col("guidance"), col("arm"), col("cfg")])
        .agg([col("value")
            .filter(col("metric").eq(lit(FID)))
            .mean()
            .alias("score")])
        .group_by(keys())
        .agg([col("cfg")
            .sort_by(
                [col("score"), col("cfg")],
                SortMultipleOptions::default().with_nulls_last(true),
            )
            .first()
            .alias("cfg")]);
    let mut on = keys().to_vec();
    on.push(col("cfg"));
    Ok(all.join(best_scale, on.clone(), on, JoinArgs::new(JoinType::Inner)))
}

/// Per (row, guidance, arm, metric): mean, std (ddof 1), n and the CFG scale.
fn arm_stats(per_seed: LazyFrame) -> PolarsResult<DataFrame> {
    per_seed
        .group_by([col("row"), col("guidance"), col("arm"), col("metric")])
        .agg([
            col("value").mean().alias("mean"),
            col("value").std(1).alias("std"),
            col("value").len().cast(DataType::Int64).alias("n"),
            col("cfg").first().alias("cfg"),
        ])
        .sort(
            ["row", "guidance", "arm", "metric"],
            SortMultipleOptions::default(),
        )
        .collect()
}

/// Per (row, guidance, metric): paired difference diffusion − cross-entropy (arms joined on
/// row, guidance and seed), its mean, 95% paired-t interval and verdict.
fn pair_stats(per_seed: LazyFrame, max_df: i64) -> PolarsResult<DataFrame> {
    let side = |arm: &str, name: &str| {
        per_seed
            .clone()
            .filter(col("arm").eq(lit(arm.to_string())))
            .select([
                col("row"),
                col("guidance"),
                col("seed"),
                col("metric"),
                col("value").alias(name),
            ])
    };
    let keys = [col("row"), col("guidance"), col("seed"), col("metric")];
    let lower_is_better = col("metric").eq(lit(FID));
    let favourable = when(lower_is_better.clone())
        .then(col("hi").lt(lit(0.0)))
        .otherwise(col("lo").gt(lit(0.0)));
    let unfavourable = when(lower_is_better)
        .then(col("lo").gt(lit(0.0)))
        .otherwise(col("hi").lt(lit(0.0)));
    side(ARM_DIFFUSION, "diffusion")
        .join(
            side(ARM_CROSS_ENTROPY, "cross_entropy"),
            keys.clone(),
            keys,
            JoinArgs::new(JoinType::Inner),
        )
        .with_column((col("diffusion") - col("cross_entropy")).alias("delta"))
        .group_by([col("row"), col("guidance"), col("metric")])
        .agg([
            col("delta").mean().alias("mean"),
            col("delta").std(1).alias("std"),
            col("delta").len().cast(DataType::Int64).alias("n"),
        ])
        .with_column((col("n") - lit(1i64)).alias("df"))
        .join(
            t_table(max_df)?.lazy(),
            [col("df")],
            [col("df")],
            JoinArgs::new(JoinType::Left),
        )
        .with_column(
            (col("t") * col("std") / col("n").cast(DataType::Float64).sqrt()).alias("half"),
        )
        .with_columns([
            (col("mean") - col("half")).alias("lo"),
            (col("mean") + col("half")).alias("hi"),
        ])
        .with_column(
            when(col("n").lt(lit(2i64)).or(col("half").is_null()))
                .then(lit("inconclusive"))
                .when(favourable)
                .then(lit("better"))
                .when(unfavourable)
                .then(lit("worse"))
                .otherwise(lit("inconclusive"))
                .alias("verdict"),
        )
        .sort(
            ["row", "guidance", "metric"],
            SortMultipleOptions::default(),
        )
        .collect()
}

/// The table's numbers: `evals` in long format (see [`crate::frames::evals_frame`]) and the
/// generator runs' descriptors (see [`crate::frames::runs_frame`]).
pub(crate) fn summarize(evals: &DataFrame, runs: &DataFrame) -> PolarsResult<Summary> {
    let seeds = per_seed(evals, runs)?;
    let arms_df = arm_stats(seeds.clone())?;
    let max_df = evals.height() as i64;
    let pairs_df = pair_stats(seeds, max_df)?;

    let arms = {
        let row = strs(&arms_df, "row")?;
        let guidance = strs(&arms_df, "guidance")?;
        let arm = strs(&arms_df, "arm")?;
        let metric = strs(&arms_df, "metric")?;
        let mean = f64s(&arms_df, "mean")?;
        let std = f64s(&arms_df, "std")?;
        let n = i64s(&arms_df, "n")?;
        let cfg = f64s(&arms_df, "cfg")?;
        (0..arms_df.height())
            .filter_map(|i| {
                Some(ArmStat {
                    row: row[i].clone()?,
                    guidance: guidance[i].clone()?,
                    arm: arm[i].clone()?,
                    cfg: cfg[i]?,
                    metric: metric[i].clone()?,
                    mean: mean[i]?,
                    std: std[i],
                    n: n[i]?,
                })
            })
            .collect()
    };
    let pairs = {
        let row = strs(&pairs_df, "row")?;
        let guidance = strs(&pairs_df, "guidance")?;
        let metric = strs(&pairs_df, "metric")?;
        let mean = f64s(&pairs_df, "mean")?;
        let lo = f64s(&pairs_df, "lo")?;
        let hi = f64s(&pairs_df, "hi")?;
        let n = i64s(&pairs_df, "n")?;
        let verdict = strs(&pairs_df, "verdict")?;
        (0..pairs_df.height())
            .filter_map(|i| {
                let n = n[i]?;
                Some(PairStat {
                    row: row[i].clone()?,
                    guidance: guidance[i].clone()?,
                    metric: metric[i].clone()?,
                    mean: mean[i]?,
                    lo: lo[i].filter(|_| n >= 2),
                    hi: hi[i].filter(|_| n >= 2),
                    n,
                    verdict: verdict[i].clone()?,
                })
            })
            .collect()
    };
    Ok(Summary { arms, pairs })
}

/// Mean (± std over runs) of a metric history per step, for the generator runs in `runs` only:
/// one curve per (row, arm) when there are few rows, else one per arm.
pub(crate) fn loss_curves(losses: &DataFrame, runs: &DataFrame) -> PolarsResult<Vec<Curve>> {
    let lf = losses
        .clone()
        .lazy()
        .join(
            runs.clone()
                .lazy()
                .select([col("run_id"), col("row_label").alias("label")]),
            [col("run_id")],
            [col("run_id")],
            JoinArgs::new(JoinType::Inner),
        )
        .filter(col("arm").is_not_null());
    let n_rows = lf
        .clone()
        .select([col("label").n_unique().cast(DataType::UInt32).alias("n")])
        .collect()?;
    let n_rows = n_rows.column("n")?.u32()?.get(0).unwrap_or(0);
    let keys = if n_rows <= MAX_ROWS_PER_ROW_CURVES {
        vec![col("label"), col("arm")]
    } else {
        vec![col("arm")]
    };
    mean_curves(lf, keys, "step")
}

/// FID over training steps, mean over seeds per (row, CFG scale, arm), for the series with
/// evaluations at two or more steps (empty when every run was evaluated once).
pub(crate) fn fid_over_training(evals: &DataFrame, runs: &DataFrame) -> PolarsResult<Vec<Curve>> {
    let lf = evals
        .clone()
        .lazy()
        .filter(
            col("kind")
                .eq(lit(RunKind::Generator.as_str()))
                .and(col("arm").is_not_null())
                .and(col("metric").eq(lit(FID))),
        )
        .join(
            runs.clone()
                .lazy()
                .select([col("run_id"), col("curve_label").alias("label")]),
            [col("run_id")],
            [col("run_id")],
            JoinArgs::new(JoinType::Inner),
        );
    let most_steps = lf
        .clone()
        .group_by([col("run_id")])
        .agg([col("step").n_unique().cast(DataType::UInt32).alias("n")])
        .select([col("n").max()])
        .collect()?;
    if most_steps.column("n")?.u32()?.get(0).unwrap_or(0) < 2 {
        return Ok(Vec::new());
    }
    let mut curves = mean_curves(lf, vec![col("label"), col("arm")], "step")?;
    curves.retain(|c| c.points.len() >= 2);
    Ok(curves)
}

/// One sweep plot's data: FID and IS curves over the swept setting.
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    pub fid: Vec<Curve>,
    pub is: Vec<Curve>,
}

/// FID and IS over a swept sampling setting: `axis` holds (run_id, label, x) for the generator
/// runs that have a value of the setting; each curve is one (group, arm), mean ± std over seeds at each x.
pub(crate) fn sweep(evals: &DataFrame, runs: &DataFrame, axis: &DataFrame) -> PolarsResult<Sweep> {
    let lf = last_evals(evals, runs)?.join(
        axis.clone().lazy(),
        [col("run_id")],
        [col("run_id")],
        JoinArgs::new(JoinType::Inner),
    );
    let curves = |metric: &str| {
        mean_curves(
            lf.clone().filter(col("metric").eq(lit(metric.to_string()))),
            vec![col("label"), col("arm")],
            "x",
        )
    };
    Ok(Sweep {
        fid: curves(FID)?,
        is: curves(IS)?,
    })
}

/// Groups `lf` (columns: the key columns, `x_col`, `value`) by keys + x and returns one curve
/// per key, points sorted by x. Keys are `label` and/or `arm`.
fn mean_curves(lf: LazyFrame, keys: Vec<Expr>, x_col: &str) -> PolarsResult<Vec<Curve>> {
    let with_label = keys.len() > 1;
    let mut by = keys;
    by.push(col(x_col).alias("x"));
    let sort_by: Vec<&str> = if with_label {
        vec!["label", "arm", "x"]
    } else {
        vec!["arm", "x"]
    };
    let df = lf
        .group_by(by)
        .agg([
            col("value").mean().alias("mean"),
            col("value").std(1).alias("std"),
        ])
        .with_column(col("x").cast(DataType::Float64))
        .sort(sort_by, SortMultipleOptions::default())
        .collect()?;

    let label = if with_label {
        strs(&df, "label")?
    } else {
        vec![None; df.height()]
    };
    let arm = strs(&df, "arm")?;
    let x = f64s(&df, "x")?;
    let mean = f64s(&df, "mean")?;
    let std = f64s(&df, "std")?;
    let mut curves: Vec<Curve> = Vec::new();
    for i in 0..df.height() {
        let (Some(a), Some(x), Some(m)) = (arm[i].clone(), x[i], mean[i]) else {
            continue;
        };
        let name = match &label[i] {
            Some(l) => format!("{l} / {a}"),
            None => a.clone(),
        };
        let std = std[i].filter(|s| s.is_finite());
        match curves.last_mut() {
            Some(curve) if curve.label == name => curve.points.push((x, m, std)),
            _ => curves.push(Curve {
                label: name,
                arm: a,
                points: vec![(x, m, std)],
            }),
        }
    }
    Ok(curves)
}

fn strs(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<String>>> {
    Ok(df
        .column(name)?
        .str()?
        .iter()
        .map(|v| v.map(str::to_string))
        .collect())
}

fn f64s(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<f64>>> {
    Ok(df.column(name)?.f64()?.iter().collect())
}

fn i64s(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<i64>>> {
    Ok(df.column(name)?.i64()?.iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_tables() {
        assert_eq!(t975(1), 12.706);
        assert_eq!(t975(2), 4.303);
        assert_eq!(t975(30), 2.042);
        assert!((t975(40) - 2.021).abs() < 1e-3, "{}", t975(40));
        assert!((t975(120) - 1.980).abs() < 1e-3, "{}", t975(120));
        assert!((t975(100_000) - 1.960).abs() < 1e-3);
        assert!(t975(0).is_nan());
    }
}
