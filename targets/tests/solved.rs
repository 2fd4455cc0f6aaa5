//! A solved-weight store (`sling_pipeline::solved`) filled with round-to-nearest solutions gives byte for byte the
//! artifact the plain RTN targets write; stored codes are what the targets write.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sling_formats::checkpoint::Checkpoint;
use sling_pipeline::exec::part_sha256;
use sling_pipeline::solved::Store;
use sling_pipeline::{Target, Weight};
use sling_quantizers::gptq;
use sling_targets::{mlx, vllm};

fn fixture(name: &str) -> Checkpoint {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name);
    Checkpoint::open(&p).unwrap()
}

fn values<E>(ck: &Checkpoint, w: &Weight<E>) -> Vec<f32> {
    let mut v = Vec::new();
    w.op.read(ck, 0, w.rows(), &mut v).unwrap();
    v
}

/// Every weight with a grid, as `rtn` solves it, stored under its Hugging Face name(s). Returns how many.
fn fill<E>(
    ck: &Checkpoint,
    weights: &[Weight<E>],
    store: &Store,
    grid: impl Fn(&E) -> Option<(Box<dyn gptq::Grid>, Vec<String>)>,
) -> usize {
    let mut n = 0;
    for w in weights {
        let Some((g, experts)) = grid(&w.enc) else { continue };
        let (rows, cols) = (w.rows() as usize, w.cols() as usize);
        let v = values(ck, w);
        if experts.is_empty() {
            store.put(&w.name, g.group(), &gptq::rtn(&v, rows, cols, g.as_ref()).unwrap()).unwrap();
            n += 1;
        } else {
            let per = rows / experts.len();
            for (e, name) in experts.iter().enumerate() {
                let s = gptq::rtn(&v[e * per * cols..(e + 1) * per * cols], per, cols, g.as_ref()).unwrap();
                store.put(name, g.group(), &s).unwrap();
                n += 1;
            }
        }
    }
    n
}

