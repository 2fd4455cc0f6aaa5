//! `sling`: convert and quantize open-weight MoE checkpoints into verified artifacts.
//!
//! Exit codes: 0 success; 2 usage or input error (bad flags, unreadable or malformed input,
//! unsupported architecture, refused output path; for `verify`: could not check); 1 a check failed
//! (`verify` found a mismatch, `eval`/`quantize --eval` above `--max-kld`); 3 internal error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod auto;
mod calibrate;
mod convert;
mod dequantize;
mod doctor;
mod eval;
mod gptq_layer;
mod hfout;
mod inspect;
mod logits;
mod quantize;
mod sign;
mod solve;
mod textdata;
mod verify;

/// Exit code for usage and input errors.
pub const EXIT_INPUT: u8 = 2;

#[derive(Parser)]
#[command(
    name = "sling",
    version,
    about = "Convert and quantize open-weight Mixture-of-Experts checkpoints into verified artifacts",
    long_about = "sling reads Hugging Face safetensors checkpoints lazily (headers first, tensor bytes through mmap \
on demand) and writes artifacts for llama.cpp/ollama (GGUF), vLLM/SGLang (compressed-tensors) and MLX (mlx-lm), \
each with a provenance manifest, in bounded memory and in parallel.",
    after_help = "Examples (they run as written from the repository root, on its fixtures; a real checkpoint's tokenizer \
needs no --tokenizer-pre):\n  sling inspect fixtures/models/qwen3moe\n  sling convert fixtures/models/qwen3moe --to gguf --type q8_0 --tokenizer-pre gpt-2 -o qwen3moe-q8_0.gguf\n  sling verify qwen3moe-q8_0.gguf\n  sling quantize fixtures/models/qwen3moe --to vllm:w8a16 -o qwen3moe-w8a16\n  sling quantize fixtures/models/qwen3moe --to mlx:4 --group-size 32 -o qwen3moe-mlx4\n  sling verify qwen3moe-mlx4\n  sling eval --ref fixtures/models/qwen3moe qwen3moe-q8_0.gguf --data tests/interop/data/calib.txt --ctx 64\n\nExit codes: 0 ok, 2 usage or input error (verify: could not check), 1 verification failure or failed quality gate (eval --max-kld), 3 internal error."
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    /// Less output on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe a checkpoint (HF directory, .safetensors or .gguf): architecture, experts,
    /// parameter counts, bytes per tensor group, and output sizes at common targets.
    #[command(
        after_help = "Examples (they run as written from the repository root, on its fixtures):\n  sling inspect fixtures/models/deepseekv3\n  sling convert fixtures/models/qwen3moe --to gguf --tokenizer-pre gpt-2 -o model.gguf\n  sling inspect model.gguf --json | jq .params"
    )]
    Inspect(inspect::Args),
    /// Convert an HF checkpoint to another format (GGUF for llama.cpp/ollama).
    #[command(after_help = convert::AFTER_HELP)]
    Convert(convert::Args),
    /// Quantize an HF checkpoint in one pass: GGUF with llama-quantize's presets, rules and bytes,
    /// compressed-tensors for vLLM/SGLang, or MLX for mlx-lm (--to).
    #[command(after_help = quantize::AFTER_HELP)]
    Quantize(quantize::Args),
    /// Print what `quantize` would do: per-tensor types, sizes, bits per weight. Writes nothing.
    #[command(
        after_help = "Examples (they run as written from the repository root, on its fixtures):\n  sling plan fixtures/models/qwen3moe --to gguf:Q4_K_M --tokenizer-pre gpt-2\n  sling plan fixtures/models/mixtral --to gguf:Q3_K_M --tensor-type 'ffn_down_exps=q4_K' --tokenizer-pre gpt-2 --json | jq .bpw\n  sling plan fixtures/models/qwen3moe --to mlx:4 --data tests/interop/data/calib.txt   # which experts the data reaches"
    )]
    Plan(quantize::QuantArgs),
    /// Check an artifact against its provenance manifest (OUT.sling.json beside a GGUF file, sling.json in a
    /// vLLM/MLX directory):
    /// every file and tensor re-hashed, missing/extra files, edited manifest; with --source, the source
    /// re-hashed and tensors re-derived from it.
    #[command(after_help = verify::AFTER_HELP)]
    Verify(verify::Args),
    /// Sign an artifact (directory or file) the way OpenSSF model_signing does (`model_signing sign
    /// key`): a sigstore bundle with the sha256 of every file, ECDSA P-256.
    #[command(after_help = sign::AFTER_HELP)]
    Sign(sign::Args),
    /// Developer command: sling's dequantization of a vllm/mlx artifact directory, as F32 safetensors.
    #[command(hide = true, after_help = dequantize::AFTER_HELP)]
    Dequantize(dequantize::Args),
    /// Developer command: GPTQ (or RTN) of one weight matrix on a vllm/mlx grid, from its inputs or Hessian.
    #[command(hide = true, name = "gptq-layer", after_help = gptq_layer::AFTER_HELP)]
    GptqLayer(gptq_layer::Args),
    /// Developer command: logits of the calibration engine's f32 forward pass on given token ids.
    #[command(hide = true, after_help = logits::AFTER_HELP)]
    Logits(logits::Args),
    /// Compute an importance matrix (llama-imatrix's GGUF format) with sling's own f32 forward pass.
    #[command(after_help = calibrate::AFTER_HELP)]
    Calibrate(calibrate::Args),
    /// Measure a quantized model against its source: perplexity, KL divergence, top-1 agreement, Δp
    /// (llama-perplexity --kl-divergence's figures); --max-kld makes it a gate.
    #[command(after_help = eval::AFTER_HELP)]
    Eval(eval::Args),
    /// Show what this machine and build offer: CPU SIMD level, threads, CUDA driver, NVRTC and GPUs (what
    /// `--device auto` picks), and the reference-tool versions sling's interop tests are pinned to.
    #[command(after_help = doctor::AFTER_HELP)]
    Doctor(doctor::Args),
}

