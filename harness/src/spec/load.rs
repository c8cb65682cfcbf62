//! Loading a spec: read, parse (errors located at file:line:column with the key), apply `--set`
//! overrides, validate, and expand the grid into cells.
use std::path::Path;

use super::validate::validate;
use super::*;

/// 1-based line and column of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

/// The dotted key defined on the line holding `offset`, with its table header.
fn key_at(source: &str, offset: usize) -> String {
    let mut table = String::new();
    let mut pos = 0;
    for line in source.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
        if offset < pos + line.len() {
            if let Some(eq) = t.find('=') {
                let k = t[..eq].trim().trim_matches('"');
                return if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                };
            }
            return table;
        }
        pos += line.len();
    }
    table
}

/// Where a dotted key (e.g. "train.base_lr") is written in the source: (line, column).
pub fn locate(source: &str, key: &str) -> Option<(usize, usize)> {
    let mut table = String::new();
    let mut table_line = None;
    for (i, line) in source.lines().enumerate() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if t.starts_with('[') {
            table = t
                .trim_matches(|c| c == '[' || c == ']' || c == ' ')
                .to_string();
            if table == key {
                table_line = Some((i + 1, indent + 1));
            }
            continue;
        }
        if let Some(eq) = t.find('=') {
            let k = t[..eq].trim().trim_matches('"');
            let full = if table.is_empty() {
                k.to_string()
            } else {
                format!("{table}.{k}")
            };
            if full == key {
                return Some((i + 1, indent + 1));
            }
        }
    }
    table_line.or_else(|| {
        // fall back to the enclosing table
        let parent = key.rsplit_once('.')?.0;
        if parent == key {
            None
        } else {
            locate(source, parent)
        }
    })
}

/// Split a dotted key into its parts; a quoted part may hold dots: `grid."train.steps"`.
fn split_key(key: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in key.chars() {
        match ch {
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

/// Set a dotted key in a TOML table, creating tables on the way.
fn set_dotted(root: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let parts = split_key(key);
    let mut table = root;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("'{part}' is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].clone(), value);
    Ok(())
}

fn get_dotted<'a>(root: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let parts = split_key(key);
    let mut v = root.get(&parts[0])?;
    for p in &parts[1..] {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Parse the right-hand side of `--set key=value` as TOML, or as a bare string.
pub fn parse_override(s: &str) -> Result<(String, toml::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("--set {s}: expected KEY=VALUE"))?;
    let k = k.trim().to_string();
    let v = v.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k, value))
}

fn fmt_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Read, parse, override, validate and expand a spec file.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedSpec, SpecError> {
    let source = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.display().to_string(),
        source: e,
    })?;
    load_str(&path.display().to_string(), &source, overrides).map(|mut l| {
        l.path = path.to_path_buf();
        l
    })
}

/// The offset of the `[` of an array value that is still open at `offset` (brackets counted
/// outside strings and comments, from the start of the file), if there is one.
pub(super) fn unclosed_array_before(source: &str, offset: usize) -> Option<usize> {
    let mut open: Vec<usize> = Vec::new();
    let (mut in_string, mut in_comment, mut after_equals) = (None::<char>, false, false);
    let mut chars = source
        .char_indices()
        .take_while(|&(i, _)| i < offset)
        .peekable();
    while let Some((i, c)) = chars.next() {
        match (in_string, in_comment, c) {
            (_, true, '\n') => in_comment = false,
            (_, true, _) => {}
            (Some('"'), _, '\\') => {
                chars.next();
            }
            (Some(q), _, c) if c == q => in_string = None,
            (Some(_), _, _) => {}
            (None, _, '"' | '\'') => in_string = Some(c),
            (None, _, '#') => in_comment = true,
            (None, _, '=') => after_equals = true,
            (None, _, '\n') if open.is_empty() => after_equals = false,
            // a `[` opens an array inside a value; at the start of a line it is a table header
            (None, _, '[') if after_equals || !open.is_empty() => open.push(i),
            (None, _, ']') if !open.is_empty() => {
                open.pop();
            }
            _ => {}
        }
    }
    open.first().copied()
}

