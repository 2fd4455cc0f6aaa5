//! The model card (`README.md`) written beside a converted or quantized artifact: where it came from,
//! the recipe per role and type, bits per weight, size, quality figures, hashes, and how to verify it.
//!
//! The card is rendered from the (unsealed) manifest and a few facts about the source, so it holds
//! nothing that depends on the machine, the paths or the thread count: the same inputs give the same
//! bytes (and its sha256 is recorded in the manifest's `model_card`). See `docs/pipeline.md`.
//!
//! Only two parts depend on the manifest's `quality`: the summary table's `quality` row
//! ([`quality_row`]) and the "Quality" section ([`quality_section`]). [`with_quality`] re-renders
//! exactly those two in a card already written, which gives the same text as rendering the card again
//! with the new figures: that is how [`crate::manifest::attach_quality`] updates a card without the
//! source at hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::manifest::Manifest;
use sling_core::Role;

/// The marker that identifies a card written by sling, and for which output (`<!-- sling-model-card
/// output="m.gguf" -->`): a `README.md` holding another output's marker, or none, is never replaced.
pub const MARKER_PREFIX: &str = "<!-- sling-model-card output=";

/// What the card says besides the manifest.
#[derive(Clone, Debug, Default)]
pub struct CardContext {
    /// The source's name (its directory name).
    pub source_name: String,
    /// `config.json` `architectures[0]`, when known.
    pub hf_architecture: Option<String>,
    /// `general.architecture` of the output.
    pub gguf_architecture: String,
    /// Routed experts per layer, when the model has them.
    pub experts: Option<u64>,
    /// The manifest's file name.
    pub manifest_name: String,
    /// Extra rows for the summary table (recipe description, imatrix, ...).
    pub extra: Vec<(String, String)>,
    /// For artifacts other than GGUF: what the card calls the format (`compressed-tensors`, `MLX`) and the
    /// Hugging Face `library_name` (`transformers`, `mlx`); tensor names are then the checkpoint's own.
    pub format: Option<(String, String)>,
}

fn marker(output: &str) -> String {
    format!("{MARKER_PREFIX}{output:?} -->")
}

/// Whether `text` is a card sling wrote for `output` (the marker is near the top).
pub fn is_card_for(text: &str, output: &str) -> bool {
    let head: String = text.chars().take(4096).collect();
    head.contains(&marker(output))
}

/// Where the card for `output` goes: `README.md` in its directory when that name is free or holds a
/// card sling wrote for this same output; otherwise `<stem>.README.md` (so that a README.md of
/// something else, e.g. another artifact's card or a repository's own, is never overwritten).
pub fn card_path(output: &Path) -> PathBuf {
    let readme = output.with_file_name("README.md");
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match std::fs::read(&readme) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => readme,
        Ok(b) if is_card_for(&String::from_utf8_lossy(&b), &name) => readme,
        _ => stem_card_path(output),
    }
}

/// `dir/m.gguf` → `dir/m.README.md`.
pub fn stem_card_path(output: &Path) -> PathBuf {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!("{stem}.README.md"))
}