fn main() -> ExitCode {
    // `sling inspect … | head`: Rust ignores SIGPIPE, so every print to a closed stdout would panic (exit 101 and a
    // backtrace). Restoring the default makes the process end quietly as `cat` or `grep` does (status 141 in
    // the shell); outputs are written under temporary names, so nothing half-written is left looking complete.
    #[cfg(unix)]
    // SAFETY: first statement of main, before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLING_LOG").unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global() {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::from(3);
        }
    }
    let r = match cli.cmd {
        Cmd::Inspect(a) => inspect::run(a),
        Cmd::Convert(a) => convert::run(a, cli.quiet),
        Cmd::Quantize(a) => quantize::run(a, cli.quiet),
        Cmd::Plan(a) => quantize::run_plan(a, cli.quiet),
        // verify reports its own problems and chooses its exit code (0, 1 or 2).
        Cmd::Verify(a) => return ExitCode::from(verify::run(a, cli.quiet)),
        Cmd::Sign(a) => sign::run(a, cli.quiet),
        Cmd::Logits(a) => logits::run(a, cli.quiet),
        Cmd::Dequantize(a) => dequantize::run(a),
        Cmd::GptqLayer(a) => gptq_layer::run(a),
        Cmd::Calibrate(a) => calibrate::run(a, cli.quiet),
        Cmd::Doctor(a) => doctor::run(a),
        // eval chooses its exit code: 0, or 1 when the --max-kld gate fails.
        Cmd::Eval(a) => eval::run(a, cli.quiet).map(|code| {
            if code != 0 {
                std::process::exit(code.into());
            }
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: many errors already spell their source out in their own message.
            let mut said = e.to_string();
            eprintln!("error: {said}");
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !said.contains(&c) {
                    eprintln!("  caused by: {c}");
                    said.push('\n');
                    said.push_str(&c);
                }
            }
            ExitCode::from(convert::exit_code(&e))
        }
    }
}
