//! JSON as Python's `json` module writes it, for the files other tools write with it (`config.json` as
//! compressed-tensors and mlx-lm save it, `model.safetensors.index.json` as transformers saves it), so that
//! sling's copies are byte-identical: `ensure_ascii` escapes, `repr` floats (`1e-06`, `1e+16`, `0.0001`),
//! `indent` spacing, and the key order the writer uses.

/// Which object keys [`dumps`] sorts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKeys {
    /// `sort_keys=True` (compressed-tensors, transformers' index).
    All,
    /// Only the top level's, nested objects in insertion order (mlx-lm's `save_config` sorts the dict, then
    /// `json.dump`s it without `sort_keys`).
    Top,
    /// Insertion order everywhere.
    None,
}

/// Python's `json.dumps(v, indent=INDENT, sort_keys=…)` with its defaults otherwise (`ensure_ascii=True`,
/// separators `", "`/`": "` as indent makes them, floats as `repr`). No trailing newline.
pub fn dumps(v: &serde_json::Value, indent: usize, sort: SortKeys) -> String {
    let mut out = String::new();
    py_json(&mut out, v, 0, indent, sort);
    out
}

fn py_json(out: &mut String, v: &serde_json::Value, level: usize, width: usize, sort: SortKeys) {
    use serde_json::Value;
    let indent = |out: &mut String, level: usize| {
        out.push('\n');
        for _ in 0..level * width {
            out.push(' ');
        }
    };
    let nested = if sort == SortKeys::All { SortKeys::All } else { SortKeys::None };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_f64() {
                out.push_str(&py_float_repr(n.as_f64().unwrap_or(f64::NAN)));
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => py_str(out, s),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                py_json(out, x, level + 1, width, nested);
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            if sort != SortKeys::None {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                py_str(out, k);
                out.push_str(": ");
                py_json(out, x, level + 1, width, nested);
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// A JSON string as Python's json module writes it with `ensure_ascii=True`.
fn py_str(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04x}", u);
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (as `json` writes floats): shortest round-trip digits, exponent form when the decimal
/// exponent is < -4 or >= 16.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's `{:e}` without precision prints the shortest round-trip digits: "-1.2345e-7".
    let s = format!("{:e}", x);
    let (sign, rest) = if let Some(r) = s.strip_prefix('-') { ("-", r) } else { ("", s.as_str()) };
    let (mant, exp) = rest.split_once('e').unwrap_or((rest, "0"));
    let exp: i64 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // value = 0.DIGITS * 10^decpt
    let nd = digits.len() as i64;
    let body = if decpt <= -4 || decpt > 16 {
        let e = decpt - 1;
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits.clone() };
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    } else if decpt <= 0 {
        format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
    } else if decpt < nd {
        format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
    } else {
        format!("{}{}.0", digits, "0".repeat((decpt - nd) as usize))
    };
    format!("{sign}{body}")
}
