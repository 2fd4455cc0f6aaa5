//! Compiles the host build of the GPU kernels (cu/host.cpp: the same source NVRTC compiles, run on the CPU), so
//! tests compare the kernels' bytes with the scalar reference on any machine. No fast math, no FMA contraction:
//! the IEEE operations of the reference in its order.
fn main() {
    for f in [
        "cu/host.cpp",
        "cu/host_ct.cpp",
        "cu/quant.cu",
        "cu/kquant_split.cu",
        "cu/ct.cu",
        "cu/shim.h",
        "cu/ggml_quants.cuh",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .file("cu/host.cpp")
        .file("cu/host_ct.cpp")
        .flag_if_supported("-std=c++17")
        .flag_if_supported("-ffp-contract=off")
        .flag_if_supported("-fno-fast-math")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-parameter")
        .opt_level(2)
        .compile("sling_kernels_host");
}
