//! The model card (`README.md`) written beside a converted or quantized artifact: where it came from,
//! the recipe per role and type, bits per weight, size, quality figures, hashes, and how to verify it.
//!
//! The card is rendered from the (unsealed) manifest and a few facts about the source, so it holds
//! nothing that depends on the machine, the paths or the thread count: the same inputs give the same
//! bytes (and its sha256 is recorded in the manifest's `model_card`). See `docs/pipeline.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::manifest::Manifest;
use crate::quantize::rules::Role;

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
    let _ = writeln!(s, "---");
    let _ = writeln!(s, "library_name: gguf");
    let _ = writeln!(s, "tags:");
    let _ = writeln!(s, "- gguf");
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
    let _ = writeln!(s, "# {} — {} GGUF", cx.source_name, m.options.out_type);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "`{out_name}`: `{}` converted to GGUF ({}) by sling {} (commit `{}`).",
        cx.source_name, m.options.out_type, m.sling.version, m.sling.git_commit
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "| | |");
    let _ = writeln!(s, "|---|---|");
    let arch = match &cx.hf_architecture {
        Some(a) => format!("`{a}` → GGUF `{}`", cx.gguf_architecture),
        None => format!("GGUF `{}`", cx.gguf_architecture),
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
    let _ = writeln!(s, "| quality | not measured |");
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
        let e = table.entry((role_name(Role::of(&t.name)), t.dtype.clone())).or_default();
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

    let _ = writeln!(s, "## Quality");
    let _ = writeln!(s);
    let _ = writeln!(s, "Not measured: no perplexity or KL-divergence figures were recorded for this artifact.");
    let _ = writeln!(s);

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
        m.outputs.first().map(|o| o.name.as_str()).unwrap_or(out_name),
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
}