pub fn load_str(name: &str, source: &str, overrides: &[String]) -> Result<LoadedSpec, SpecError> {
    let at = |offset: usize, message: String| {
        let (line, column) = line_col(source, offset);
        let key = key_at(source, offset);
        SpecError::Invalid {
            path: name.to_string(),
            line,
            column,
            key: if key.is_empty() {
                String::new()
            } else {
                format!("{key}: ")
            },
            message,
        }
    };
    // 1. the file as written, with spans for every error. An array left open (`seeds = [0`) is
    // only noticed where the next key or table starts: point at the array's opening instead.
    let syntax = |e: toml::de::Error| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let about_arrays = ["comma", "`]`", "unclosed"]
            .iter()
            .any(|w| e.message().contains(w));
        let open = unclosed_array_before(source, offset)
            .filter(|&open| about_arrays && line_col(source, open).0 < line_col(source, offset).0);
        match open {
            Some(open) => at(
                open,
                format!(
                    "this array is not closed: expected `,` or `]` before line {} ({})",
                    line_col(source, offset).0,
                    e.message().trim()
                ),
            ),
            None => at(offset, e.message().to_string()),
        }
    };
    // typed once as written, so that a wrong type is located in the file
    toml::from_str::<Spec>(source).map_err(syntax)?;
    let mut table: toml::Table = toml::from_str(source).map_err(syntax)?;
    // 2. command-line overrides
    for o in overrides {
        let (k, v) = parse_override(o).map_err(|m| SpecError::Override {
            origin: "--set".into(),
            key: o.clone(),
            message: m,
        })?;
        set_dotted(&mut table, &k, v).map_err(|m| SpecError::Override {
            origin: "--set".into(),
            key: k.clone(),
            message: m,
        })?;
        toml::Value::Table(table.clone())
            .try_into::<Spec>()
            .map_err(|e| SpecError::Override {
                origin: "--set".into(),
                key: k.clone(),
                message: e.message().to_string(),
            })?;
    }
    let resolved: Spec = toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| at(0, e.message().to_string()))?;
    let invalid = |key: &str, message: String| {
        let (line, column) = locate(source, key).unwrap_or((1, 1));
        SpecError::Invalid {
            path: name.to_string(),
            line,
            column,
            key: format!("{key}: "),
            message,
        }
    };
    // 3. the grid
    let mut cells: Vec<(String, toml::Table)> = vec![(String::new(), table.clone())];
    for (key, values) in &resolved.grid {
        let gkey = format!("grid.{key}");
        if values.is_empty() {
            return Err(invalid(
                &gkey,
                "a grid axis needs at least one value".into(),
            ));
        }
        let mut next = Vec::new();
        for (label, t) in &cells {
            for v in values {
                let mut t = t.clone();
                t.remove("grid");
                set_dotted(&mut t, key, v.clone()).map_err(|m| invalid(&gkey, m))?;
                let l = if label.is_empty() {
                    format!("{key}={}", fmt_value(v))
                } else {
                    format!("{label} · {key}={}", fmt_value(v))
                };
                next.push((l, t));
            }
        }
        cells = next;
    }
    let mut out = Vec::new();
    for (label, mut t) in cells {
        if resolved.exclude.iter().any(|ex| {
            !ex.is_empty()
                && ex
                    .iter()
                    .all(|(k, v)| get_dotted(&t, k).map(|x| x == v).unwrap_or(false))
        }) {
            continue;
        }
        t.remove("grid");
        let spec: Spec = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| {
                invalid(
                    &format!(
                        "grid.{}",
                        label
                            .split(" · ")
                            .last()
                            .and_then(|s| s.split('=').next())
                            .unwrap_or("")
                    ),
                    format!("in cell '{label}': {}", e.message()),
                )
            })?;
        let mut spec = spec;
        if spec.data.source == DataSource::Synthetic && spec.data.classes.is_none() {
            spec.data.classes = Some(10);
        }
        validate(&spec, &invalid)?;
        out.push(Cell {
            label: if label.is_empty() {
                "base".into()
            } else {
                label
            },
            spec,
        });
    }
    if out.is_empty() {
        return Err(invalid("exclude", "every grid cell is excluded".into()));
    }
    Ok(LoadedSpec {
        path: PathBuf::from(name),
        source: source.to_string(),
        // as the overrides left it (`--set name=…` names the experiment), grid included
        base: resolved,
        cells: out,
    })
}