#[test]
fn vllm_int_schemes_from_an_rtn_store_are_byte_identical() {
    let ck = fixture("qwen3moe");
    for scheme in
        [vllm::Scheme::W4A16 { symmetric: true }, vllm::Scheme::W4A16 { symmetric: false }, vllm::Scheme::W8A16]
    {
        let plan = vllm::plan(&ck, scheme, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let n = fill(&ck, &plan.weights, &store, |e| vllm::grid(e).map(|g| (g, Vec::new())));
        assert!(n > 0);
        let plain = vllm::Vllm { scheme, solved: None, backend: None };
        let solved = vllm::Vllm { scheme, solved: Some(store.clone()), backend: None };
        for i in 0..plan.weights.len() {
            assert_eq!(
                part_sha256(&plain, &ck, &plan, i, false).unwrap(),
                part_sha256(&solved, &ck, &plan, i, false).unwrap(),
                "{:?} {}",
                scheme,
                plan.weights[i].name
            );
        }
    }
}

fn encode_in_chunks<T: Target>(t: &T, ck: &Checkpoint, w: &Weight<T::Enc>, chunk: usize) -> Vec<Vec<u8>> {
    let (rows, cols) = (w.rows() as usize, w.cols() as usize);
    let v = values(ck, w);
    let mut out = vec![Vec::new(); w.parts.len()];
    let mut r = 0;
    while r < rows {
        let n = chunk.min(rows - r);
        t.encode(w, r as u64, &v[r * cols..(r + n) * cols], None, &mut out).unwrap();
        r += n;
    }
    out
}

#[test]
fn mlx_from_an_rtn_store_is_byte_identical_per_expert() {
    let ck = fixture("qwen3moe");
    for (bits, group) in [(4, 32), (3, 64), (8, 32)] {
        let p = mlx::plan(&ck, mlx::Bits(bits), group, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let experts = |e: &mlx::Enc| match e {
            mlx::Enc::Affine { experts, .. } => experts.clone(),
            mlx::Enc::Keep(_) | mlx::Enc::Raw { .. } => Vec::new(),
        };
        let n = fill(&ck, &p.plan.weights, &store, |e| mlx::grid(e).map(|g| (g, experts(e))));
        assert!(n > 0);
        let stacked = p.plan.weights.iter().filter(|w| !experts(&w.enc).is_empty()).count();
        assert!(stacked > 0, "the fixture has stacked experts");
        let plain = mlx::Mlx::default();
        let solved = mlx::Mlx { solved: Some(store.clone()), backend: None };
        for i in 0..p.plan.weights.len() {
            assert_eq!(
                part_sha256(&plain, &ck, &p.plan, i, false).unwrap(),
                part_sha256(&solved, &ck, &p.plan, i, false).unwrap(),
                "{}",
                p.plan.weights[i].name
            );
        }
        // Chunks that split experts (and rows of one expert across chunks) read the right rows of the right expert.
        for w in p.plan.weights.iter().filter(|w| !experts(&w.enc).is_empty()) {
            let whole = encode_in_chunks(&plain, &ck, w, usize::MAX);
            for chunk in [1, 5, 7, 64] {
                assert_eq!(encode_in_chunks(&solved, &ck, w, chunk), whole, "{} chunk {chunk}", w.name);
            }
        }
    }
}

#[test]
fn stored_codes_are_what_the_targets_write() {
    let ck = fixture("qwen3moe");
    // MLX: replace one expert's codes; only that expert's rows change, to exactly those codes.
    let p = mlx::plan(&ck, mlx::Bits(4), 32, false).unwrap();
    let w = p
        .plan
        .weights
        .iter()
        .find(|w| matches!(&w.enc, mlx::Enc::Affine { experts, .. } if !experts.is_empty()))
        .unwrap();
    let mlx::Enc::Affine { experts, .. } = &w.enc else { unreachable!() };
    let g = mlx::grid(&w.enc).unwrap();
    let (rows, cols) = (w.rows() as usize, w.cols() as usize);
    let per = rows / experts.len();
    let v = values(&ck, w);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut s = gptq::rtn(&v[per * cols..2 * per * cols], per, cols, g.as_ref()).unwrap();
    s.codes.iter_mut().for_each(|c| *c = 5);
    store.put(&experts[1], g.group(), &s).unwrap();
    let plain = encode_in_chunks(&mlx::Mlx::default(), &ck, w, 3);
    let solved = encode_in_chunks(&mlx::Mlx { solved: Some(store), backend: None }, &ck, w, 3);
    let row_bytes = cols * 4 / 8; // 4-bit codes
    let (a, b) = (&plain[0], &solved[0]);
    assert_eq!(a[..per * row_bytes], b[..per * row_bytes]);
    assert!(b[per * row_bytes..2 * per * row_bytes].iter().all(|&x| x == 0x55));
    assert_eq!(a[2 * per * row_bytes..], b[2 * per * row_bytes..]);
    assert_eq!(plain[1], solved[1]);

    // vLLM: a store built for another grid is an error, not silently other bytes.
    let plan = vllm::plan(&ck, vllm::Scheme::W4A16 { symmetric: true }, false).unwrap();
    let w = plan.weights.iter().find(|w| vllm::grid(&w.enc).is_some()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let other = sling_quantizers::mlx::AffineGrid { bits: 4, group: 32, sd: sling_quantizers::ct::ScaleDtype::BF16 };
    let v = values(&ck, w);
    store.put(&w.name, 32, &gptq::rtn(&v, w.rows() as usize, w.cols() as usize, &other).unwrap()).unwrap();
    let t = vllm::Vllm { scheme: vllm::Scheme::W4A16 { symmetric: true }, solved: Some(store), backend: None };
    let mut out = vec![Vec::new(); w.parts.len()];
    let err = t.encode(w, 0, &v, None, &mut out).unwrap_err();
    assert!(matches!(err, sling_pipeline::EncodeError::SolvedShape { stored_group: 32, group: 128, .. }), "{err}");
    assert!(err.to_string().contains("groups of"), "{err}");
}
