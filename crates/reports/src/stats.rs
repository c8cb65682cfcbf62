//! Aggregation in polars: per-arm mean ± std over seeds, the paired difference
//! diffusion − cross-entropy with a 95% paired-t interval and its verdict, and the mean training
//! loss curves.

use polars::prelude::*;

use crate::{ARM_CROSS_ENTROPY, ARM_DIFFUSION, KIND_GENERATOR};

/// The metrics of the main table, with the favourable direction of each.
pub(crate) const FID: &str = "fid";
pub(crate) const IS: &str = "is";

/// With at most this many cells the loss plot draws one line per (cell, arm), else per arm.
const MAX_CELLS_PER_CELL_CURVES: u32 = 3;

/// mean ± sample std (ddof 1) over seeds of one (cell, arm, metric).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArmStat {
    pub cell: String,
    pub arm: String,
    pub metric: String,
    pub mean: f64,
    /// `None` when n = 1.
    pub std: Option<f64>,
    pub n: i64,
}

/// Paired difference diffusion − cross-entropy over the seeds both arms share.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PairStat {
    pub cell: String,
    pub metric: String,
    pub mean: f64,
    /// 95% paired-t interval; `None` when n < 2.
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub n: i64,
    /// "better", "worse" or "inconclusive" (for Diffusion Loss against cross-entropy).
    pub verdict: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Summary {
    /// Cells that have generator evals, smallest `position` first.
    pub cells: Vec<String>,
    pub arms: Vec<ArmStat>,
    pub pairs: Vec<PairStat>,
}

impl Summary {
    pub fn arm(&self, cell: &str, arm: &str, metric: &str) -> Option<&ArmStat> {
        self.arms
            .iter()
            .find(|s| s.cell == cell && s.arm == arm && s.metric == metric)
    }

    pub fn pair(&self, cell: &str, metric: &str) -> Option<&PairStat> {
        self.pairs
            .iter()
            .find(|p| p.cell == cell && p.metric == metric)
    }
}

