//! `ablate compare RUN_A RUN_B`: which resolved parameters differ, and how the metrics moved.
use std::collections::BTreeMap;

/// Flatten a JSON value to dotted keys (`train.steps` → 800); arrays keep their JSON text.
pub fn flatten(value: &serde_json::Value) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::String(s) => {
                out.insert(prefix.to_string(), s.clone());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// Keys whose values differ (or exist on one side only): (key, a, b), "–" for absent.
pub fn differing(a: &serde_json::Value, b: &serde_json::Value) -> Vec<(String, String, String)> {
    let (fa, fb) = (flatten(a), flatten(b));
    let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let va = fa.get(k).cloned().unwrap_or_else(|| "–".into());
            let vb = fb.get(k).cloned().unwrap_or_else(|| "–".into());
            (va != vb).then(|| (k.clone(), va, vb))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_what_differs() {
        let a = serde_json::json!({"train": {"steps": 800, "lr": 0.001}, "arm": "diffusion", "seeds": [0, 1]});
        let b = serde_json::json!({"train": {"steps": 400, "lr": 0.001}, "arm": "diffusion", "extra": true});
        let d = differing(&a, &b);
        assert_eq!(
            d,
            vec![
                ("extra".to_string(), "–".to_string(), "true".to_string()),
                ("seeds".to_string(), "[0,1]".to_string(), "–".to_string()),
                (
                    "train.steps".to_string(),
                    "800".to_string(),
                    "400".to_string()
                ),
            ]
        );
        assert!(differing(&a, &a).is_empty());
    }
}
