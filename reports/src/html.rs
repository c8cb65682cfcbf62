//! The single-file HTML report: the Table 1 layout with grouped headers, the plots as inline SVG
//! and the sample grids as PNG data URIs, so the one file opens offline in any browser.

use std::fmt::Write;

use crate::fmt::{esc, MISSING};
use crate::plots::Figure;
use crate::table::{Table1, DESCRIPTOR_COLUMNS, GROUPS, GROUP_COLUMNS, HOW_TO_READ};
use crate::tokenizers::TokenizerTable;
use crate::{ARM_CROSS_ENTROPY, ARM_DIFFUSION};

/// One run's sample grid for the HTML report.
#[derive(Debug, Clone)]
pub(crate) struct Grid {
    /// The Table 1 row it belongs to (heading).
    pub row: String,
    /// "diffusion · seed 0 · cfg 1 · run 12".
    pub caption: String,
    /// The PNG bytes; `None` when the file recorded in the database is gone.
    pub png: Option<Vec<u8>>,
    /// Where the database says the grid is.
    pub path: String,
}

const STYLE: &str = "
body { font-family: 'DejaVu Sans', Verdana, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; } h3 { font-size: 15px; }
table { border-collapse: collapse; font-size: 11px; }
.scroll { overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 3px 6px; }
td.num { white-space: nowrap; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { background: #e3f4e1; } td.worse { background: #fbe3e1; }
td.missing { color: #999; }
.ce { color: #1f77b4; } .dl { color: #d96c00; }
p.note { max-width: 1100px; font-size: 13px; color: #444; }
figure { margin: 12px 0; } figcaption { font-size: 12px; color: #555; }
figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
.grids { display: flex; flex-wrap: wrap; gap: 12px; }
.grids img { image-rendering: pixelated; border: 1px solid #ddd; }
";

pub(crate) fn render(
    experiment: &str,
    table: &Table1,
    notes: &[String],
    tokenizers: Option<&TokenizerTable>,
    figures: &[Figure],
    grids: &[Grid],
    csv: Option<&str>,
) -> String {
    let mut h = String::new();
    let title = format!("Ablation report: {experiment}");
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let _ = writeln!(
        h,
        "<p class=\"note\">Table 1 layout: <span class=\"ce\">{ARM_CROSS_ENTROPY}</span> (VQ \
         tokens + softmax head) vs <span class=\"dl\">{ARM_DIFFUSION}</span> (continuous tokens \
         + Diffusion Loss), FID and IS without and with classifier-free guidance.</p>"
    );
    table_html(&mut h, table);
    let _ = writeln!(h, "<p class=\"note\">{}</p>", esc(HOW_TO_READ));
    if !notes.is_empty() {
        h.push_str("<ul>\n");
        for n in notes {
            let _ = writeln!(h, "<li>{}</li>", esc(n));
        }
        h.push_str("</ul>\n");
    }
    if let Some(t) = tokenizers {
        h.push_str(&crate::tokenizers::html(t));
    }
    if !figures.is_empty() {
        h.push_str("<h2>Plots</h2>\n");
        for f in figures {
            let _ = writeln!(
                h,
                "<figure>\n{}\n<figcaption>{}</figcaption>\n</figure>",
                strip_xml_declaration(&f.svg),
                esc(&f.title)
            );
        }
    }
    if !grids.is_empty() {
        h.push_str("<h2>Sample grids</h2>\n<p class=\"note\">One row per class, per run.</p>\n");
        let mut current: Option<&str> = None;
        for g in grids {
            if current != Some(g.row.as_str()) {
                if current.is_some() {
                    h.push_str("</div>\n");
                }
                let _ = writeln!(h, "<h3>{}</h3>\n<div class=\"grids\">", esc(&g.row));
                current = Some(&g.row);
            }
            match &g.png {
                Some(bytes) => {
                    let width = png_width(bytes).map_or(String::new(), |w| {
                        let shown = if w < 240 { w * 2 } else { w };
                        format!(" width=\"{shown}\"")
                    });
                    let _ = writeln!(
                        h,
                        "<figure><img alt=\"samples {}\"{width} src=\"data:image/png;base64,{}\">\
                         <figcaption>{}</figcaption></figure>",
                        esc(&g.caption),
                        base64(bytes),
                        esc(&g.caption)
                    );
                }
                None => {
                    let _ = writeln!(
                        h,
                        "<figure><figcaption>{}: grid file missing ({})</figcaption></figure>",
                        esc(&g.caption),
                        esc(&g.path)
                    );
                }
            }
        }
        if current.is_some() {
            h.push_str("</div>\n");
        }
    }
    if let Some(csv) = csv {
        let _ = writeln!(
            h,
            "<p class=\"note\">All eval records in long format: <a href=\"{}\">{}</a> (beside \
             this file).</p>",
            esc(csv),
            esc(csv)
        );
    }
    h.push_str("</body>\n</html>\n");
    h
}

/// The table with a two-level header: descriptor columns, then one group per (guidance, metric).
fn table_html(h: &mut String, table: &Table1) {
    h.push_str("<div class=\"scroll\">\n<table>\n<thead>\n<tr>");
    let mut descriptors: Vec<&str> = DESCRIPTOR_COLUMNS.to_vec();
    if table.with_setting {
        descriptors.push("setting");
    }
    for d in &descriptors {
        let _ = write!(h, "<th rowspan=\"2\">{}</th>", esc(d));
    }
    for (guidance, _, title) in GROUPS {
        let note = if guidance == crate::stats::WITH_CFG {
            " (best scale)"
        } else {
            " (no CFG)"
        };
        let _ = write!(h, "<th colspan=\"4\">{}{note}</th>", esc(title));
    }
    h.push_str("</tr>\n<tr>");
    for _ in GROUPS {
        for (k, c) in GROUP_COLUMNS.iter().enumerate() {
            let class = match k {
                0 => " class=\"ce\"",
                1 => " class=\"dl\"",
                _ => "",
            };
            let _ = write!(h, "<th{class}>{}</th>", esc(c));
        }
    }
    h.push_str("</tr>\n</thead>\n<tbody>\n");
    let nd = table.descriptor_count();
    for row in &table.rows {
        h.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let class = if i < nd {
                ""
            } else if cell == "better" {
                " class=\"better\""
            } else if cell == "worse" {
                " class=\"worse\""
            } else if cell == MISSING {
                " class=\"num missing\""
            } else {
                " class=\"num\""
            };
            // "(n=3)" on its own line keeps the wide table readable.
            let text = esc(cell).replace(" (n=", "<br>(n=");
            let _ = write!(h, "<td{class}>{text}</td>");
        }
        h.push_str("</tr>\n");
    }
    if table.rows.is_empty() {
        let _ = write!(
            h,
            "<tr><td colspan=\"{}\">No generator runs recorded for this experiment yet.</td></tr>",
            nd + 16
        );
    }
    h.push_str("</tbody>\n</table>\n</div>\n");
}

/// plotters' SVG starts with the `<svg` element already, but be safe about a declaration.
fn strip_xml_declaration(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// The width in the IHDR chunk of a PNG.
fn png_width(bytes: &[u8]) -> Option<u32> {
    let w = bytes.get(16..20)?;
    (bytes.starts_with(b"\x89PNG")).then(|| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

/// Standard base64 with padding (RFC 4648), for data URIs.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input}");
        }
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
