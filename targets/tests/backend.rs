//! The vLLM and MLX targets encode round-to-nearest rows through the backend seam
//! (`sling_kernels::Backend::encode_rows`), and the bytes do not depend on the backend: a backend running the host
//! build of the GPU kernels (`cu/ct.cu`, the very source NVRTC compiles) writes every part of every weight exactly
//! as the default (the Rust reference) does, for every vLLM scheme and MLX width. On a GPU the CUDA backend is
//! checked the same way by `scripts/gpu-check` (`--device cuda` = `--device cpu`, file for file).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sling_formats::checkpoint::Checkpoint;
use sling_kernels::encode::{self, EncodedRows, RowEncoding};
use sling_kernels::{Backend, KernelError};
use sling_pipeline::exec::part_sha256;
use sling_targets::{mlx, vllm};

/// The host build of the GPU kernels behind the seam; counts the windows it encodes.
#[derive(Default)]
struct HostKernels {
    calls: AtomicU64,
}

impl Backend for HostKernels {
    fn describe(&self) -> String {
        "host build of cu/ct.cu".into()
    }
    fn encode_rows(
        &self,
        enc: &RowEncoding,
        x: &[f32],
        n_per_row: usize,
        out: &mut EncodedRows,
    ) -> Result<(), KernelError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(encode::host_encode_rows(enc, x, n_per_row, out)?)
    }
}

fn fixture(name: &str) -> Checkpoint {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name);
    Checkpoint::open(&p).unwrap()
}

#[test]
fn vllm_schemes_write_the_same_bytes_through_the_kernels() {
    for fx in ["qwen3moe", "llama"] {
        let ck = fixture(fx);
        for name in vllm::SCHEMES {
            let scheme = vllm::Scheme::parse(name).unwrap();
            let plan = vllm::plan(&ck, scheme, false).unwrap();
            let host = Arc::new(HostKernels::default());
            let plain = vllm::Vllm { scheme, solved: None, backend: None };
            let kernels = vllm::Vllm { scheme, solved: None, backend: Some(host.clone()) };
            for i in 0..plan.weights.len() {
                assert_eq!(
                    part_sha256(&plain, &ck, &plan, i, false).unwrap(),
                    part_sha256(&kernels, &ck, &plan, i, false).unwrap(),
                    "{fx} {name} {}",
                    plan.weights[i].name
                );
            }
            assert!(host.calls.load(Ordering::Relaxed) > 0, "{fx} {name}: the backend was not used");
        }
    }
}

#[test]
fn mlx_widths_write_the_same_bytes_through_the_kernels() {
    for fx in ["qwen3moe", "llama"] {
        let ck = fixture(fx);
        for (bits, group) in [(2, 64), (3, 64), (4, 32), (4, 64), (5, 128), (6, 64), (8, 64)] {
            let p = mlx::plan(&ck, mlx::Bits(bits), group, false).unwrap();
            let host = Arc::new(HostKernels::default());
            let plain = mlx::Mlx::default();
            let kernels = mlx::Mlx { solved: None, backend: Some(host.clone()) };
            for i in 0..p.plan.weights.len() {
                assert_eq!(
                    part_sha256(&plain, &ck, &p.plan, i, false).unwrap(),
                    part_sha256(&kernels, &ck, &p.plan, i, false).unwrap(),
                    "{fx} mlx:{bits} group {group} {}",
                    p.plan.weights[i].name
                );
            }
            assert!(host.calls.load(Ordering::Relaxed) > 0, "{fx} mlx:{bits}: the backend was not used");
        }
    }
}