/// One line of the loss plot: mean (and std over runs) of the loss at each step.
#[derive(Debug, Clone)]
pub(crate) struct Curve {
    pub label: String,
    pub arm: String,
    /// (step, mean, std over runs — `None` where one run logged that step)
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

/// The table's input: one value per (cell, arm, seed, metric) of generator runs, taken from each
/// run's evals at its highest evaluated step; when a (cell, arm, seed) has several runs, the
/// latest run (highest id) wins.
fn per_seed(evals: &DataFrame) -> PolarsResult<LazyFrame> {
    let table_metric = col("metric").eq(lit(FID)).or(col("metric").eq(lit(IS)));
    Ok(evals
        .clone()
        .lazy()
        .filter(
            col("kind")
                .eq(lit(KIND_GENERATOR))
                .and(col("arm").is_not_null())
                .and(table_metric),
        )
        .filter(col("step").eq(col("step").max().over([col("run_id")])?))
        .group_by([col("cell"), col("arm"), col("seed"), col("metric")])
        .agg([col("value")
            .sort_by([col("run_id")], SortMultipleOptions::default())
            .last()
            .alias("value")]))
}

/// Per (cell, arm, metric): mean, std (ddof 1), n.
fn arm_stats(per_seed: LazyFrame) -> PolarsResult<DataFrame> {
    per_seed
        .group_by([col("cell"), col("arm"), col("metric")])
        .agg([
            col("value").mean().alias("mean"),
            col("value").std(1).alias("std"),
            col("value").len().cast(DataType::Int64).alias("n"),
        ])
        .sort(["cell", "arm", "metric"], SortMultipleOptions::default())
        .collect()
}

/// Per (cell, metric): paired difference diffusion − cross-entropy (arms joined on cell + seed),
/// its mean, 95% paired-t interval and verdict.
fn pair_stats(per_seed: LazyFrame, max_df: i64) -> PolarsResult<DataFrame> {
    let side = |arm: &str, name: &str| {
        per_seed
            .clone()
            .filter(col("arm").eq(lit(arm.to_string())))
            .select([
                col("cell"),
                col("seed"),
                col("metric"),
                col("value").alias(name),
            ])
    };
    let keys = [col("cell"), col("seed"), col("metric")];
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
        .group_by([col("cell"), col("metric")])
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
        .sort(["cell", "metric"], SortMultipleOptions::default())
        .collect()
}

/// Cells of generator evals in row order: smallest `position` first (ties by name).
fn cell_order(evals: &DataFrame) -> PolarsResult<Vec<String>> {
    let df = evals
        .clone()
        .lazy()
        .filter(col("kind").eq(lit(KIND_GENERATOR)))
        .group_by([col("cell")])
        .agg([col("position").min().alias("position")])
        .sort(["position", "cell"], SortMultipleOptions::default())
        .collect()?;
    Ok(strs(&df, "cell")?
        .into_iter()
        .map(|s| s.unwrap_or_default())
        .collect())
}

pub(crate) fn summarize(evals: &DataFrame) -> PolarsResult<Summary> {
    let cells = cell_order(evals)?;
    let seeds = per_seed(evals)?;
    let arms_df = arm_stats(seeds.clone())?;
    let max_df = evals.height() as i64;
    let pairs_df = pair_stats(seeds, max_df)?;

    let arms = {
        let cell = strs(&arms_df, "cell")?;
        let arm = strs(&arms_df, "arm")?;
        let metric = strs(&arms_df, "metric")?;
        let mean = f64s(&arms_df, "mean")?;
        let std = f64s(&arms_df, "std")?;
        let n = i64s(&arms_df, "n")?;
        (0..arms_df.height())
            .filter_map(|i| {
                Some(ArmStat {
                    cell: cell[i].clone()?,
                    arm: arm[i].clone()?,
                    metric: metric[i].clone()?,
                    mean: mean[i]?,
                    std: std[i],
                    n: n[i]?,
                })
            })
            .collect()
    };
    let pairs = {
        let cell = strs(&pairs_df, "cell")?;
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
                    cell: cell[i].clone()?,
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
    Ok(Summary { cells, arms, pairs })
}

/// Mean (± std over runs) of the training loss per step, for generator runs only: one curve per
/// (cell, arm) when there are few cells, else one per arm.
pub(crate) fn loss_curves(losses: &DataFrame, generator_runs: &[i64]) -> PolarsResult<Vec<Curve>> {
    let runs = DataFrame::new(
        generator_runs.len(),
        vec![Column::new("run_id".into(), generator_runs.to_vec())],
    )?;
    let lf = losses
        .clone()
        .lazy()
        .join(
            runs.lazy(),
            [col("run_id")],
            [col("run_id")],
            JoinArgs::new(JoinType::Inner),
        )
        .filter(col("arm").is_not_null());
    let n_cells = lf
        .clone()
        .select([col("cell").n_unique().cast(DataType::UInt32).alias("n")])
        .collect()?;
    let n_cells = n_cells.column("n")?.u32()?.get(0).unwrap_or(0);
    let per_cell = n_cells <= MAX_CELLS_PER_CELL_CURVES;
    let keys: Vec<Expr> = if per_cell {
        vec![col("cell"), col("arm")]
    } else {
        vec![col("arm")]
    };
    let mut by = keys.clone();
    by.push(col("step"));
    let df = lf
        .group_by(by.clone())
        .agg([
            col("value").mean().alias("mean"),
            col("value").std(1).alias("std"),
        ])
        .sort_by_exprs(by, SortMultipleOptions::default())
        .collect()?;

    let cell = if per_cell {
        strs(&df, "cell")?
    } else {
        vec![None; df.height()]
    };
    let arm = strs(&df, "arm")?;
    let step = i64s(&df, "step")?;
    let mean = f64s(&df, "mean")?;
    let std = f64s(&df, "std")?;
    let mut curves: Vec<Curve> = Vec::new();
    for i in 0..df.height() {
        let (Some(a), Some(s), Some(m)) = (arm[i].clone(), step[i], mean[i]) else {
            continue;
        };
        let label = match &cell[i] {
            Some(c) => format!("{c} / {a}"),
            None => a.clone(),
        };
        match curves.last_mut() {
            Some(curve) if curve.label == label => curve.points.push((s as f64, m, std[i])),
            _ => curves.push(Curve {
                label,
                arm: a,
                points: vec![(s as f64, m, std[i])],
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
