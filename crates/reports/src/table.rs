//! The Markdown report: the paper-style table (rows = cells, columns = arms × FID/IS with the
//! paired difference and a verdict), a how-to-read line and links to the plots.

use std::fmt::Write;

use crate::stats::{ArmStat, PairStat, Summary, FID, IS};
use crate::{ARM_CROSS_ENTROPY, ARM_DIFFUSION};

/// What a table entry shows when an arm or a whole cell has no result (never 0).
pub(crate) const MISSING: &str = "missing";
/// Placeholder for a spread or interval that does not exist (n = 1).
pub(crate) const NONE: &str = "–";

pub(crate) fn render(
    experiment: &str,
    cells: &[String],
    summary: &Summary,
    has_loss: bool,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Ablation report: {experiment}\n");
    let _ = writeln!(
        md,
        "Table: FID and IS per cell, {ARM_CROSS_ENTROPY} (VQ tokens + softmax head) vs \
         {ARM_DIFFUSION} (continuous tokens + Diffusion Loss): mean ± sample std over seeds, and \
         the paired difference Δ = {ARM_DIFFUSION} − {ARM_CROSS_ENTROPY} over shared seeds with \
         a 95% paired t interval.\n"
    );
    md.push_str(
        "| cell | FID cross-entropy | FID diffusion | ΔFID (95% CI) | verdict \
         | IS cross-entropy | IS diffusion | ΔIS (95% CI) | verdict |\n",
    );
    md.push_str("|---|---:|---:|---:|---|---:|---:|---:|---|\n");
    for cell in cells {
        let mut row = vec![escape(cell)];
        for metric in [FID, IS] {
            row.push(arm_entry(summary.arm(cell, ARM_CROSS_ENTROPY, metric)));
            row.push(arm_entry(summary.arm(cell, ARM_DIFFUSION, metric)));
            let pair = summary.pair(cell, metric);
            row.push(delta_entry(pair));
            row.push(pair.map_or(NONE.to_string(), |p| p.verdict.clone()));
        }
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    md.push('\n');
    md.push_str(
        "How to read: each arm entry is mean ± sample std (ddof 1) over seeds, n = seeds, taken \
         at each run's last evaluated step; Δ pairs the two arms seed by seed (paired t, 95% \
         interval in brackets); FID: lower is better, IS: higher is better; the verdict is for \
         diffusion against cross-entropy: \"better\" / \"worse\" when the interval excludes 0 in \
         that direction, else \"inconclusive\" (always with fewer than 2 pairs); \"missing\" = no \
         result for that arm.\n\n",
    );
    md.push_str("## Plots\n\n");
    md.push_str(
        "FID per cell, mean ± std over seeds ([PNG](fid_bars.png), [SVG](fid_bars.svg)):\n\n\
         ![FID per cell](fid_bars.png)\n\n",
    );
    if has_loss {
        md.push_str(
            "Training loss (`train/loss`), mean over runs per arm, band = ± std \
             ([PNG](loss_curves.png)):\n\n![Training loss](loss_curves.png)\n\n",
        );
    } else {
        md.push_str("Training loss: no `train/loss` was recorded for this experiment.\n\n");
    }
    md.push_str("All eval records in long format: [metrics.csv](metrics.csv).\n");
    md
}

/// "12.34 ± 0.56 (n=2)", "12.34 ± – (n=1)" or "missing".
pub(crate) fn arm_entry(stat: Option<&ArmStat>) -> String {
    match stat {
        None => MISSING.to_string(),
        Some(s) => {
            let std = s.std.map_or(NONE.to_string(), |v| format!("{v:.2}"));
            format!("{:.2} ± {std} (n={})", s.mean, s.n)
        }
    }
}

/// "-2.83 [-3.55, -2.12] (n=3)", "+1.00 [–] (n=1)" or "missing".
pub(crate) fn delta_entry(pair: Option<&PairStat>) -> String {
    match pair {
        None => MISSING.to_string(),
        Some(p) => match (p.lo, p.hi) {
            (Some(lo), Some(hi)) => format!("{:+.2} [{lo:+.2}, {hi:+.2}] (n={})", p.mean, p.n),
            _ => format!("{:+.2} [{NONE}] (n={})", p.mean, p.n),
        },
    }
}

fn escape(cell: &str) -> String {
    cell.replace('|', "\\|")
}