/// Removes the cards an earlier run wrote for `output` (`README.md` or `<stem>.README.md` carrying its
/// marker); anything else is left alone.
pub fn remove_stale_cards(output: &Path) -> std::io::Result<()> {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for p in [output.with_file_name("README.md"), stem_card_path(output)] {
        if let Ok(b) = std::fs::read(&p) {
            if is_card_for(&String::from_utf8_lossy(&b), &name) {
                std::fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::RoutedExperts => "routed_experts",
        Role::SharedExperts => "shared_experts",
        Role::Router => "router",
        Role::Attention => "attention",
        Role::Embeddings => "embeddings",
        Role::Output => "output",
        Role::DenseFfn => "dense_ffn",
        Role::Other => "other",
    }
}

fn bpw(bytes: u64, elems: u64) -> String {
    if elems == 0 {
        "-".into()
    } else {
        format!("{:.2}", bytes as f64 * 8.0 / elems as f64)
    }
}

/// Renders the card (Markdown with Hugging Face front matter).
pub fn render(m: &Manifest, cx: &CardContext) -> String {
    let mut s = String::new();
    let total_bytes: u64 = m.tensors.iter().map(|t| t.n_bytes).sum();
    let total_elems: u64 = m.tensors.iter().map(|t| t.ne.iter().product::<u64>()).sum();
    let file_bytes: u64 = m.outputs.iter().map(|o| o.size).sum();
    let out_name = m.output.as_str();

    // Hugging Face model-card metadata.
    let (format, library) = match &cx.format {
        Some((f, l)) => (f.as_str(), l.as_str()),
        None => ("GGUF", "gguf"),
    };
    let _ = writeln!(s, "---");
    let _ = writeln!(s, "library_name: {library}");
    let _ = writeln!(s, "tags:");
    let _ = writeln!(s, "- {}", format.to_ascii_lowercase());
    let _ = writeln!(s, "- sling");
    if !cx.gguf_architecture.is_empty() {
        let _ = writeln!(s, "- {}", cx.gguf_architecture);
    }
    if cx.experts.is_some_and(|e| e > 1) {
        let _ = writeln!(s, "- moe");
    }
    let _ = writeln!(s, "---");
    let _ = writeln!(s, "{}", marker(out_name));
    let _ = writeln!(
        s,
        "<!-- Written by sling with the artifact and hashed in {}: regenerate it rather than edit it. -->",
        cx.manifest_name
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "# {} — {} {format}", cx.source_name, m.options.out_type);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "`{out_name}`: `{}` converted to {format} ({}) by sling {} (commit `{}`).",
        cx.source_name, m.options.out_type, m.sling.version, m.sling.git_commit
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "| | |");
    let _ = writeln!(s, "|---|---|");
    let arch = match (&cx.hf_architecture, cx.format.is_some()) {
        (Some(a), true) => format!("`{a}`"),
        (Some(a), false) => format!("`{a}` → GGUF `{}`", cx.gguf_architecture),
        (None, _) => format!("GGUF `{}`", cx.gguf_architecture),
    };
    let _ = writeln!(s, "| source | `{}` ({arch}) |", cx.source_name);
    if let Some(e) = cx.experts.filter(|e| *e > 1) {
        let _ = writeln!(s, "| experts | {e} routed per layer |");
    }
    let _ = writeln!(s, "| recipe | `{}` |", m.options.out_type);
    for (k, v) in &cx.extra {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "| weights | {total_elems} |");
    let _ = writeln!(s, "| bits per weight | {} |", bpw(total_bytes, total_elems));
    let _ = writeln!(
        s,
        "| size | {} ({file_bytes} bytes in {} file{}) |",
        human(file_bytes),
        m.outputs.len(),
        if m.outputs.len() == 1 { "" } else { "s" }
    );
    let _ = writeln!(s, "{}", quality_row(m.quality.as_ref()));
    match &m.created {
        Some(c) => {
            let _ = writeln!(s, "| created | {c} |");
        }
        None => {
            let _ = writeln!(s, "| created | not recorded (reproducible build) |");
        }
    }
    let _ = writeln!(s, "| provenance | [`{}`]({}) |", cx.manifest_name, cx.manifest_name);
    let _ = writeln!(s);

    // Recipe: tensors per role and type.
    let mut table: BTreeMap<(&'static str, String), (usize, u64, u64)> = BTreeMap::new();
    for t in &m.tensors {
        let role = if cx.format.is_some() { Role::of_hf(&t.name, t.ne.len()) } else { Role::of(&t.name) };
        let e = table.entry((role_name(role), t.dtype.clone())).or_default();
        e.0 += 1;
        e.1 += t.ne.iter().product::<u64>();
        e.2 += t.n_bytes;
    }
    let _ = writeln!(s, "## Recipe");
    let _ = writeln!(s);
    let _ = writeln!(s, "| role | type | tensors | weights | bytes | bpw | share of bytes |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
    for ((role, ty), (n, elems, bytes)) in &table {
        let share = if total_bytes > 0 { *bytes as f64 * 100.0 / total_bytes as f64 } else { 0.0 };
        let _ = writeln!(s, "| {role} | {ty} | {n} | {elems} | {bytes} | {} | {share:.1}% |", bpw(*bytes, *elems));
    }
    let _ = writeln!(
        s,
        "| **total** | | {} | {total_elems} | {total_bytes} | {} | 100% |",
        m.tensors.len(),
        bpw(total_bytes, total_elems)
    );
    let _ = writeln!(s);
    if let Some(q) = &m.options.quantize {
        if !q.rules.is_empty() {
            let _ = writeln!(
                s,
                "Type rules, tried in order (the first that selects a tensor sets its type; `{}` decides the rest):",
                q.ftype
            );
            let _ = writeln!(s);
            let _ = writeln!(s, "| # | from | rule | type |");
            let _ = writeln!(s, "|---:|---|---|---|");
            for (i, r) in q.rules.iter().enumerate() {
                let _ = writeln!(s, "| {} | {} | `{}` | {} |", i + 1, r.from, cell(&r.pattern), r.dtype);
            }
            let _ = writeln!(s);
        }
    }

    if !m.kept.is_empty() {
        let _ = writeln!(s, "Kept at source precision (the scheme cannot take their shape):");
        let _ = writeln!(s);
        for k in &m.kept {
            let _ = writeln!(s, "- `{}`: {}", cell(&k.name), cell(&k.why));
        }
        let _ = writeln!(s);
    }

    s.push_str(&quality_section(m.quality.as_ref()));

    let _ = writeln!(s, "## Files");
    let _ = writeln!(s);
    let _ = writeln!(s, "| file | bytes | sha256 |");
    let _ = writeln!(s, "|---|---:|---|");
    for o in &m.outputs {
        let _ = writeln!(s, "| `{}` | {} | `{}` |", o.name, o.size, o.sha256);
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Source files (as read by the conversion):");
    let _ = writeln!(s);
    let _ = writeln!(s, "| file | bytes | sha256 |");
    let _ = writeln!(s, "|---|---:|---|");
    for f in &m.sources {
        let _ = writeln!(s, "| `{}` | {} | `{}` |", f.path, f.size, f.sha256);
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "## Verify");
    let _ = writeln!(s);
    let _ = writeln!(s, "```sh");
    let _ = writeln!(
        s,
        "sling verify {}                 # every file and tensor against {} (and this card)",
        if cx.format.is_some() { "." } else { m.outputs.first().map(|o| o.name.as_str()).unwrap_or(out_name) },
        cx.manifest_name
    );
    let _ = writeln!(s, "sling verify {} --source SRC     # also the source files listed above", cx.manifest_name);
    let _ = writeln!(s, "sha256sum -c <<'EOF'");
    for o in &m.outputs {
        let _ = writeln!(s, "{}  {}", o.sha256, o.name);
    }
    let _ = writeln!(s, "EOF");
    let _ = writeln!(s, "# if the directory was signed (sling sign / OpenSSF model_signing):");
    let _ = writeln!(s, "model_signing verify key --signature model.sig --public_key signer.pub .");
    let _ = writeln!(s, "```");
    s
}

/// Text for a Markdown table cell: `|` escaped, line breaks as spaces.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// A figure as the card shows it: integers as they are, other numbers to 4 significant digits
/// (trailing zeros dropped), strings as they are.
fn figure(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if x == 0.0 || !x.is_finite() {
                return format!("{x}");
            }
            let mag = x.abs().log10().floor() as i32;
            let decimals = (3 - mag).clamp(0, 12) as usize;
            let t = format!("{x:.decimals$}");
            let t = if t.contains('.') { t.trim_end_matches('0').trim_end_matches('.').to_string() } else { t };
            if t == "-0" {
                "0".into()
            } else {
                t
            }
        }
        Value::String(s) => cell(s),
        other => cell(&other.to_string()),
    }
}

/// The summary table's `quality` row: `| quality | not measured |`, or the recorded figures (those of
/// `kld_mean`, `kld_p99`, `kld_max`, `top1`, `ppl`, `ppl_ref`, `data`, `chunks`, `ctx` that are present):
/// `| quality | KLD mean 0.0123 (p99 0.08, max 0.3), top-1 97.1 %, PPL 12.3 vs 12.1 (reference), on
/// calib.txt, 4 x 512 tokens |`. `top1` is a fraction (0.971); a value above 1 is taken as a percentage.
pub fn quality_row(q: Option<&Value>) -> String {
    let Some(q) = q else { return "| quality | not measured |".to_string() };
    let get = |k: &str| q.get(k).filter(|v| !v.is_null());
    let mut parts = Vec::new();
    let kld_extra: Vec<String> = [("p99", "kld_p99"), ("max", "kld_max")]
        .iter()
        .filter_map(|(label, k)| get(k).map(|v| format!("{label} {}", figure(v))))
        .collect();
    match get("kld_mean") {
        Some(mean) if kld_extra.is_empty() => parts.push(format!("KLD mean {}", figure(mean))),
        Some(mean) => parts.push(format!("KLD mean {} ({})", figure(mean), kld_extra.join(", "))),
        None if !kld_extra.is_empty() => parts.push(format!("KLD {}", kld_extra.join(", "))),
        None => {}
    }
    if let Some(t) = get("top1") {
        let shown = match t.as_f64() {
            Some(x) if x <= 1.0 => figure(&serde_json::json!(x * 100.0)),
            _ => figure(t),
        };
        parts.push(format!("top-1 {shown} %"));
    }
    match (get("ppl"), get("ppl_ref")) {
        (Some(p), Some(r)) => parts.push(format!("PPL {} vs {} (reference)", figure(p), figure(r))),
        (Some(p), None) => parts.push(format!("PPL {}", figure(p))),
        (None, Some(r)) => parts.push(format!("PPL {} (reference)", figure(r))),
        (None, None) => {}
    }
    if let Some(d) = get("data") {
        parts.push(format!("on {}", figure(d)));
    }
    match (get("chunks"), get("ctx")) {
        (Some(c), Some(n)) => parts.push(format!("{} x {} tokens", figure(c), figure(n))),
        (Some(c), None) => parts.push(format!("{} chunks", figure(c))),
        (None, Some(n)) => parts.push(format!("{}-token chunks", figure(n))),
        (None, None) => {}
    }
    if parts.is_empty() {
        parts.push("measured (see `quality` in the manifest)".to_string());
    }
    format!("| quality | {} |", parts.join(", "))
}

/// The "Quality" section, from its heading to the blank line before the next section: "Not measured
/// …", or every recorded figure (key and value, in the manifest's order).
pub fn quality_section(q: Option<&Value>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Quality");
    let _ = writeln!(s);
    match q.and_then(Value::as_object) {
        None => {
            let _ =
                writeln!(s, "Not measured: no perplexity or KL-divergence figures were recorded for this artifact.");
        }
        Some(o) => {
            let _ = writeln!(
                s,
                "Measured on this artifact against the source model, as recorded in the manifest's `quality` \
                 (KLD: KL divergence of the token distributions, per token; top-1: how often both pick the same \
                 token; PPL: perplexity):"
            );
            let _ = writeln!(s);
            let _ = writeln!(s, "| figure | value |");
            let _ = writeln!(s, "|---|---|");
            for (k, v) in o {
                let shown = match v {
                    Value::String(x) => cell(x),
                    other => cell(&other.to_string()),
                };
                let _ = writeln!(s, "| `{}` | {shown} |", cell(k));
            }
        }
    }
    let _ = writeln!(s);
    s
}

/// `text` (a card sling rendered) with its quality row and "Quality" section re-rendered for `q`: the
/// card [`render`] gives for a manifest with that `quality`. `None` when `text` has no quality row or
/// no Quality section followed by another section.
pub fn with_quality(text: &str, q: Option<&Value>) -> Option<String> {
    // The summary table's row: the first line that starts with `| quality | `.
    let row_start =
        text.match_indices("| quality | ").map(|(i, _)| i).find(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n')?;
    let row_end = row_start + text[row_start..].find('\n')?;
    let mut out = String::with_capacity(text.len() + 512);
    out.push_str(&text[..row_start]);
    out.push_str(&quality_row(q));
    let rest = &text[row_end..];
    // The section: from its heading to the next heading of the same level.
    let sec_start = rest.find("\n## Quality\n")? + 1;
    let sec_len = rest[sec_start..].find("\n## ")? + 1;
    out.push_str(&rest[..sec_start]);
    out.push_str(&quality_section(q));
    out.push_str(&rest[sec_start + sec_len..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_names() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m.gguf");
        assert_eq!(card_path(&out), d.path().join("README.md"));
        std::fs::write(d.path().join("README.md"), "# my repo\n").unwrap();
        assert_eq!(card_path(&out), d.path().join("m.README.md"));
        std::fs::write(d.path().join("README.md"), format!("---\n---\n{}\n", marker("m.gguf"))).unwrap();
        assert_eq!(card_path(&out), d.path().join("README.md"));
        assert_eq!(card_path(&d.path().join("other.gguf")), d.path().join("other.README.md"));
        remove_stale_cards(&d.path().join("other.gguf")).unwrap();
        assert!(d.path().join("README.md").exists());
        remove_stale_cards(&out).unwrap();
        assert!(!d.path().join("README.md").exists());
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(10), "10 B");
    }

    fn manifest() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "schema": "sling.manifest/1",
            "sling": {"name": "sling", "version": "0.1.0", "git_commit": "abc"},
            "options": {
                "to": "gguf", "type": "q8_0",
                "split": {"max_tensors": 0, "max_bytes": 0, "small_first_shard": false},
                "tokenizer_pre": null, "allow_nonfinite": false
            },
            "compute": "cpu",
            "output": "m.gguf",
            "sources": [{"path": "config.json", "size": 3, "sha256": "00"}],
            "outputs": [{"name": "m.gguf", "size": 1000, "sha256": "11"}],
            "tensors": [{
                "name": "blk.0.ffn_up_exps.weight", "type": "q8_0", "ne": [32, 2, 4], "file": "m.gguf",
                "offset": 64, "n_bytes": 272, "sha256": "22", "sources": []
            }]
        }))
        .unwrap()
    }

    fn cx() -> CardContext {
        CardContext {
            format: None,
            source_name: "tiny".into(),
            hf_architecture: Some("Qwen3MoeForCausalLM".into()),
            gguf_architecture: "qwen3moe".into(),
            experts: Some(4),
            manifest_name: "m.sling.json".into(),
            extra: vec![("imatrix".into(), "none".into())],
        }
    }

    #[test]
    fn quality_row_renders_what_is_there() {
        let q = serde_json::json!({
            "kld_mean": 0.0123, "kld_p99": 0.08, "kld_max": 0.3, "top1": 0.971, "ppl": 12.3, "ppl_ref": 12.1,
            "data": "calib.txt", "chunks": 4, "ctx": 512
        });
        assert_eq!(
            quality_row(Some(&q)),
            "| quality | KLD mean 0.0123 (p99 0.08, max 0.3), top-1 97.1 %, PPL 12.3 vs 12.1 (reference), on calib.txt, 4 x 512 tokens |"
        );
        assert_eq!(quality_row(None), "| quality | not measured |");
        assert_eq!(quality_row(Some(&serde_json::json!({"ppl": 12.34567}))), "| quality | PPL 12.35 |");
        assert_eq!(
            quality_row(Some(&serde_json::json!({"kld_max": 1.5e-5, "top1": 97.5, "data": "a|b", "ctx": 256}))),
            "| quality | KLD max 0.000015, top-1 97.5 %, on a\\|b, 256-token chunks |"
        );
        assert_eq!(
            quality_row(Some(&serde_json::json!({"kld_mean": 0.5, "ppl_ref": 9}))),
            "| quality | KLD mean 0.5, PPL 9 (reference) |"
        );
        assert_eq!(
            quality_row(Some(&serde_json::json!({"other": 1}))),
            "| quality | measured (see `quality` in the manifest) |"
        );
    }

    #[test]
    fn with_quality_equals_a_fresh_render() {
        let m = manifest();
        let plain = render(&m, &cx());
        assert!(plain.contains("\n| quality | not measured |\n"), "{plain}");
        assert!(plain.contains("\n## Quality\n\nNot measured: no perplexity"), "{plain}");
        let mut mq = m.clone();
        mq.quality =
            Some(serde_json::json!({"kld_mean": 0.01, "top1": 0.95, "data": "wiki|test.txt", "note": "multi\nline"}));
        let measured = render(&mq, &cx());
        assert_ne!(plain, measured);
        assert_eq!(with_quality(&plain, mq.quality.as_ref()).unwrap(), measured);
        // Back again, and replacing figures already there.
        assert_eq!(with_quality(&measured, None).unwrap(), plain);
        let mut mq2 = m.clone();
        mq2.quality = Some(serde_json::json!({"ppl": 7.25}));
        assert_eq!(with_quality(&measured, mq2.quality.as_ref()).unwrap(), render(&mq2, &cx()));
        assert!(measured.contains("| `note` | multi line |"), "{measured}");
        assert!(with_quality("# some other README\n", None).is_none());
    }
}
