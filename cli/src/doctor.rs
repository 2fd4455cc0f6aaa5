//! `sling doctor`: what this machine and build offer (CPU SIMD level, threads, CUDA driver, NVRTC, devices) and the
//! reference-tool versions sling's interop claims are pinned to.

use anyhow::Result;
use serde_json::json;

pub const AFTER_HELP: &str = "Examples:\n  sling doctor\n  sling doctor --json\n\n--compile-kernels sm_90 fills the kernel cache ($SLING_CACHE_DIR, else ~/.cache/sling) for a GPU of that \
architecture, so a machine without NVRTC can use it (scripts/gpu-check --prepare does this).";

#[derive(clap::Args)]
pub struct Args {
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Compile the GPU kernels for these architectures (e.g. sm_90) into the kernel cache and exit.
    #[arg(long, value_name = "ARCH", num_args = 1..)]
    compile_kernels: Vec<String>,
}

/// The reference tools the interop suite checks sling against (scripts/setup-reference.sh installs exactly these;
/// a test keeps the two lists equal).
pub const PINNED: &[(&str, &str)] = &[
    ("llama.cpp (llama-cpp-python sdist)", "0.3.36"),
    ("gguf", "0.19.0"),
    ("transformers", "5.24.0"),
    ("torch", "2.15.0"),
    ("compressed-tensors", "0.20.1"),
    ("mlx", "0.32.4"),
    ("mlx-lm", "0.32.2"),
    ("model-signing", "1.1.1"),
    ("llmcompressor", "0.14.0.1"),
];

pub fn run(a: Args) -> Result<()> {
    if !a.compile_kernels.is_empty() {
        let dir = sling_kernels::backend::default_cache_dir();
        for arch in &a.compile_kernels {
            let t0 = std::time::Instant::now();
            let (bin, from) = sling_kernels::cuda::cubin(arch, dir.as_deref())
                .map_err(|e| anyhow::anyhow!("--compile-kernels {arch}: {e}"))?;
            println!("{arch}: {} bytes from {from} in {:.1} s", bin.len(), t0.elapsed().as_secs_f64());
        }
        return Ok(());
    }
    let p = sling_kernels::probe_cuda();
    let threads = rayon::current_num_threads();
    let cpu = sling_kernels::cpu_path();
    let both = |r: &Result<String, String>| match r {
        Ok(v) => json!({ "ok": true, "version": v }),
        Err(e) => json!({ "ok": false, "error": e }),
    };
    let usable = p.driver.is_ok() && !p.devices.is_empty();
    let auto = if !p.built {
        "cpu (this build has no CUDA support: cargo feature `cuda`)".to_string()
    } else if usable {
        "cuda:0".to_string()
    } else {
        "cpu (no usable CUDA device)".to_string()
    };
    if a.json {
        let v = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "cpu": { "simd": cpu, "threads": threads },
            "cuda": {
                "built": p.built,
                "driver": both(&p.driver),
                "nvrtc": both(&p.nvrtc),
                "devices": p.devices,
            },
            "device_auto": auto,
            "reference_tools": PINNED.iter().map(|(k, v)| json!({ "tool": k, "version": v })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let line = |r: &Result<String, String>| match r {
        Ok(v) => v.clone(),
        Err(e) => format!("not available: {e}"),
    };
    println!("sling {}", env!("CARGO_PKG_VERSION"));
    println!("cpu:          {cpu}, {threads} threads");
    println!(
        "cuda support: {}",
        if p.built { "built in (cudarc, loaded at run time)" } else { "not built (cargo feature `cuda`)" }
    );
    if p.built {
        println!("cuda driver:  {}", line(&p.driver));
        println!("nvrtc:        {}", line(&p.nvrtc));
        if p.devices.is_empty() {
            println!("devices:      none");
        }
        for d in &p.devices {
            println!("device:       {d}");
        }
    }
    println!("--device auto uses: {auto}");
    println!("reference tools the interop tests pin:");
    for (k, v) in PINNED {
        println!("  {k} {v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pins_match_the_setup_script() {
        let script = include_str!("../../scripts/setup-reference.sh");
        for (tool, v) in super::PINNED {
            let name = tool.split(' ').next().unwrap();
            let spec = if name == "llama.cpp" { format!("VER={v}") } else { format!("{name}=={v}") };
            assert!(script.contains(&spec), "{spec} not in scripts/setup-reference.sh");
        }
    }
}
