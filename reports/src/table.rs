//! The paper's Table 1 layout (rows = generator / order / attention / predictions per step;
//! columns = cross-entropy vs Diffusion Loss, FID and IS without and with CFG, each with the
//! paired difference and a verdict) as cells of text, and the Markdown report around it.

use std::fmt::Write;

use crate::fmt::{fmt_count, fmt_num, MISSING, NONE};
use crate::rows::{RowInfo, RunInfo};
use crate::stats::{ArmStat, PairStat, Summary, FID, IS, WITHOUT_CFG, WITH_CFG};
use crate::tokenizers::TokenizerTable;
use crate::{ARM_CROSS_ENTROPY, ARM_DIFFUSION};

/// Descriptor columns, before the optional setting column. "parameters" shows each arm's model
/// size, so a reader sees whether a row compares equal sizes.
pub(crate) const DESCRIPTOR_COLUMNS: [&str; 5] = [
    "generator",
    "order",
    "attention",
    "preds/step",
    "parameters (CE / diffusion)",
];
/// Columns of one (guidance, metric) group.
pub(crate) const GROUP_COLUMNS: [&str; 4] =
    [ARM_CROSS_ENTROPY, ARM_DIFFUSION, "Δ (95% CI)", "verdict"];
/// The column groups in table order: (guidance, metric, title).
pub(crate) const GROUPS: [(&str, &str, &str); 4] = [
    (WITHOUT_CFG, FID, "FID"),
    (WITHOUT_CFG, IS, "IS"),
    (WITH_CFG, FID, "FID+CFG"),
    (WITH_CFG, IS, "IS+CFG"),
];

/// The table as text cells: `descriptors` columns, then the four groups of four.
#[derive(Debug, Clone)]
pub(crate) struct Table1 {
    /// Whether the descriptor columns include "setting" (some row has grid keys beyond the
    /// generator's kind and order).
    pub with_setting: bool,
    pub rows: Vec<Vec<String>>,
}

impl Table1 {
    pub fn descriptor_count(&self) -> usize {
        DESCRIPTOR_COLUMNS.len() + usize::from(self.with_setting)
    }

    /// Flat column names (Markdown header, CSV).
    pub fn header(&self) -> Vec<String> {
        let mut h: Vec<String> = DESCRIPTOR_COLUMNS.iter().map(|s| s.to_string()).collect();
        if self.with_setting {
            h.push("setting".into());
        }
        for (_, _, title) in GROUPS {
            h.push(format!("{title} {ARM_CROSS_ENTROPY}"));
            h.push(format!("{title} {ARM_DIFFUSION}"));
            h.push(format!("Δ{title} (95% CI)"));
            h.push("verdict".into());
        }
        h
    }
}

/// "7.2k / 16.5k": the recorded parameter count of each arm's runs in the row ("?" when no run
/// of that arm recorded one, e.g. runs made before it was recorded).
fn parameters(key: &str, infos: &[RunInfo]) -> String {
    [ARM_CROSS_ENTROPY, ARM_DIFFUSION]
        .iter()
        .map(|arm| {
            infos
                .iter()
                .filter(|i| i.row.key == key && i.arm.as_deref() == Some(*arm))
                .find_map(|i| i.param_count)
                .map_or("?".to_string(), fmt_count)
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

pub(crate) fn table1(rows: &[RowInfo], summary: &Summary, infos: &[RunInfo]) -> Table1 {
    let with_setting = rows.iter().any(|r| !r.setting.is_empty());
    let rows = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.generator.clone(),
                r.order.clone(),
                r.attention.clone(),
                r.preds.clone(),
                parameters(&r.key, infos),
            ];
            if with_setting {
                cells.push(if r.setting.is_empty() {
                    NONE.to_string()
                } else {
                    r.setting.clone()
                });
            }
            for (guidance, metric, _) in GROUPS {
                let show_cfg = guidance == WITH_CFG;
                for arm in [ARM_CROSS_ENTROPY, ARM_DIFFUSION] {
                    cells.push(arm_entry(
                        summary.arm(&r.key, guidance, arm, metric),
                        show_cfg,
                    ));
                }
                let pair = summary.pair(&r.key, guidance, metric);
                cells.push(delta_entry(pair));
                cells.push(pair.map_or(NONE.to_string(), |p| p.verdict.clone()));
            }
            cells
        })
        .collect();
    Table1 { with_setting, rows }
}

