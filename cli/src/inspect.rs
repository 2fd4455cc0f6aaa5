//! `sling inspect`: what a checkpoint holds, from headers alone.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;
use sling_core::{DType, ModelConfig};
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::GgufFile;
use sling_target_gguf::convert::arch::{role_of, Role};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .safetensors file or a .gguf file.
    path: PathBuf,
    /// Print stable JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Default, Serialize)]
struct Group {
    tensors: u64,
    params: u64,
    bytes: u64,
    dtypes: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct Report {
    path: String,
    format: &'static str,
    architecture: Option<String>,
    layers: Option<u64>,
    hidden_size: Option<u64>,
    experts: Experts,
    params: Params,
    groups: BTreeMap<&'static str, Group>,
    /// Estimated output bytes at common targets.
    estimates: BTreeMap<&'static str, u64>,
}

#[derive(Serialize, Default)]
struct Experts {
    routed: Option<u64>,
    active_per_token: Option<u64>,
    shared: Option<u64>,
}

#[derive(Serialize, Default)]
struct Params {
    total: u64,
    active: u64,
}

/// Bits per weight of the estimate targets; 1-D tensors stay F32 everywhere.
const TARGETS: [(&str, f64); 4] = [("bf16", 16.0), ("q8_0", 8.5), ("q4_k_m_like_4.8bpw", 4.8), ("low_2.5bpw", 2.5)];

fn experts_of(cfg: &ModelConfig) -> Experts {
    let u = |k: &[&str]| cfg.find_u64(k).ok().flatten();
    Experts {
        routed: u(&["num_local_experts", "num_experts", "n_routed_experts"]),
        active_per_token: u(&["num_experts_per_tok", "num_experts_per_token", "top_k_experts"]),
        shared: u(&["n_shared_experts"]).or_else(|| cfg.get("shared_expert_intermediate_size").map(|_| 1)),
    }
}

pub fn run(a: Args) -> Result<()> {
    let is_gguf = a.path.extension().is_some_and(|e| e == "gguf");
    // (name, dtype name, params, bytes, is 1-D)
    let mut items: Vec<(String, String, u64, u64, bool)> = Vec::new();
    let (format, arch, cfg) = if is_gguf {
        let g = GgufFile::open(&a.path).with_context(|| format!("cannot read {}", a.path.display()))?;
        for t in &g.tensors {
            let n: u64 = t.ne.iter().product();
            items.push((
                t.name.clone(),
                t.dtype.name().to_string(),
                n,
                t.n_bytes,
                t.ne.iter().filter(|&&d| d > 1).count() <= 1,
            ));
        }
        let arch = g.get("general.architecture").and_then(|v| v.as_str()).map(str::to_string);
        let mut m = serde_json::Map::new();
        if let Some(a) = &arch {
            for (k, key) in [
                ("num_hidden_layers", "block_count"),
                ("hidden_size", "embedding_length"),
                ("num_experts", "expert_count"),
                ("num_experts_per_tok", "expert_used_count"),
                ("n_shared_experts", "expert_shared_count"),
            ] {
                if let Some(v) = g.get(&format!("{a}.{key}")).and_then(|v| v.as_u64()) {
                    m.insert(k.into(), v.into());
                }
            }
        }
        ("gguf", arch, ModelConfig::from_value(serde_json::Value::Object(m)).ok())
    } else {
        let ck = Checkpoint::open(&a.path).with_context(|| format!("cannot read checkpoint {}", a.path.display()))?;
        for t in ck.tensors() {
            let numel = if t.dtype == DType::U8 && (t.name.ends_with("_blocks")) { t.numel() * 2 } else { t.numel() };
            // Quantization scales (MXFP4 `_scales`, FP8 `weight_scale_inv`) are bytes, not parameters.
            if (t.dtype == DType::U8 && t.name.ends_with("_scales")) || t.name.ends_with("_scale_inv") {
                items.push((t.name.clone(), format!("{} (scales)", t.dtype.name()), 0, t.n_bytes(), false));
                continue;
            }
            items.push((t.name.clone(), t.dtype.name().to_string(), numel, t.n_bytes(), t.shape.len() <= 1));
        }
        let arch = ck.config.as_ref().and_then(|c| c.architecture().ok()).map(str::to_string);
        ("safetensors", arch, ck.config.clone())
    };
    let mut groups: BTreeMap<&'static str, Group> = BTreeMap::new();
    let mut total = 0u64;
    let mut routed = 0u64;
    let mut one_d = 0u64;
    for (name, dt, n, bytes, is_1d) in &items {
        let role = role_of(name);
        let g = groups.entry(role.name()).or_default();
        g.tensors += 1;
        g.params += n;
        g.bytes += bytes;
        *g.dtypes.entry(dt.clone()).or_default() += bytes;
        total += n;
        if role == Role::RoutedExperts {
            routed += n;
        }
        if *is_1d {
            one_d += n;
        }
    }
    let experts = cfg.as_ref().map(experts_of).unwrap_or_default();
    let active = match (experts.routed, experts.active_per_token) {
        (Some(r), Some(k)) if r > 0 => total - routed + routed * k / r,
        _ => total,
    };
    let estimates =
        TARGETS.iter().map(|(n, bpw)| (*n, ((total - one_d) as f64 * bpw / 8.0) as u64 + one_d * 4)).collect();
    let report = Report {
        path: a.path.display().to_string(),
        format,
        architecture: arch,
        layers: cfg.as_ref().and_then(|c| c.find_u64(&["num_hidden_layers", "n_layers"]).ok().flatten()),
        hidden_size: cfg.as_ref().and_then(|c| c.find_u64(&["hidden_size"]).ok().flatten()),
        experts,
        params: Params { total, active },
        groups,
        estimates,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_table(&report);
    Ok(())
}

/// `n` with a decimal SI prefix and `unit` ("B" for bytes, "" for counts).
fn si(n: u64, unit: &str) -> String {
    let n = n as f64;
    for (scale, p) in [(1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if n >= scale {
            return format!("{:.2} {p}{unit}", n / scale);
        }
    }
    format!("{n} {unit}")
}

fn human(b: u64) -> String {
    si(b, "B")
}

fn count(n: u64) -> String {
    si(n, "").trim_end().to_string()
}

fn print_table(r: &Report) {
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    println!("{} ({})", r.path, r.format);
    println!("  architecture   {}", r.architecture.as_deref().unwrap_or("-"));
    println!("  layers         {}", opt(r.layers));
    println!("  hidden size    {}", opt(r.hidden_size));
    println!(
        "  experts        routed {} / active per token {} / shared {}",
        opt(r.experts.routed),
        opt(r.experts.active_per_token),
        opt(r.experts.shared)
    );
    println!("  parameters     total {} / active per token {}", count(r.params.total), count(r.params.active));
    println!();
    println!("  {:<16} {:>8} {:>10} {:>11}  dtypes", "group", "tensors", "params", "bytes");
    for (name, g) in &r.groups {
        let dts: Vec<String> = g.dtypes.iter().map(|(d, b)| format!("{d} {}", human(*b))).collect();
        println!("  {:<16} {:>8} {:>10} {:>11}  {}", name, g.tensors, count(g.params), human(g.bytes), dts.join(", "));
    }
    println!();
    println!("  estimated output size");
    for (t, b) in &r.estimates {
        println!("    {:<22} {}", t, human(*b));
    }
}
