//! Reading an artifact directory back (sling's own dequantizer): a compressed-tensors (`vllm:…`) or MLX
//! (`mlx:…`) directory seen as the source checkpoint's tensors — the same names and shapes, per-expert 2-D
//! tensors for MLX's stacked `switch_mlp` experts (Mixtral's `w1/w2/w3` names back) — with each weight
//! dequantized to f32 by the one definition of its encoding (`sling_quantizers::ct`, `sling_quantizers::mlx`).
//! `sling eval`, `sling logits` and `sling dequantize` read candidates through it, and the interop tests compare
//! it with the consumers' own decoders.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use sling_core::DType;
use sling_formats::checkpoint::{Checkpoint, CheckpointError, SourceTensor};
use sling_quantizers::ct;
use sling_quantizers::mlx as affine;

/// Why an artifact cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{dir}: {why}")]
    Format { dir: String, why: String },
    #[error("tensor {tensor}: {why}")]
    Tensor { tensor: String, why: String },
    #[error("tensor {0} not found")]
    Missing(String),
}

/// One `config_groups` entry of a compressed-tensors config: format, bits, symmetric, group size (None: channel),
/// block (fp8-block), and the modules it targets.
#[derive(Clone, Debug)]
pub struct CtScheme {
    pub format: String,
    pub bits: u32,
    pub symmetric: bool,
    pub group: Option<usize>,
    pub block: bool,
    pub targets: Vec<CtTarget>,
}

/// A `targets` entry, matched as compressed-tensors' `match_name` and vLLM's `find_matched_target` match a module
/// name: `re:PATTERN` by `re.match` (anchored at the start only), a class name (`Linear`: every module stored with
/// quantized parameters), else the exact module name.
#[derive(Clone, Debug)]
pub enum CtTarget {
    Regex(regex::Regex),
    Class(String),
    Name(String),
}

impl CtTarget {
    fn parse(s: &str) -> Result<CtTarget, String> {
        if let Some(p) = s.strip_prefix("re:") {
            return regex::Regex::new(&format!("^(?:{p})"))
                .map(CtTarget::Regex)
                .map_err(|e| format!("target {s:?}: {e}"));
        }
        // Class names are capitalised identifiers (`Linear`, `FusedMoE`); module names are dotted paths.
        if s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !s.contains('.') {
            return Ok(CtTarget::Class(s.to_string()));
        }
        Ok(CtTarget::Name(s.to_string()))
    }

    /// Whether this target names `module` (a Linear module: the class targets that sling writes are `Linear`).
    pub fn matches(&self, module: &str) -> bool {
        match self {
            CtTarget::Regex(r) => r.is_match(module),
            CtTarget::Class(c) => c == "Linear",
            CtTarget::Name(n) => n == module,
        }
    }
}

impl PartialEq for CtScheme {
    fn eq(&self, o: &CtScheme) -> bool {
        (&self.format, self.bits, self.symmetric, self.group, self.block)
            == (&o.format, o.bits, o.symmetric, o.group, o.block)
    }
}

impl Eq for CtScheme {}

/// What kind of artifact a directory is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// compressed-tensors: its config groups, in the order `config_groups` lists them (`group_0`, `group_1`, …).
    CompressedTensors { schemes: Vec<CtScheme> },
    /// MLX affine: global bits and group size (per-module overrides in `config.json` and the shapes).
    Mlx { bits: u32, group: usize },
}

#[derive(Clone, Debug)]
enum Logical {
    /// A stored tensor read as it is (widened to f32).
    Plain { tensor: String },
    /// A compressed-tensors module (`<module>.weight_*`) of the `scheme`-th config group.
    Ct { module: String, scheme: usize },
    /// An MLX affine weight (`<module>.weight/.scales/.biases`); `expert`: one slice of a stacked tensor.
    Affine { module: String, bits: u32, group: usize, expert: Option<u64> },
    /// One expert of a stacked unquantized tensor.
    Slice { tensor: String, expert: u64 },
    /// An MLX `mxfp4` weight (`<module>.weight` U32 E2M1 nibbles, `<module>.scales` U8 E8M0 per 32).
    Mxfp4 { module: String, expert: Option<u64> },
    /// Two logical tensors of the same shape `[outer, …]` interleaved in runs of `unit` elements within each outer
    /// slice (gpt-oss's `gate_up_proj` rows and biases from mlx-lm's `gate_proj`/`up_proj`).
    Interleave { a: String, b: String, unit: usize },
    /// DeepSeek-V3's `kv_b_proj` `[H·(nope+v), rank]` from mlx-lm's `embed_q` `[H, rank, nope]` (transposed back)
    /// and `unembed_out` `[H, v, rank]`.
    KvB { embed_q: String, unembed_out: String, heads: usize, nope: usize, v: usize, rank: usize },
}

