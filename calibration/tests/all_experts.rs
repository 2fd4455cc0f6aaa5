//! `Model::all_experts`: with an observer installed every routed expert sees every token, while the forward
//! pass keeps the true routing (hidden states and logits unchanged, bit for bit), on every MoE fixture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sling_calibration::{CheckpointSource, LinearInput, Model, Observer};
use sling_formats::checkpoint::Checkpoint;

const IDS: [u32; 16] = [342, 223, 83, 87, 296, 77, 264, 84, 328, 80, 305, 81, 90, 223, 76, 87];

fn moe_fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            !n.starts_with("llama") && n != "qwen2"
        })
        .collect();
    v.sort();
    assert!(v.len() >= 10, "MoE fixtures missing under {}", root.display());
    v
}

/// Rows per (tensor, expert), the routing reported per layer, and the token lists of routed inputs.
#[derive(Default)]
struct Seen {
    rows: BTreeMap<(String, Option<usize>), usize>,
    routing: BTreeMap<usize, Vec<u64>>,
    layers_done: Vec<usize>,
}

impl Observer for Seen {
    fn linear_input(&mut self, x: &LinearInput<'_>) {
        let n = x.rows.len() / x.n_cols;
        if let Some(t) = x.tokens {
            assert_eq!(t.len(), n, "{}", x.tensor);
        }
        *self.rows.entry((x.tensor.to_string(), x.expert)).or_default() += n;
    }
    fn routing(&mut self, layer: usize, counts: &[u64]) {
        let r = self.routing.entry(layer).or_insert_with(|| vec![0; counts.len()]);
        r.iter_mut().zip(counts).for_each(|(a, c)| *a += c);
    }
    fn layer_done(&mut self, layer: usize) {
        self.layers_done.push(layer);
    }
}

#[test]
fn all_experts_observes_every_expert_and_keeps_the_forward_pass() {
    let seqs = vec![IDS.to_vec(), IDS[2..11].iter().rev().copied().collect()];
    let n_tok: usize = seqs.iter().map(Vec::len).sum();
    for dir in moe_fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let ck = Checkpoint::open(&dir).unwrap();
        let cfg = ck.config.clone().unwrap();
        let src = CheckpointSource::new(&ck);
        let plain = Model::new(&src, &cfg).unwrap();
        let all = Model::new(&src, &cfg).unwrap().all_experts(true);
        let n_layers = plain.spec().n_layers;

        // no observer: all_experts changes nothing
        let h0 = plain.hidden_states(&seqs, None).unwrap();
        assert_eq!(all.hidden_states(&seqs, None).unwrap(), h0, "{name}");
        // with an observer: the same hidden states and logits, bit for bit
        let mut routed = Seen::default();
        let mut every = Seen::default();
        assert_eq!(plain.hidden_states(&seqs, Some(&mut routed)).unwrap(), h0, "{name}");
        assert_eq!(all.hidden_states(&seqs, Some(&mut every)).unwrap(), h0, "{name}: all_experts changed the output");
        assert_eq!(
            all.logits(&seqs, Some(&mut Seen::default())).unwrap(),
            plain.logits(&seqs, None).unwrap(),
            "{name}: all_experts changed the logits"
        );

        assert_eq!(every.layers_done, (0..n_layers).collect::<Vec<_>>(), "{name}");
        assert!(!routed.routing.is_empty(), "{name}: no MoE layer reported its routing");
        assert_eq!(every.routing, routed.routing, "{name}: the routing changed");
        for ((tensor, expert), rows) in &every.rows {
            match expert {
                // every expert of every MoE layer, on every token
                Some(_) => assert_eq!(*rows, n_tok, "{name}: {tensor} {expert:?}"),
                // everything else exactly as without all_experts
                None => assert_eq!(Some(rows), routed.rows.get(&(tensor.clone(), None)), "{name}: {tensor}"),
            }
        }
        for (&layer, counts) in &every.routing {
            for (e, &c) in counts.iter().enumerate() {
                // routed rows without all_experts = the reported routing (absent when no token was routed)
                let plain_rows = routed
                    .rows
                    .iter()
                    .filter(|((t, x), _)| *x == Some(e) && t.starts_with(&format!("blk.{layer}.")))
                    .map(|(_, &r)| r as u64)
                    .collect::<Vec<_>>();
                let want = if c == 0 { vec![] } else { vec![c; 3] };
                assert_eq!(plain_rows, want, "{name}: layer {layer} expert {e}");
                let all_rows = every
                    .rows
                    .iter()
                    .filter(|((t, x), _)| *x == Some(e) && t.starts_with(&format!("blk.{layer}.")))
                    .count();
                assert_eq!(all_rows, 3, "{name}: layer {layer} expert {e}: gate, up and down observed");
            }
        }
    }
}
