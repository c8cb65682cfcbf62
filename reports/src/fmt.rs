//! The report's small formatting pieces, shared by the Markdown and HTML tables, the plots and
//! the drift check: numbers as a spec writes them, parameter counts, the placeholders for a
//! missing result and for "not applicable", and HTML escaping.

/// What a table entry shows when an arm or a whole row has no result (never 0).
pub(crate) const MISSING: &str = "missing";

/// Placeholder for a spread or interval that does not exist (n = 1).
pub(crate) const NONE: &str = "–";

/// A parameter count for a table: "845", "7.2k", "2.93M".
pub(crate) fn fmt_count(n: u64) -> String {
    match n {
        0..=999 => n.to_string(),
        1_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.2}M", n as f64 / 1e6),
    }
}

/// A number as a spec would write it: "2", "1.5".
pub(crate) fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "?".to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// HTML text escaping.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_like_spec_values() {
        assert_eq!(fmt_num(2.0), "2");
        assert_eq!(fmt_num(1.5), "1.5");
        assert_eq!(fmt_num(f64::NAN), "?");
        assert_eq!(fmt_count(845), "845");
        assert_eq!(fmt_count(7_200), "7.2k");
        assert_eq!(fmt_count(2_930_000), "2.93M");
        assert_eq!(
            esc("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
    }
}