/// An artifact directory read back (see the module docs).
pub struct Artifact {
    pub ck: Checkpoint,
    pub kind: Kind,
    logical: HashMap<String, (Vec<u64>, Logical)>,
    order: Vec<String>,
    /// See [`Artifact::is_out_major`].
    out_major: std::collections::HashSet<String>,
    /// Unpacked zero points per module (small; unpacked once).
    zeros: Mutex<HashMap<String, std::sync::Arc<Vec<i8>>>>,
}

fn fmt_err(dir: &Path, why: impl Into<String>) -> ReadError {
    ReadError::Format { dir: dir.display().to_string(), why: why.into() }
}

/// Whether `dir` holds a compressed-tensors or MLX artifact (by its `config.json`).
/// A compressed-tensors config sling cannot read (a config group without a usable target) is an error, not "no
/// artifact".
pub fn kind_of(dir: &Path) -> Result<Option<Kind>, ReadError> {
    let Some(cfg) =
        std::fs::read(dir.join("config.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return Ok(None);
    };
    if let Some(q) = cfg.get("quantization_config").filter(|q| q["quant_method"] == "compressed-tensors") {
        return ct_schemes(q)
            .map(|schemes| Some(Kind::CompressedTensors { schemes }))
            .map_err(|why| fmt_err(dir, format!("config.json quantization_config: {why}")));
    }
    Ok(mlx_kind(&cfg))
}

fn mlx_kind(cfg: &serde_json::Value) -> Option<Kind> {
    let q = cfg.get("quantization")?;
    // `mxfp4`: a partially quantized model (gpt-oss's MXFP4 experts kept), every affine module listed.
    if !matches!(q.get("mode").and_then(|m| m.as_str()).unwrap_or("affine"), "affine" | "mxfp4") {
        return None;
    }
    Some(Kind::Mlx { bits: q["bits"].as_u64()? as u32, group: q["group_size"].as_u64()? as usize })
}

/// The config group quantizing `module`, with vLLM's precedence (`find_matched_target`: the module's exact name,
/// then a `re:` pattern, then its class), the first group at each level. sling never writes overlapping targets; a
/// third-party config may target `Linear` in one group and single modules out in another.
pub fn group_of(schemes: &[CtScheme], module: &str) -> Option<usize> {
    let level = |t: &CtTarget| match t {
        CtTarget::Name(_) => 0,
        CtTarget::Regex(_) => 1,
        CtTarget::Class(_) => 2,
    };
    (0..3).find_map(|l| schemes.iter().position(|s| s.targets.iter().any(|t| level(t) == l && t.matches(module))))
}

/// The config groups of a compressed-tensors `quantization_config`, in key order (`group_0`, `group_1`, …, as
/// Python's dict keeps them when written with `sort_keys`); each group's `format`, else the block's (a
/// `mixed-precision` block names each group's format).
fn ct_schemes(q: &serde_json::Value) -> Result<Vec<CtScheme>, String> {
    let top = q["format"].as_str().unwrap_or("");
    let groups = q["config_groups"].as_object().ok_or("quantization_config without config_groups")?;
    let mut keys: Vec<&String> = groups.keys().collect();
    // group_2 before group_10, as the writer numbered them.
    keys.sort_by_key(|k| (k.trim_start_matches(|c: char| !c.is_ascii_digit()).parse::<u64>().unwrap_or(u64::MAX), *k));
    let mut out = Vec::new();
    for k in keys {
        let g = &groups[k];
        let w = &g["weights"];
        let targets = g["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .map(CtTarget::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("config_groups.{k}: {e}"))?;
        out.push(CtScheme {
            format: g["format"].as_str().filter(|f| !f.is_empty()).unwrap_or(top).to_string(),
            bits: w["num_bits"].as_u64().unwrap_or(0) as u32,
            symmetric: w["symmetric"].as_bool().unwrap_or(true),
            group: w["group_size"].as_u64().filter(|g| *g > 0).map(|g| g as usize),
            block: w["strategy"] == "block",
            targets,
        });
    }
    if out.is_empty() {
        return Err("quantization_config has no config group".into());
    }
    Ok(out)
}

fn decode(t: &SourceTensor, bytes: &[u8]) -> Result<Vec<f32>, ReadError> {
    let mut v = Vec::new();
    sling_quantizers::decode_to_f32(t.dtype, bytes, &mut v)
        .map_err(|e| ReadError::Tensor { tensor: t.name.clone(), why: e.to_string() })?;
    Ok(v)
}

fn scale_of(t: &SourceTensor, bytes: &[u8]) -> Result<Vec<f32>, ReadError> {
    decode(t, bytes)
}

/// The source checkpoint's names for what mlx-lm's `sanitize` rearranged (the inverse of `mlx::plan`'s
/// rearrangements): DeepSeek-V3's `embed_q`/`unembed_out` read as `kv_b_proj.weight` (`heads_dims`: heads,
/// nope, v, rank), and gpt-oss's `mlp.experts.{gate,up,down}_proj.{weight,bias}` as the MXFP4 checkpoint's
/// `mlp.experts.gate_up_proj` `[E, 2I, H]` (gate/up rows interleaved), `down_proj` `[E, H, I]` and their `_bias`.
/// The rearranged tensors stay readable by their MLX names but leave the listing. Returns gpt-oss's expert
/// weights' names ([`Artifact::is_out_major`]).
fn unstack_mlx(
    logical: &mut HashMap<String, (Vec<u64>, Logical)>,
    order: &mut Vec<String>,
    heads_dims: Option<(usize, usize, usize, usize)>,
    gpt_oss: bool,
) -> std::collections::HashSet<String> {
    let mut out_major = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(order.len());
    // The attention stems whose embed_q/unembed_out agree with config.json (a hostile directory keeps its MLX
    // names, which the forward pass then reports missing).
    let dims = |d: [usize; 3]| d.map(|x| x as u64).to_vec();
    let kv_b: std::collections::HashSet<String> = match heads_dims {
        Some((heads, nope, v, rank)) => order
            .iter()
            .filter_map(|n| n.strip_suffix(".embed_q.weight"))
            .filter(|stem| {
                let shape = |n: String| logical.get(&n).map(|(s, _)| s.clone());
                shape(format!("{stem}.embed_q.weight")) == Some(dims([heads, rank, nope]))
                    && shape(format!("{stem}.unembed_out.weight")) == Some(dims([heads, v, rank]))
            })
            .map(str::to_string)
            .collect(),
        None => Default::default(),
    };
    for name in order.drain(..) {
        let shape = logical[&name].0.clone();
        let stem = name.strip_suffix(".embed_q.weight").or_else(|| name.strip_suffix(".unembed_out.weight"));
        if let (Some((heads, nope, v, rank)), Some(stem)) = (heads_dims, stem.filter(|s| kv_b.contains(*s))) {
            if name.ends_with(".embed_q.weight") {
                let (embed_q, unembed_out) = (name.clone(), format!("{stem}.unembed_out.weight"));
                let kvb = format!("{stem}.kv_b_proj.weight");
                let l = Logical::KvB { embed_q, unembed_out, heads, nope, v, rank };
                logical.insert(kvb.clone(), (vec![(heads * (nope + v)) as u64, rank as u64], l));
                out.push(kvb);
            }
            continue; // unembed_out: read through kv_b_proj
        }
        let gpt = gpt_oss.then(|| name.split_once(".mlp.experts.")).flatten();
        if let Some((base, what)) = gpt {
            let base = format!("{base}.mlp.experts.");
            // `rows`: interleave whole rows (weights), else single elements (biases).
            let fused = |a: &str, b: &str, rows: bool, to: &str, logical: &mut HashMap<_, _>, out: &mut Vec<String>| {
                let (a, b) = (format!("{base}{a}"), format!("{base}{b}"));
                let same = logical.get(&a).map(|(s, _)| s) == logical.get(&b).map(|(s, _)| s);
                if let Some((sa, _)) = logical.get(&a).cloned().filter(|_| same) {
                    let mut s: Vec<u64> = sa;
                    if let Some(d) = s.get_mut(1) {
                        *d *= 2;
                    }
                    let unit = if rows { s.last().copied().unwrap_or(1) as usize } else { 1 };
                    logical.insert(format!("{base}{to}"), (s, Logical::Interleave { a, b, unit }));
                    out.push(format!("{base}{to}"));
                }
            };
            match what {
                "gate_proj.weight" => {
                    fused("gate_proj.weight", "up_proj.weight", true, "gate_up_proj", logical, &mut out);
                    out_major.insert(format!("{base}gate_up_proj"));
                }
                "gate_proj.bias" => {
                    fused("gate_proj.bias", "up_proj.bias", false, "gate_up_proj_bias", logical, &mut out)
                }
                "down_proj.weight" | "down_proj.bias" => {
                    let to = if what == "down_proj.weight" { "down_proj" } else { "down_proj_bias" };
                    if what == "down_proj.weight" {
                        out_major.insert(format!("{base}{to}"));
                    }
                    let l = logical[&name].1.clone();
                    logical.insert(format!("{base}{to}"), (shape, l));
                    out.push(format!("{base}{to}"));
                }
                "up_proj.weight" | "up_proj.bias" => {}
                _ => out.push(name),
            }
            continue;
        }
        out.push(name);
    }
    *order = out;
    out_major
}

impl Artifact {
    /// Opens `dir`; `None` when it is neither a compressed-tensors nor an MLX artifact.
    pub fn open(dir: &Path) -> Result<Option<Artifact>, ReadError> {
        let Some(kind) = kind_of(dir)? else { return Ok(None) };
        let ck = Checkpoint::open(dir)?;
        let mut logical = HashMap::new();
        let mut order = Vec::new();
        let mut out_major = std::collections::HashSet::new();
        let mut add = |name: String, shape: Vec<u64>, l: Logical| {
            order.push(name.clone());
            logical.insert(name, (shape, l));
        };
        match &kind {
            Kind::CompressedTensors { schemes } => {
                let scheme_of = |module: &str| -> Result<usize, ReadError> {
                    group_of(schemes, module).ok_or_else(|| {
                        fmt_err(dir, format!("{module}: stored quantized, but no config group targets it"))
                    })
                };
                for t in ck.tensors() {
                    let n = t.name.as_str();
                    if let Some(module) = n.strip_suffix(".weight_packed") {
                        let scheme = scheme_of(module)?;
                        let format = &schemes[scheme].format;
                        let shape = match ck.get(&format!("{module}.weight_shape")) {
                            Some(s) => {
                                let v: Vec<i64> = ck
                                    .bytes(s)
                                    .chunks_exact(8)
                                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                                    .collect();
                                v.iter().map(|&x| x.max(0) as u64).collect()
                            }
                            None if format.contains("fp4") => {
                                vec![t.shape[0], t.shape.get(1).copied().unwrap_or(0) * 2]
                            }
                            None => return Err(fmt_err(dir, format!("{module}: weight_packed without weight_shape"))),
                        };
                        add(format!("{module}.weight"), shape, Logical::Ct { module: module.to_string(), scheme });
                    } else if n.ends_with(".weight") && t.dtype == DType::F8E4M3 {
                        let module = n.strip_suffix(".weight").unwrap_or(n);
                        let scheme = scheme_of(module)?;
                        add(n.to_string(), t.shape.clone(), Logical::Ct { module: module.to_string(), scheme });
                    } else if [".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_global_scale"]
                        .iter()
                        .any(|s| n.ends_with(s))
                    {
                        continue;
                    } else {
                        add(n.to_string(), t.shape.clone(), Logical::Plain { tensor: n.to_string() });
                    }
                }
            }
            Kind::Mlx { bits, group } => {
                let cfg = ck.config.as_ref().map(|c| c.root().clone()).unwrap_or_default();
                let q = cfg.get("quantization").cloned().unwrap_or_default();
                let top_mode = q.get("mode").and_then(|m| m.as_str()).unwrap_or("affine").to_string();
                for t in ck.tensors() {
                    let n = t.name.as_str();
                    if n.ends_with(".scales") || n.ends_with(".biases") {
                        continue;
                    }
                    let module = n.strip_suffix(".weight");
                    let quantized = module.is_some_and(|m| ck.get(&format!("{m}.scales")).is_some());
                    // A module's own entry (without a mode: affine, as mlx-lm loads it), else the block's.
                    let (b, g, mxfp4) = match module.and_then(|m| q.get(m)) {
                        Some(o) => (
                            o["bits"].as_u64().unwrap_or(*bits as u64) as u32,
                            o["group_size"].as_u64().unwrap_or(*group as u64) as usize,
                            o.get("mode").and_then(|m| m.as_str()) == Some("mxfp4"),
                        ),
                        None => (*bits, *group, top_mode == "mxfp4"),
                    };
                    let mut shape = t.shape.clone();
                    if quantized {
                        let last = shape.last_mut().ok_or_else(|| fmt_err(dir, format!("{n}: scalar weight")))?;
                        *last = *last * 32 / u64::from(b.max(1));
                    }
                    let module = module.unwrap_or(n).to_string();
                    match module.split_once(".switch_mlp.") {
                        Some((before, proj)) if shape.len() == 3 => {
                            let mixtral = before.ends_with("block_sparse_moe");
                            let proj = match (mixtral, proj) {
                                (true, "gate_proj") => "w1",
                                (true, "down_proj") => "w2",
                                (true, "up_proj") => "w3",
                                (_, p) => p,
                            };
                            for e in 0..shape[0] {
                                let name = format!("{before}.experts.{e}.{proj}.weight");
                                let l = if quantized && mxfp4 {
                                    Logical::Mxfp4 { module: module.clone(), expert: Some(e) }
                                } else if quantized {
                                    Logical::Affine { module: module.clone(), bits: b, group: g, expert: Some(e) }
                                } else {
                                    Logical::Slice { tensor: n.to_string(), expert: e }
                                };
                                add(name, shape[1..].to_vec(), l);
                            }
                        }
                        _ if quantized && mxfp4 => add(n.to_string(), shape, Logical::Mxfp4 { module, expert: None }),
                        _ if quantized => {
                            add(n.to_string(), shape, Logical::Affine { module, bits: b, group: g, expert: None })
                        }
                        _ => add(n.to_string(), shape, Logical::Plain { tensor: n.to_string() }),
                    }
                }
                let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
                let key = |k: &str| {
                    cfg.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| {
                        fmt_err(dir, format!("config.json: {k} missing (needed to read DeepSeek-V3's embed_q)"))
                    })
                };
                let heads_dims = match model_type {
                    "deepseek_v3" => Some((
                        key("num_attention_heads")?,
                        key("qk_nope_head_dim")?,
                        key("v_head_dim")?,
                        key("kv_lora_rank")?,
                    )),
                    _ => None,
                };
                out_major = unstack_mlx(&mut logical, &mut order, heads_dims, model_type == "gpt_oss");
            }
        }
        Ok(Some(Artifact { ck, kind, logical, order, out_major, zeros: Mutex::new(HashMap::new()) }))
    }

    /// Every tensor, in the artifact's order, with its shape (PyTorch order).
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[u64])> {
        self.order.iter().map(|n| (n.as_str(), self.logical[n].0.as_slice()))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.logical.get(name).map(|(s, _)| s.clone())
    }

    fn get(&self, name: &str) -> Result<&SourceTensor, ReadError> {
        self.ck.get(name).ok_or_else(|| ReadError::Missing(name.to_string()))
    }

    /// Rows `i0..i1` of the outermost dimension of `name`, dequantized, row-major.
    pub fn read_outer(&self, name: &str, i0: u64, i1: u64) -> Result<Vec<f32>, ReadError> {
        let (shape, l) = self.logical.get(name).ok_or_else(|| ReadError::Missing(name.to_string()))?;
        let n0 = shape.first().copied().unwrap_or(1);
        if i0 > i1 || i1 > n0 {
            return Err(ReadError::Tensor { tensor: name.into(), why: format!("slice {i0}..{i1} outside 0..{n0}") });
        }
        let numel: u64 = shape.iter().product();
        let per = numel.checked_div(n0).unwrap_or(0);
        match l {
            Logical::Plain { tensor } => {
                let t = self.get(tensor)?;
                let es = t.dtype.block_bytes() as u64;
                decode(t, &self.ck.bytes(t)[(i0 * per * es) as usize..(i1 * per * es) as usize])
            }
            Logical::Slice { tensor, expert } => {
                let t = self.get(tensor)?;
                let es = t.dtype.block_bytes() as u64;
                let base = expert * numel;
                decode(t, &self.ck.bytes(t)[((base + i0 * per) * es) as usize..((base + i1 * per) * es) as usize])
            }
            Logical::Affine { module, bits, group, expert } => {
                let cols = *shape.last().unwrap_or(&1) as usize;
                let rows_per_outer = per / cols as u64;
                let (r0, r1) = (i0 * rows_per_outer, i1 * rows_per_outer);
                let base = expert.map_or(0, |e| e * (numel / cols as u64));
                self.affine_rows(module, *bits, *group, cols, base + r0, base + r1)
            }
            Logical::Ct { module, scheme } => {
                let cols = *shape.last().unwrap_or(&1) as usize;
                self.ct_rows(module, *scheme, shape[0], cols, i0, i1)
            }
            Logical::Mxfp4 { module, expert } => {
                let cols = *shape.last().unwrap_or(&1) as usize;
                let rows_per_outer = per / cols as u64;
                let base = expert.map_or(0, |e| e * (numel / cols as u64));
                self.mxfp4_rows(module, cols, base + i0 * rows_per_outer, base + i1 * rows_per_outer)
            }
            Logical::Interleave { a, b, unit } => {
                let (va, vb) = (self.read_outer(a, i0, i1)?, self.read_outer(b, i0, i1)?);
                let mut out = Vec::with_capacity(va.len() * 2);
                for (ca, cb) in va.chunks(*unit.max(&1)).zip(vb.chunks(*unit.max(&1))) {
                    out.extend_from_slice(ca);
                    out.extend_from_slice(cb);
                }
                Ok(out)
            }
            Logical::KvB { embed_q, unembed_out, heads, nope, v, rank } => {
                let (q, o) =
                    (self.read_outer(embed_q, 0, *heads as u64)?, self.read_outer(unembed_out, 0, *heads as u64)?);
                let (nope, v, rank) = (*nope, *v, *rank);
                let mut out = Vec::with_capacity((i1 - i0) as usize * rank);
                for r in i0 as usize..i1 as usize {
                    let (h, j) = (r / (nope + v), r % (nope + v));
                    if j < nope {
                        out.extend((0..rank).map(|c| q[(h * rank + c) * nope + j]));
                    } else {
                        out.extend_from_slice(&o[(h * v + j - nope) * rank..(h * v + j - nope + 1) * rank]);
                    }
                }
                Ok(out)
            }
        }
    }

    /// Whether `name` is a stacked expert tensor in the `[E, out, in]` orientation of an MXFP4 checkpoint (gpt-oss's
    /// experts read back from MLX), which its bf16 checkpoints store `[E, in, out]`.
    pub fn is_out_major(&self, name: &str) -> bool {
        self.out_major.contains(name)
    }

    fn mxfp4_rows(&self, module: &str, cols: usize, r0: u64, r1: u64) -> Result<Vec<f32>, ReadError> {
        let w = self.get(&format!("{module}.weight"))?;
        let s = self.get(&format!("{module}.scales"))?;
        let (r0, r1) = (r0 as usize, r1 as usize);
        let wb = self.ck.bytes(w).get(r0 * cols / 2..r1 * cols / 2);
        let sb = self.ck.bytes(s).get(r0 * cols / 32..r1 * cols / 32);
        let (Some(wb), Some(sb)) = (wb, sb) else {
            return Err(ReadError::Tensor { tensor: module.into(), why: "rows outside the stored tensor".into() });
        };
        let mut out = Vec::with_capacity((r1 - r0) * cols);
        for r in 0..r1 - r0 {
            ct::dequantize_mxfp4_row(
                &wb[r * cols / 2..(r + 1) * cols / 2],
                &sb[r * cols / 32..(r + 1) * cols / 32],
                &mut out,
            );
        }
        Ok(out)
    }

    fn affine_rows(
        &self,
        module: &str,
        bits: u32,
        group: usize,
        cols: usize,
        r0: u64,
        r1: u64,
    ) -> Result<Vec<f32>, ReadError> {
        let w = self.get(&format!("{module}.weight"))?;
        let s = self.get(&format!("{module}.scales"))?;
        let b = self.get(&format!("{module}.biases"))?;
        let words = cols * bits as usize / 32;
        let ng = cols / group.max(1);
        let wb = &self.ck.bytes(w)[(r0 as usize * words * 4)..(r1 as usize * words * 4)];
        let ses = s.dtype.block_bytes();
        let scales = scale_of(s, &self.ck.bytes(s)[r0 as usize * ng * ses..r1 as usize * ng * ses])?;
        let biases = scale_of(b, &self.ck.bytes(b)[r0 as usize * ng * ses..r1 as usize * ng * ses])?;
        let packed: Vec<u32> = wb.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut out = Vec::with_capacity((r1 - r0) as usize * cols);
        for r in 0..(r1 - r0) as usize {
            affine::dequantize_affine_row(
                &packed[r * words..(r + 1) * words],
                bits,
                group,
                cols,
                &scales[r * ng..(r + 1) * ng],
                &biases[r * ng..(r + 1) * ng],
                &mut out,
            );
        }
        Ok(out)
    }

    fn ct_rows(
        &self,
        module: &str,
        scheme: usize,
        rows: u64,
        cols: usize,
        i0: u64,
        i1: u64,
    ) -> Result<Vec<f32>, ReadError> {
        let Kind::CompressedTensors { schemes } = &self.kind else {
            return Err(ReadError::Missing(module.to_string()));
        };
        let CtScheme { format, bits, symmetric, group, block, .. } =
            schemes.get(scheme).ok_or_else(|| ReadError::Missing(module.to_string()))?;
        let (r0, r1) = (i0 as usize, i1 as usize);
        let scale_t = self.get(&format!("{module}.weight_scale"))?;
        let mut out = Vec::with_capacity((r1 - r0) * cols);
        let bad = |why: String| ReadError::Tensor { tensor: format!("{module}.weight_scale"), why };
        match format.as_str() {
            "pack-quantized" => {
                let p = self.get(&format!("{module}.weight_packed"))?;
                let words = (cols * *bits as usize).div_ceil(32);
                let g = group.unwrap_or(cols);
                let ng = cols / g.max(1);
                let ses = scale_t.dtype.block_bytes();
                let scales = scale_of(scale_t, &self.ck.bytes(scale_t)[r0 * ng * ses..r1 * ng * ses])?;
                if scales.len() != (r1 - r0) * ng {
                    return Err(bad(format!("{} scales for {} rows of {ng} groups", scales.len(), r1 - r0)));
                }
                let zeros = if *symmetric { None } else { Some(self.zero_points(module, rows as usize, ng, *bits)?) };
                let pb = &self.ck.bytes(p)[r0 * words * 4..r1 * words * 4];
                let packed: Vec<u32> =
                    pb.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                let mut codes = Vec::with_capacity(cols);
                for r in 0..(r1 - r0) {
                    codes.clear();
                    ct::unpack_row(&packed[r * words..(r + 1) * words], *bits, cols, &mut codes);
                    let z = zeros.as_ref().map(|z| &z[(r0 + r) * ng..(r0 + r + 1) * ng]);
                    ct::dequantize_int_row(&codes, &scales[r * ng..(r + 1) * ng], z, g, &mut out);
                }
            }
            "float-quantized" | "naive-quantized" => {
                let w = self.get(&format!("{module}.weight"))?;
                let codes = &self.ck.bytes(w)[r0 * cols..r1 * cols];
                let all = scale_of(scale_t, self.ck.bytes(scale_t))?;
                if *block {
                    let bc = cols.div_ceil(128);
                    for r in r0..r1 {
                        for (c, &code) in codes[(r - r0) * cols..(r - r0 + 1) * cols].iter().enumerate() {
                            let s = all
                                .get((r / 128) * bc + c / 128)
                                .copied()
                                .ok_or_else(|| bad("block scale missing".into()))?;
                            ct::dequantize_fp8(&[code], s, &mut out);
                        }
                    }
                } else {
                    for r in r0..r1 {
                        let s = all.get(r).copied().ok_or_else(|| bad("channel scale missing".into()))?;
                        ct::dequantize_fp8(&codes[(r - r0) * cols..(r - r0 + 1) * cols], s, &mut out);
                    }
                }
            }
            "nvfp4-pack-quantized" => {
                let p = self.get(&format!("{module}.weight_packed"))?;
                let gs = self.get(&format!("{module}.weight_global_scale"))?;
                let global = scale_of(gs, self.ck.bytes(gs))?.first().copied().unwrap_or(1.0);
                let pb = &self.ck.bytes(p)[r0 * cols / 2..r1 * cols / 2];
                let sb = &self.ck.bytes(scale_t)[r0 * cols / 16..r1 * cols / 16];
                for r in 0..(r1 - r0) {
                    ct::dequantize_nvfp4_row(
                        &pb[r * cols / 2..(r + 1) * cols / 2],
                        &sb[r * cols / 16..(r + 1) * cols / 16],
                        global,
                        &mut out,
                    );
                }
            }
            "mxfp4-pack-quantized" => {
                let p = self.get(&format!("{module}.weight_packed"))?;
                let pb = &self.ck.bytes(p)[r0 * cols / 2..r1 * cols / 2];
                let sb = &self.ck.bytes(scale_t)[r0 * cols / 32..r1 * cols / 32];
                for r in 0..(r1 - r0) {
                    ct::dequantize_mxfp4_row(
                        &pb[r * cols / 2..(r + 1) * cols / 2],
                        &sb[r * cols / 32..(r + 1) * cols / 32],
                        &mut out,
                    );
                }
            }
            f => {
                return Err(ReadError::Tensor {
                    tensor: module.to_string(),
                    why: format!("format {f:?} is not one sling reads"),
                })
            }
        }
        Ok(out)
    }

    fn zero_points(
        &self,
        module: &str,
        rows: usize,
        ng: usize,
        bits: u32,
    ) -> Result<std::sync::Arc<Vec<i8>>, ReadError> {
        if let Some(z) = self.zeros.lock().ok().and_then(|m| m.get(module).cloned()) {
            return Ok(z);
        }
        let t = self.get(&format!("{module}.weight_zero_point"))?;
        let words: Vec<u32> =
            self.ck.bytes(t).chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let z = std::sync::Arc::new(ct::unpack_zero_points(&words, rows, ng, bits));
        if let Ok(mut m) = self.zeros.lock() {
            m.insert(module.to_string(), z.clone());
        }
        Ok(z)
    }

    /// Drops the mapped pages read so far (between layers).
    pub fn release(&self) {
        self.ck.release_pages();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_resolves_by_name_then_pattern_then_class() {
        let group = |bits: u32, targets: &[&str]| {
            serde_json::json!({"format": "pack-quantized", "targets": targets,
                               "weights": {"num_bits": bits, "group_size": 128, "symmetric": true, "strategy": "group"}})
        };
        let q = serde_json::json!({"format": "mixed-precision", "config_groups": {
            "group_0": group(4, &["Linear"]),
            "group_1": group(8, &["re:.*experts\\.\\d+\\.down_proj$"]),
            "group_10": group(2, &["model.layers.0.mlp.experts.1.down_proj"]),
            "group_2": group(3, &["re:^model\\.layers\\.1\\."]),
        }});
        let s = ct_schemes(&q).unwrap();
        // Numbered order, not the keys' text order.
        assert_eq!(s.iter().map(|x| x.bits).collect::<Vec<_>>(), [4, 8, 3, 2]);
        assert_eq!(group_of(&s, "model.layers.0.mlp.experts.1.down_proj"), Some(3));
        assert_eq!(group_of(&s, "model.layers.0.mlp.experts.2.down_proj"), Some(1));
        assert_eq!(group_of(&s, "model.layers.1.self_attn.q_proj"), Some(2));
        assert_eq!(group_of(&s, "model.layers.0.self_attn.q_proj"), Some(0));
        assert_eq!(s[1].format, "pack-quantized");
        let bad = serde_json::json!({"config_groups": {"group_0": group(4, &["re:("])}});
        assert!(ct_schemes(&bad).unwrap_err().contains("group_0"));
    }
}