/// The statistics note under the table (Markdown and HTML).
pub(crate) const HOW_TO_READ: &str = "How to read: each arm entry is mean ± sample std (ddof 1) \
over seeds, n = seeds, taken at each run's last evaluated step. Δ = diffusion − cross-entropy is \
paired seed by seed; the 95% interval in brackets is a paired t interval (t quantile with n − 1 \
degrees of freedom). FID: lower is better; IS: higher is better. The verdict is for Diffusion \
Loss against cross-entropy: \"better\" / \"worse\" when the interval excludes 0 in that \
direction, else \"inconclusive\" (always with fewer than 2 pairs). \"Without CFG\" columns are \
runs sampled at CFG scale 1; \"+CFG\" columns are runs sampled with classifier-free guidance, at \
the scale with the lowest mean FID for that row and arm (shown as cfg), paired by seed. \
\"missing\" = no result for that entry, never 0.";

/// A plot or sample grid the Markdown report links to.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub title: String,
    /// File names relative to the report folder: the image shown, then other formats.
    pub files: Vec<String>,
}

pub(crate) fn markdown(
    experiment: &str,
    table: &Table1,
    notes: &[String],
    tokenizers: Option<&TokenizerTable>,
    plots: &[Link],
    grids: &[Link],
    csv: Option<&str>,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Ablation report: {experiment}\n");
    let _ = writeln!(
        md,
        "Table 1 layout: {ARM_CROSS_ENTROPY} (VQ tokens + softmax head) vs {ARM_DIFFUSION} \
         (continuous tokens + Diffusion Loss), FID and IS without and with classifier-free \
         guidance: mean ± sample std over seeds (n), and the paired difference \
         Δ = {ARM_DIFFUSION} − {ARM_CROSS_ENTROPY} with a 95% paired t interval and a verdict.\n"
    );
    let header = table.header();
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let align: Vec<&str> = (0..header.len())
        .map(|i| {
            let in_group = i.checked_sub(table.descriptor_count());
            match in_group.map(|k| k % 4) {
                None | Some(3) => "---",
                _ => "---:",
            }
        })
        .collect();
    let _ = writeln!(md, "|{}|", align.join("|"));
    for row in &table.rows {
        let cells: Vec<String> = row.iter().map(|c| escape(c)).collect();
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
    if table.rows.is_empty() {
        md.push_str("\n_No generator runs recorded for this experiment yet._\n");
    }
    md.push('\n');
    md.push_str(HOW_TO_READ);
    md.push_str("\n\n");
    for note in notes {
        let _ = writeln!(md, "- {note}");
    }
    if !notes.is_empty() {
        md.push('\n');
    }
    if let Some(t) = tokenizers {
        md.push_str(&crate::tokenizers::markdown(t));
    }
    if !plots.is_empty() {
        md.push_str("## Plots\n\n");
        for p in plots {
            let formats: Vec<String> = p
                .files
                .iter()
                .map(|f| {
                    let ext = f.rsplit('.').next().unwrap_or(f).to_uppercase();
                    format!("[{ext}]({f})")
                })
                .collect();
            let _ = writeln!(
                md,
                "{} ({}):\n\n![{}]({})\n",
                p.title,
                formats.join(", "),
                p.title,
                p.files.first().map_or("", String::as_str)
            );
        }
    }
    if !grids.is_empty() {
        md.push_str("## Sample grids\n\nOne row per class, one PNG per run:\n\n");
        for g in grids {
            let links: Vec<String> = g.files.iter().map(|f| format!("[{f}]({f})")).collect();
            let _ = writeln!(md, "- {}: {}", g.title, links.join(", "));
        }
        md.push('\n');
    }
    if let Some(csv) = csv {
        let _ = writeln!(md, "All eval records in long format: [{csv}]({csv}).");
    }
    md
}

/// "12.34 ± 0.56 (n=2)", "12.34 ± – (n=1, cfg 3)" or "missing".
pub(crate) fn arm_entry(stat: Option<&ArmStat>, show_cfg: bool) -> String {
    match stat {
        None => MISSING.to_string(),
        Some(s) => {
            let std = s.std.map_or(NONE.to_string(), |v| format!("{v:.2}"));
            let cfg = if show_cfg {
                format!(", cfg {}", fmt_num(s.cfg))
            } else {
                String::new()
            };
            format!("{:.2} ± {std} (n={}{cfg})", s.mean, s.n)
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
