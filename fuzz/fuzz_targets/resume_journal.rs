//! The resume journal (`OUT.partial.json`): `GgufWriter::create_resumable` with `resume` on, over the partial
//! files of an interrupted two-shard run whose journal is the fuzzed input. A journal is a claim that is
//! re-checked, never trusted: whatever it says (hostile offsets, sizes, names like `../victim.gguf`, shard
//! indices out of range, garbage lines), the writer must reuse only tensors whose bytes re-hash to what the plan
//! needs, the finished output must be byte-identical to an uninterrupted run, and nothing outside the output's
//! directory may be created or touched. The input is the journal itself, or edits of the genuine one
//! (`common::edit`).
#![no_main]
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sling_core::DType;
use sling_formats::gguf::write::Resumable;
use sling_formats::gguf::{GgufValue, GgufWriter, SplitPolicy, TensorDesc};

#[path = "common.rs"]
mod common;

const N: usize = 6;

fn plan() -> (Vec<(String, GgufValue)>, Vec<TensorDesc>) {
    let kvs = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
    let tensors = (0..N).map(|i| TensorDesc::new(format!("t{i}"), DType::F32, vec![8 + 8 * i as u64, 2])).collect();
    (kvs, tensors)
}

/// Tensor `i`'s bytes.
fn bytes(i: usize) -> Vec<u8> {
    (0..(8 + 8 * i) * 2 * 4).map(|j| (i * 31 + j * 7) as u8).collect()
}

fn writer(out: &Path, resume: bool) -> Result<GgufWriter, sling_formats::gguf::GgufError> {
    let (kvs, tensors) = plan();
    let r = Resumable { fingerprint: "fuzz-v1".into(), resume, interval: Duration::ZERO };
    GgufWriter::create_resumable(out, kvs, tensors, SplitPolicy::MaxTensors(3), true, Some(r))
}

/// Writes every tensor still pending, then finishes.
fn complete(mut w: GgufWriter) -> Vec<std::path::PathBuf> {
    while let Some((name, _)) = w.pending() {
        let i: usize = name[1..].parse().unwrap();
        w.write_data(&bytes(i)).unwrap();
    }
    w.finish().unwrap()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

struct Setup {
    /// The uninterrupted run's files.
    want: Vec<(String, Vec<u8>)>,
    /// The partial files of a run stopped after 4 tensors (the journal among them).
    partial: Vec<(String, Vec<u8>)>,
    /// That run's journal.
    journal: Vec<u8>,
}

fn setup(d: &Path) -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let full = d.join("full");
        std::fs::create_dir_all(&full).unwrap();
        complete(writer(&full.join("m.gguf"), false).unwrap());
        let part = d.join("part");
        std::fs::create_dir_all(&part).unwrap();
        let mut w = writer(&part.join("m.gguf"), false).unwrap();
        for i in 0..4 {
            w.write_data(&bytes(i)).unwrap();
        }
        w.keep_partial(true);
        drop(w);
        let partial = files(&part);
        let journal = partial.iter().find(|(n, _)| n.ends_with(".partial.json")).expect("a journal").1.clone();
        Setup { want: files(&full), partial, journal }
    })
}

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("resume_journal");
    let s = setup(&d);
    let run = d.join("run");
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).unwrap();
    let journal = common::edit(&s.journal, data);
    for (name, b) in &s.partial {
        common::put(&run, name, if name.ends_with(".partial.json") { &journal } else { b });
    }
    let before: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
    if let Ok(w) = writer(&run.join("m.gguf"), true) {
        assert!(w.resumed().tensors <= 4, "reused more tensors than were ever written: {:?}", w.resumed());
        complete(w);
        assert_eq!(files(&run), s.want, "resumed output differs from the uninterrupted run");
    }
    let after: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "a file appeared or vanished next to the output's directory");
});
