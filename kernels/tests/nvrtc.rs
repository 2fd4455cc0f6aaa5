//! Every kernel compiles through NVRTC for the architectures sling targets (sm_80: A100, sm_90: H100/H200), with
//! the options the CUDA backend uses. NVRTC needs no GPU: the `nvidia-cuda-nvrtc` wheel provides libnvrtc.so
//! (scripts/setup-reference.sh installs it and scripts/test puts it on LD_LIBRARY_PATH). With
//! `SLING_REQUIRE_NVRTC=1` (set by scripts/test) a missing NVRTC fails the test instead of skipping it.
#![cfg(feature = "cuda")]

use sling_kernels::cu;
use sling_kernels::cuda;

fn nvrtc_or_skip() -> bool {
    match cuda::nvrtc_version() {
        Ok(_) => true,
        Err(e) if std::env::var_os("SLING_REQUIRE_NVRTC").is_some_and(|v| v == "1") => {
            panic!("SLING_REQUIRE_NVRTC=1 but NVRTC cannot be loaded: {e}")
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let cubin = cuda::compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        // An ELF image holding every kernel's symbol.
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}");
        let has = |name: &str| {
            cubin.windows(name.len() + 1).any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
        };
        for &t in cu::TYPES {
            for name in [cu::kernel_name(t).unwrap(), cu::dequant_kernel_name(t).unwrap()] {
                assert!(has(&name), "{arch}: {name} missing from the CUBIN");
            }
        }
        for &(t, _) in cu::SPLIT {
            for name in [format!("sling_sub_{}_k", t.name()), format!("sling_fin_{}_k", t.name())] {
                assert!(has(&name), "{arch}: {name} missing from the CUBIN");
            }
        }
        assert!(has(cu::ROW_SIGMA2), "{arch}");
        for name in sling_kernels::encode::KERNELS {
            assert!(has(name), "{arch}: {name} missing from the CUBIN");
        }
    }
}

#[test]
fn compiled_kernels_are_cached_on_disk_and_reused() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sling-kcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (a, from_a) = cuda::cubin("sm_90", Some(&dir)).unwrap();
    let (b, from_b) = cuda::cubin("sm_90", Some(&dir)).unwrap();
    assert_eq!((from_a, from_b), ("nvrtc", "cache"));
    assert_eq!(a, b);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
