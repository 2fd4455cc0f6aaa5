//! Writes a deterministic set of tensors with `sling_formats::st_write`, for the interop test
//! (`tests/interop/test_st_write.py`), which compares the files with what `safetensors` / huggingface_hub write.
//!
//! Usage: st_write_demo OUT_DIR [--max-shard-bytes N] [--prefix P] [--metadata K=V]... [--piece N]
//!                      [--total-parameters N] [TENSOR...]
//! TENSOR: NAME:DTYPE:D0xD1x...  (DTYPE in safetensors spelling, e.g. BF16, F8_E4M3; empty dims for a scalar)
//! Without TENSORs a built-in seeded set is used. Data of each tensor: bytes of a 64-bit LCG seeded by an FNV-1a
//! hash of its name (see `data_for`), which the Python side reproduces. Writes the shards, the index (when there
//! is more than one shard, as transformers does) and prints a JSON report (tensors as given, layout order, Written)
//! on stdout.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sling_core::DType;
use sling_formats::st_write::{layout, ShardWriter, StTensor};

/// Bool tensors get 0/1 bytes (torch would not round-trip other values).
fn data_for(t: &StTensor) -> Vec<u8> {
    let mask = if t.dtype == DType::Bool { 1 } else { 0xff };
    let mut x: u64 = t.name.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (0..t.n_bytes())
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8 & mask
        })
        .collect()
}

fn default_set() -> Vec<StTensor> {
    let s = |n: &str, d: DType, shape: &[u64]| StTensor::new(n, d, shape.to_vec());
    vec![
        s("model.embed_tokens.weight", DType::BF16, &[64, 16]),
        s("model.layers.0.mlp.experts.gate_up.weight", DType::F8E4M3, &[4, 32, 16]),
        s("model.layers.0.mlp.experts.gate_up.weight_scale_inv", DType::F32, &[4, 1, 1]),
        s("model.layers.0.mlp.experts.down.qweight", DType::U32, &[4, 16, 4]),
        s("model.layers.0.mlp.experts.down.scales", DType::U8, &[4, 16, 2]),
        s("model.layers.0.self_attn.q_proj.g_idx", DType::I32, &[16]),
        s("model.layers.0.input_layernorm.weight", DType::F32, &[16]),
        s("model.layers.0.position_ids", DType::I64, &[1, 8]),
        s("model.layers.0.mlp.gate.weight", DType::BF16, &[4, 16]),
        s("model.norm.weight", DType::F16, &[16]),
        s("model.step", DType::I64, &[]),
        s("lm_head.weight", DType::BF16, &[64, 16]),
        s("model.layers.1.mlp.experts.gate_up.weight", DType::F8E4M3, &[4, 32, 16]),
        s("model.layers.1.mask", DType::Bool, &[7]),
        s("model.layers.1.i8", DType::I8, &[5]),
        s("model.layers.1.i16", DType::I16, &[3]),
        s("model.layers.1.f64", DType::F64, &[2]),
        s("model.layers.1.e5m2", DType::F8E5M2, &[3]),
        s("model.empty", DType::F32, &[0, 3]),
    ]
}

fn parse_tensor(spec: &str) -> Result<StTensor, String> {
    let mut it = spec.rsplitn(3, ':');
    let (dims, dtype, name) = match (it.next(), it.next(), it.next()) {
        (Some(d), Some(t), Some(n)) => (d, t, n),
        _ => return Err(format!("bad tensor spec {spec:?} (NAME:DTYPE:DIMS)")),
    };
    let dtype = DType::from_safetensors(dtype).ok_or_else(|| format!("unknown dtype {dtype:?}"))?;
    let shape = if dims.is_empty() {
        vec![]
    } else {
        dims.split('x').map(|d| d.parse::<u64>().map_err(|e| format!("dim {d:?}: {e}"))).collect::<Result<_, _>>()?
    };
    Ok(StTensor::new(name, dtype, shape))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out: PathBuf = args.next().ok_or("usage: st_write_demo OUT_DIR [options] [TENSOR...]")?.into();
    let mut max = None;
    let mut prefix = "model".to_string();
    let mut metadata = BTreeMap::new();
    let mut piece = 4093usize;
    let mut total_parameters: Option<u64> = None;
    let mut tensors = Vec::new();
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--max-shard-bytes" => max = Some(val()?.parse()?),
            "--prefix" => prefix = val()?,
            "--piece" => piece = val()?.parse()?,
            "--total-parameters" => total_parameters = Some(val()?.parse()?),
            "--metadata" => {
                let kv = val()?;
                let (k, v) = kv.split_once('=').ok_or("--metadata K=V")?;
                metadata.insert(k.to_string(), v.to_string());
            }
            _ => tensors.push(parse_tensor(&a)?),
        }
    }
    if tensors.is_empty() {
        tensors = default_set();
    }
    let given: Vec<serde_json::Value> =
        tensors.iter().map(|t| serde_json::json!([t.name, t.dtype.info().safetensors, t.shape])).collect();
    let md = if metadata.is_empty() { None } else { Some(&metadata) };
    let lay = layout(tensors, max, &prefix, md)?;
    let extra: Vec<(&str, serde_json::Value)> =
        total_parameters.map(|n| ("total_parameters", serde_json::Value::from(n))).into_iter().collect();
    let index = lay.index_json(&extra);
    let n_shards = lay.shards.len();
    let order: Vec<(String, String)> =
        lay.tensors().map(|(s, t)| (t.name.clone(), lay.shards[s].file_name.clone())).collect();
    let stream: Vec<Vec<u8>> = lay.tensors().map(|(_, t)| data_for(t)).collect();
    let mut w = ShardWriter::create(&out, lay)?;
    // Feed the concatenated data in fixed-size pieces that straddle tensor and file boundaries.
    let all: Vec<u8> = stream.concat();
    for chunk in all.chunks(piece.max(1)) {
        w.write(chunk)?;
    }
    let written = w.finish()?;
    if n_shards > 1 {
        std::fs::write(out.join(format!("{prefix}.safetensors.index.json")), &index)?;
    }
    let report = serde_json::json!({
        "given": given,
        "order": order,
        "files": written.files,
        "tensors": written.tensors,
        "index": index,
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
