//! `sensitivity::probe_kld` and `Substituted`, on every MoE fixture: a probe whose substituted rows are the
//! source's own gives KL 0 exactly; a perturbed tensor's probe, carried from its layer on the clean states, gives
//! exactly the KL of a whole forward pass of the model with that tensor perturbed (the branching is exact); and the
//! perturbation is seen (KL > 0).

use std::path::{Path, PathBuf};

use sling_calibration::sensitivity::{probe_kld, At, Probe, Rows, Substituted};
use sling_calibration::{CheckpointSource, Evaluator, Model, TensorSource};
use sling_formats::checkpoint::Checkpoint;
use sling_kernels::backend::CpuBackend;
use sling_pipeline::ops::Op;
use sling_target_gguf::convert::plan::{plan, OutTensor, OutType};
use sling_target_gguf::convert::run::read_f32;

const CTX: usize = 12;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
    let mut v: Vec<PathBuf> = ["qwen3moe", "mixtral", "deepseekv3", "olmoe", "qwen2", "gptoss", "gptoss-mxfp4"]
        .iter()
        .map(|n| root.join(n))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    v.sort();
    assert!(v.len() >= 4, "fixtures missing under {}", root.display());
    v
}

/// The GGUF tensor's rows as the source holds them, times `scale`.
fn rows<'a>(ck: &'a Checkpoint, t: &'a OutTensor, scale: f32) -> Rows<'a> {
    Box::new(move |r0, r1| {
        let mut v = Vec::new();
        read_f32(ck, t, r0, r1, &mut v, &CpuBackend::default())
            .map_err(|e| sling_calibration::Error::Read { tensor: t.name.clone(), why: e.to_string() })?;
        v.iter_mut().for_each(|x| *x *= scale);
        Ok(v)
    })
}

fn kld_of_whole_pass(reference: &Model, cand: &Model, chunks: &[Vec<u32>]) -> f64 {
    let mut ev = Evaluator::new(CTX);
    let r = reference.logits(chunks, None).unwrap();
    let q = cand.logits(chunks, None).unwrap();
    for ((c, r), q) in chunks.iter().zip(&r).zip(&q) {
        ev.add_chunk(c, r, q).unwrap();
    }
    ev.report().kld_mean
}

#[test]
fn probes_are_exact_branches_of_the_forward_pass() {
    let chunks: Vec<Vec<u32>> =
        vec![(0..CTX as u32).map(|i| 7 + 13 * i).collect(), (0..CTX as u32).map(|i| 90 + 5 * i).collect()];
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let ck = Checkpoint::open(&dir).unwrap();
        let cfg = ck.config.clone().unwrap();
        let p = plan(&ck, OutType::F32).unwrap();
        let src = CheckpointSource::new(&ck);
        let reference = Model::new(&src, &cfg).unwrap();
        let last = reference.spec().n_layers - 1;
        // An attention projection of layer 0, the last layer's feed-forward down projection (stacked experts where
        // the model has them) and the embedding.
        let pick =
            |want: &dyn Fn(&str) -> bool| p.tensors.iter().find(|t| want(&t.name)).unwrap_or_else(|| panic!("{name}"));
        let cases: Vec<(&OutTensor, At)> = vec![
            (pick(&|n| n == "blk.0.attn_output.weight"), At::Layer(0)),
            (pick(&|n| n.starts_with(&format!("blk.{last}.ffn_down")) && !n.contains("shexp")), At::Layer(last)),
            (pick(&|n| n == "token_embd.weight"), At::Embedding),
        ];
        for (t, at) in cases {
            if matches!(t.op, Op::Mxfp4(_) | Op::Gguf(_)) {
                // MXFP4 codes copied as they are (gpt-oss): nothing to substitute, and a clear error says so.
                assert!(Substituted::new(&src, t, rows(&ck, t, 1.0)).is_err(), "{name} {}", t.name);
                continue;
            }
            let same = Substituted::new(&src, t, rows(&ck, t, 1.0)).unwrap();
            let off = Substituted::new(&src, t, rows(&ck, t, 1.25)).unwrap();
            let (m_same, m_off) = (Model::new(&same, &cfg).unwrap(), Model::new(&off, &cfg).unwrap());
            let probes = [Probe { at, model: &m_same }, Probe { at, model: &m_off }];
            let k = probe_kld(&reference, &probes, &chunks, CTX, 2, &mut |_, _| {}).unwrap();
            assert_eq!(k[0], 0.0, "{name} {}: the source's own rows", t.name);
            assert!(k[1] > 0.0, "{name} {}: a 25 % perturbation not seen", t.name);
            let whole = kld_of_whole_pass(&reference, &m_off, &chunks);
            assert_eq!(k[1], whole, "{name} {}: probe vs whole forward pass", t.name);
        }
    }
}

/// Outputs made of one source tensor (DeepSeek's `kv_b_proj` → `attn_k_b`/`attn_v_b`, gpt-oss's `gate_up_proj` →
/// `ffn_gate_exps`/`ffn_up_exps`): substituted together, each puts back its own elements. The outputs hold every
/// element, so nothing of the source is read: an output left out would leave zeros.
#[test]
fn outputs_of_one_source_tensor_are_all_put_back() {
    let mut seen = 0;
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let ck = Checkpoint::open(&dir).unwrap();
        let p = plan(&ck, OutType::F32).unwrap();
        let src = CheckpointSource::new(&ck);
        let mut by_source: std::collections::BTreeMap<String, Vec<&OutTensor>> = Default::default();
        for t in p.tensors.iter().filter(|t| !matches!(t.op, Op::Mxfp4(_) | Op::Gguf(_))) {
            let mut names = Vec::new();
            t.op.sources(&mut names);
            if let [one] = &names[..] {
                by_source.entry(one.clone()).or_default().push(t);
            }
        }
        for (source, outs) in by_source.iter().filter(|(_, o)| o.len() > 1) {
            let want = src.read(source).unwrap();
            for scale in [1.0f32, 2.0] {
                let outputs =
                    outs.iter().map(|t| (&t.op, t.ne.first().copied().unwrap_or(1), rows(&ck, t, scale))).collect();
                let s = Substituted::of_ops(&src, outputs);
                let got = s.read(source).unwrap();
                let scaled: Vec<f32> = want.iter().map(|x| x * scale).collect();
                assert_eq!(got, scaled, "{name} {source}: {} outputs, ×{scale}", outs.len());
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "no fixture makes two outputs of one source tensor ({seen})");
}
