#!/usr/bin/env python3
"""Calibration benchmark: `sling calibrate` (sling's own f32 forward pass, reading the bf16 safetensors) vs
`llama-imatrix` (on the same model converted to a GGUF), on the same text, context, chunk count and threads.

    /root/.cache/sling-lab/venv/bin/python scripts/bench/calibrate.py      # ~1.5 min on 2 cores (+1 min the first time)

Needs target/release/sling (cargo build --release -p sling; --sling PATH for another) and the reference tools of
scripts/setup-reference.sh (llama-imatrix, the venv with torch/transformers).

Models (generated once into WORK, default $SLING_LAB/bench-calib, reused while their parameters are the same; not
committed): synthetic Qwen3-MoE checkpoints written by the real transformers classes (`Qwen3MoeForCausalLM` from a
seeded random init, std 0.02; norm weights 1 + N(0, 0.1)), saved as bf16 safetensors with the tokenizer of
fixtures/models/qwen3moe (a BPE of 384 tokens), for every --layers count (default 2 and 8). Dimensions (defaults):
hidden 1024, 16 heads x 64, 4 KV heads, 32 experts top-4 with moe_intermediate 512, vocab 384. Every layer has the
same tensors, so memory that does not grow with the model shows as equal peak RSS. Each checkpoint is converted
with `sling convert --type f32` (--gguf-type) to the GGUF llama-imatrix reads: llama.cpp then computes in f32 as
sling does.

Text: tests/interop/data/calib.txt repeated until it holds --chunks chunks of --ctx tokens (both tools tokenize
it identically; tests/interop/test_calibrate.py).

Runs, per model, --rounds times, the tools alternating (sling, llama-imatrix, sling, ...):
  sling          `sling calibrate MODEL --data TEXT --ctx C --chunks N -t T -o OUT -q`
  llama-imatrix  `llama-imatrix -m MODEL.gguf -f TEXT -o OUT -c C --chunks N -t T --output-format gguf`
                 (its defaults otherwise: F16 KV cache, perplexity computed)
and once per --all-experts-layers model `sling calibrate ... --all-experts` (every expert on every token).

Measurement is measure.py's (as run.py and quantize.py): /usr/bin/time -v per command (wall, user + sys CPU
seconds, max RSS = VmHWM), RSS sampled every 20 ms split into anonymous and file-backed pages (both tools mmap
their weights), inputs read into the page cache before every run, a wait for the rest of the machine to go quiet
(< 0.25 cores) before each run and the CPU the rest of the machine used meanwhile (other_cores). A run the others
disturbed by more than --noisy cores is run again (up to --max-tries); per tool and model the run with the
smallest wall time counts (all are kept in the JSON). tokens/s = chunks x ctx / wall (whole process: start-up,
tokenization and weight reading included); tokens per CPU second = chunks x ctx / (user + sys).

Goals (issue 4): on the largest model, sling >= 0.5x llama-imatrix's CPU speed (tokens per CPU second) at <= 1/4 of
its peak RSS; sling's peak RSS roughly independent of the layer count (largest vs smallest model within 25 %).
Sanity: sling's file and llama-imatrix's hold the same entries and per-tensor total counts (the sums differ
slightly: llama.cpp's F16 KV cache).

Outputs: RESULTS/calibrate.json (everything) and RESULTS/calibrate.md (the table and verdicts); RESULTS defaults
to scripts/bench/results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from measure import changed_since, machine_info, measure, private_copy, rm, wait_quiet, warm  # scripts/bench/measure.py

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOKENIZER_SRC = REPO / "fixtures" / "models" / "qwen3moe"
CALIB = REPO / "tests" / "interop" / "data" / "calib.txt"
LAB = Path(os.environ.get("SLING_LAB") or Path.home() / ".cache" / "sling-lab")
LLAMA_BIN = LAB / "llama.cpp-build" / "bin"
DEFAULT_PY = str(LAB / "venv" / "bin" / "python")


# ------------------------------------------------------------------------------------------------------------
# model generation (run in a child process: `calibrate.py --generate DIR --params JSON`)
# ------------------------------------------------------------------------------------------------------------
def model_params(a, layers: int) -> dict:
    return {"layers": layers, "hidden": a.hidden, "heads": a.heads, "head_dim": a.head_dim, "kv_heads": a.kv_heads,
            "experts": a.experts, "top_k": a.top_k, "moe_ff": a.moe_ff, "seed": a.seed, "version": 1}


def generate(out: Path, p: dict):
    import torch
    import transformers as T

    tok_cfg = json.loads((TOKENIZER_SRC / "config.json").read_text())
    cfg = T.Qwen3MoeConfig(
        vocab_size=tok_cfg["vocab_size"], hidden_size=p["hidden"], intermediate_size=4 * p["hidden"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"], moe_intermediate_size=p["moe_ff"], num_experts=p["experts"],
        num_experts_per_tok=p["top_k"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=4096, rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok_cfg["eos_token_id"], pad_token_id=None,
        initializer_range=0.02)
    torch.manual_seed(p["seed"])
    torch.set_default_dtype(torch.bfloat16)   # init directly in bf16: half the memory and time
    model = T.Qwen3MoeForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 1 and torch.all(w == 1):   # norms: 1 + N(0, 0.1), as the fixtures
                w.add_((0.1 * torch.randn(w.shape, generator=gen)).to(w.dtype))
    tmp = out.with_name(out.name + ".tmp")
    rm(tmp)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_SRC / f, tmp / f)
    (tmp / "params.json").write_text(json.dumps(p, indent=1, sort_keys=True))
    rm(out)
    tmp.rename(out)


# ------------------------------------------------------------------------------------------------------------
def read_imatrix(path: Path) -> dict:
    """{entry: (sums, counts)} of a GGUF imatrix, read with llama.cpp's gguf-py."""
    sys.path.insert(0, str(LAB / "llama.cpp" / "gguf-py"))
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in r.tensors}
    return {n[: -len(".in_sum2")]: (t[n].reshape(-1), t[n[: -len(".in_sum2")] + ".counts"].reshape(-1))
            for n in t if n.endswith(".in_sum2")}


def compare_imatrix(ours: Path, ref: Path) -> dict:
    import numpy as np

    a, b = read_imatrix(ours), read_imatrix(ref)
    same = sorted(a) == sorted(b)
    totals = all(a[n][1].sum() == b[n][1].sum() for n in b if n in a)
    rel = {}
    for n, (s_ref, _) in b.items():
        if n in a and a[n][0].shape == s_ref.shape:
            rel[n] = float(np.max(np.abs(a[n][0] - s_ref) / np.maximum(np.abs(s_ref), 1e-30)))
    # routed (token, slot) pairs, counted once per layer (ffn_gate/up/down_exps share their counts)
    moved = sum(int(np.abs(a[n][1] - b[n][1]).sum()) // 2 for n in b if n in a and "ffn_down_exps" in n)
    slots = sum(int(b[n][1].sum()) for n in b if "ffn_down_exps" in n)
    return {"entries": len(b), "entries_equal": same, "total_counts_equal": totals, "routed_slots_moved": moved,
            "routed_slots": slots,
            "max_rel_sums_dense": max((v for n, v in rel.items() if "_exps" not in n), default=0.0),
            "max_rel_sums_experts": max((v for n, v in rel.items() if "_exps" in n), default=0.0)}


def tokens_of(sling: Path, model: Path, text: Path) -> int:
    """Tokens of `text` in the model's tokenizer (sling calibrate's report, with a context too large to run)."""
    r = subprocess.run([str(sling), "calibrate", str(model), "--data", str(text), "--ctx", str(10**9), "-o",
                        "/dev/null"], capture_output=True, text=True)
    import re
    m = re.search(r"tokenizes to only (\d+) tokens", r.stderr)
    if not m:
        sys.exit(f"cannot count the tokens of {text}: {r.stderr[-2000:]}")
    return int(m.group(1))


def make_text(a, sling: Path, model: Path) -> tuple[Path, int]:
    """calib.txt repeated until it holds chunks x ctx tokens (+ 10 %)."""
    base = CALIB.read_text()
    per = tokens_of(sling, model, CALIB)
    need = a.chunks * a.ctx
    reps = max(1, -(-int(need * 1.1) // per))
    text = a.work / f"calib-x{reps}.txt"
    text.write_text("\n".join([base] * reps))
    n = tokens_of(sling, model, text)
    if n < need:
        sys.exit(f"{text}: {n} tokens < {need}")
    return text, n


# ------------------------------------------------------------------------------------------------------------
def other_cores(r: dict) -> float:
    return r["other_cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else 0.0


def run_all(a, result: dict, sling: Path):
    llama_imatrix = LLAMA_BIN / "llama-imatrix"
    if not llama_imatrix.exists():
        sys.exit(f"{llama_imatrix} missing: run scripts/setup-reference.sh")
    env = {**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)}
    logs = a.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    quiet_used = [0.0]
    layers = [int(x) for x in a.layers.split(",")]
    all_layers = [int(x) for x in a.all_experts_layers.split(",")] if a.all_experts_layers else []
    result["runs"], result["models"], result["sanity"] = [], [], []
    text = None

    for nl in layers:
        p = model_params(a, nl)
        tag = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
        mdir = a.work / f"qwen3moe-{nl}l-{tag}"
        if not (mdir / "params.json").exists():
            print(f"== generating {mdir}", flush=True)
            t0 = time.perf_counter()
            subprocess.run([a.python, str(Path(__file__).resolve()), "--generate", str(mdir), "--params",
                            json.dumps(p)], check=True)
            print(f"   {time.perf_counter() - t0:.1f}s", flush=True)
        gguf_path = mdir.with_name(mdir.name + f"-{a.gguf_type}.gguf")
        if not gguf_path.exists():
            print(f"== converting to {gguf_path.name}", flush=True)
            subprocess.run([str(sling), "-q", "convert", str(mdir), "--to", "gguf", "--type", a.gguf_type,
                            "--tokenizer-pre", "gpt-2", "--no-manifest", "--no-model-card", "-o", str(gguf_path)],
                           check=True)
        shards = sorted(mdir.glob("*.safetensors"))
        st_bytes = sum(f.stat().st_size for f in shards)
        n_params = None
        idx = mdir / "model.safetensors.index.json"
        if idx.exists():
            n_params = json.loads(idx.read_text()).get("metadata", {}).get("total_parameters")
        result["models"].append({"layers": nl, "dir": str(mdir), "params": p, "safetensors_bytes": st_bytes,
                                 "gguf_bytes": gguf_path.stat().st_size, "gguf_type": a.gguf_type,
                                 "total_parameters": n_params})
        if text is None:
            text, n_text = make_text(a, sling, mdir)
            result["text"] = {"file": str(text), "tokens": n_text, "ctx": a.ctx, "chunks": a.chunks,
                              "tokens_processed": a.ctx * a.chunks}
        n_tok = a.ctx * a.chunks
        outs = {"sling": a.work / "sling-imatrix.gguf", "llama-imatrix": a.work / "llama-imatrix.gguf",
                "sling --all-experts": a.work / "sling-all-imatrix.gguf"}
        cmds = {
            "sling": [sling, "-q", "-t", a.threads, "calibrate", mdir, "--data", text, "--ctx", a.ctx, "--chunks",
                      a.chunks, "-o", outs["sling"]],
            "llama-imatrix": [llama_imatrix, "-m", gguf_path, "-f", text, "-o", outs["llama-imatrix"], "-c", a.ctx,
                              "--chunks", a.chunks, "-t", a.threads, "--output-format", "gguf"],
            "sling --all-experts": [sling, "-q", "-t", a.threads, "calibrate", mdir, "--data", text, "--ctx", a.ctx,
                                    "--chunks", a.chunks, "--all-experts", "-o", outs["sling --all-experts"]],
        }
        inputs = {"sling": shards, "llama-imatrix": [gguf_path], "sling --all-experts": shards}

        def run(tool: str, rnd: int):
            for attempt in range(a.max_tries):
                rm(outs[tool])
                q = wait_quiet(min(a.quiet_wait, max(0.0, a.quiet_budget - quiet_used[0])))
                quiet_used[0] += q
                warm(inputs[tool] + [text])
                name = f"{tool.replace(' ', '')}-{nl}l-r{rnd}-a{attempt}"
                cmd = [str(c) for c in cmds[tool]]
                print(f"-- {name}: {' '.join(cmd)}", flush=True)
                r = measure(cmd, logs / f"{name}.log", env=env)
                cpu = (r["user_s"] or 0) + (r["sys_s"] or 0)
                r.update(tool=tool, layers=nl, round=rnd, attempt=attempt, quiet_wait_s=q, cmd=" ".join(cmd),
                         tokens=n_tok, cpu_s=cpu, tokens_per_s=n_tok / r["wall_s"],
                         tokens_per_cpu_s=n_tok / cpu if cpu else None, other_cores=other_cores(r))
                print(f"   wall {r['wall_s']:.2f}s  {r['tokens_per_s']:.1f} tok/s  cpu {cpu:.1f}s "
                      f"({r['tokens_per_cpu_s']:.1f} tok/cpu-s)  maxrss {r['max_rss_kib'] / 1024:.0f} MiB (anon "
                      f"{r['peak_rss_anon_kib'] / 1024:.0f}, file {r['peak_rss_file_kib'] / 1024:.0f})  others "
                      f"{r['other_cores']:.2f} cores", flush=True)
                result["runs"].append(r)
                if r["other_cores"] <= a.noisy:
                    break
                if attempt + 1 < a.max_tries:
                    print(f"   noisy (others used {r['other_cores']:.2f} cores > {a.noisy}): again", flush=True)

        for rnd in range(a.rounds):
            order = ("sling", "llama-imatrix") if rnd % 2 == 0 else ("llama-imatrix", "sling")
            for tool in order:
                run(tool, rnd)
        s = {"layers": nl, **compare_imatrix(outs["sling"], outs["llama-imatrix"])}
        print(f"   sanity: {s}", flush=True)
        result["sanity"].append(s)
        if nl in all_layers:
            run("sling --all-experts", 0)
            counts = [c for n, (_, c) in read_imatrix(outs["sling --all-experts"]).items() if "_exps" in n]
            result["sanity"][-1]["all_experts_every_count_is_tokens"] = bool(all((c == n_tok).all() for c in counts))
        for o in outs.values():
            rm(o)
    result["quiet_wait_total_s"] = quiet_used[0]


def summarize(result: dict) -> list[dict]:
    """Per (tool, layers): the run with the smallest wall time."""
    best = {}
    for r in result["runs"]:
        k = (r["tool"], r["layers"])
        if k not in best or r["wall_s"] < best[k]["wall_s"]:
            best[k] = r
    rows = []
    for (tool, nl), r in best.items():
        ref = best.get(("llama-imatrix", nl))
        rows.append({
            "tool": tool, "layers": nl, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "tokens": r["tokens"],
            "tokens_per_s": r["tokens_per_s"], "tokens_per_cpu_s": r["tokens_per_cpu_s"],
            "max_rss_mib": r["max_rss_kib"] / 1024, "peak_anon_mib": r["peak_rss_anon_kib"] / 1024,
            "peak_file_mib": r["peak_rss_file_kib"] / 1024, "other_cores": r["other_cores"],
            "runs": sum(1 for x in result["runs"] if (x["tool"], x["layers"]) == (tool, nl)),
            "cpu_speed_vs_llama": (r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]) if ref else None,
            "wall_speed_vs_llama": (ref["wall_s"] / r["wall_s"]) if ref else None,
            "rss_vs_llama": (r["max_rss_kib"] / ref["max_rss_kib"]) if ref else None,
        })
    order = {"sling": 0, "sling --all-experts": 1, "llama-imatrix": 2}
    rows.sort(key=lambda x: (x["layers"], order.get(x["tool"], 9)))
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    layers = sorted({r["layers"] for r in rows})
    get = lambda tool, nl: next((r for r in rows if r["tool"] == tool and r["layers"] == nl), None)  # noqa: E731
    out = []
    big, small = layers[-1], layers[0]
    s, l = get("sling", big), get("llama-imatrix", big)
    if s and l:
        out.append({"goal": f"CPU speed >= 0.5x llama-imatrix ({big} layers)", "value": s["cpu_speed_vs_llama"],
                    "met": s["cpu_speed_vs_llama"] >= 0.5})
        out.append({"goal": f"peak RSS <= 1/4 of llama-imatrix's ({big} layers)", "value": s["rss_vs_llama"],
                    "met": s["rss_vs_llama"] <= 0.25})
    s2 = get("sling", small)
    if s and s2 and big != small:
        ratio = s["max_rss_mib"] / s2["max_rss_mib"]
        out.append({"goal": f"sling peak RSS independent of layers ({big} vs {small} layers within 25 %)",
                    "value": ratio, "met": ratio <= 1.25})
    return out


def render_md(result: dict) -> str:
    m, t = result["machine"], result["text"]
    md = result["models"]
    p = md[0]["params"]
    lines = [
        f"Machine: {m['nproc']} CPUs, {m['cpu']} ({m['hypervisor'] or 'bare metal'}), {m['mem_gib']} GiB RAM, kernel "
        f"{m['kernel']}; {result.get('sling_version', '?')} at {m['git_rev']} (sling sha256 "
        f"{result['binaries']['sling']['sha256'][:12]}); llama.cpp {result.get('llama_cpp', '?')}; {m['date_utc']}.",
        "",
        f"Model: synthetic Qwen3-MoE (transformers, seed {p['seed']}), hidden {p['hidden']}, {p['heads']} heads x "
        f"{p['head_dim']}, {p['kv_heads']} KV heads, {p['experts']} experts top-{p['top_k']} x moe_ff {p['moe_ff']}, "
        "vocab 384; " + ", ".join(f"{x['layers']} layers: {x['safetensors_bytes'] / 1e6:.0f} MB bf16 safetensors, "
                                  f"{x['gguf_bytes'] / 1e6:.0f} MB {x['gguf_type'].upper()} GGUF" for x in md) + ".",
        f"Text: {t['chunks']} chunks x {t['ctx']} tokens = {t['tokens_processed']} tokens, threads "
        f"{result['threads']}. "
        "Best of the runs per row (wall); tokens/s over the whole process.",
        "",
        "| layers | tool | wall s | tokens/s | CPU s | tokens / CPU s | CPU speed vs llama-imatrix | peak RSS MiB | "
        "anon / file MiB | RSS vs llama-imatrix | other load (cores) | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, d=2, suf="": "—" if v is None else f"{v:.{d}f}{suf}"  # noqa: E731
    for r in result["summary"]:
        ref = r["tool"] == "llama-imatrix"
        lines.append(
            f"| {r['layers']} | {r['tool']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | {r['cpu_s']:.1f} | "
            f"{f(r['tokens_per_cpu_s'], 0)} | {'—' if ref else f(r['cpu_speed_vs_llama'], 2, 'x')} | "
            f"{r['max_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} / {r['peak_file_mib']:.0f} | "
            f"{'—' if ref else f(r['rss_vs_llama'], 3)} | {r['other_cores']:.2f} | {r['runs']} |")
    lines.append("")
    for v in result["verdicts"]:
        lines.append(f"- {v['goal']}: {v['value']:.3f} — {'met' if v['met'] else '**not met**'}")
    for s in result["sanity"]:
        lines.append(f"- sanity, {s['layers']} layers: sling vs llama-imatrix entries {s['entries']} "
                     f"{'equal' if s['entries_equal'] else 'DIFFER'}, per-tensor total counts "
                     f"{'equal' if s['total_counts_equal'] else 'DIFFER'}; max relative difference of the sums "
                     f"{s['max_rel_sums_dense']:.2g} on dense entries, {s['max_rel_sums_experts']:.2g} on expert "
                     f"entries where {s['routed_slots_moved']} routed slots of {s.get('routed_slots', '?')} moved "
                     "(llama-imatrix runs with its default F16 KV cache, which rounds K and V: near-tie tokens pick "
                     "another expert)"
                     + (f"; --all-experts: every expert count = tokens: {s['all_experts_every_count_is_tokens']}"
                        if "all_experts_every_count_is_tokens" in s else ""))
    lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,8", help="layer counts, comma-separated (one model each)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-ff", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--gguf-type", default="f32", help="type of the GGUF llama-imatrix reads (f32, bf16, ...)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="runs per tool and model, alternating")
    ap.add_argument("--all-experts-layers", default="2",
                    help="models (layer counts) that also get a `sling calibrate --all-experts` run ('' for none)")
    ap.add_argument("--noisy", type=float, default=0.3,
                    help="run again when the rest of the machine used more than this many cores meanwhile")
    ap.add_argument("--max-tries", type=int, default=2)
    ap.add_argument("--quiet-wait", type=float, default=30, help="per run: wait up to this long for a quiet machine")
    ap.add_argument("--quiet-budget", type=float, default=120, help="total seconds of such waits")
    ap.add_argument("--work", type=Path, default=LAB / "bench-calib")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="calibrate")
    ap.add_argument("--sling", type=Path, default=Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
                    / "release" / "sling")
    ap.add_argument("--python", default=DEFAULT_PY if Path(DEFAULT_PY).exists() else sys.executable,
                    help="python with torch and transformers (for generating the models)")
    ap.add_argument("--render-only", action="store_true", help="re-render RESULTS/NAME.md from the JSON")
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate:
        generate(a.generate, json.loads(a.params))
        return
    jpath, mpath = a.results / f"{a.name}.json", a.results / f"{a.name}.md"
    if a.render_only:
        result = json.loads(jpath.read_text())
        result["summary"] = summarize(result)
        result["verdicts"] = verdicts(result["summary"])
        jpath.write_text(json.dumps(result, indent=1))
        mpath.write_text(render_md(result))
        print(render_md(result))
        return
    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time missing: apt-get install -y time")
    if not a.sling.exists():
        sys.exit(f"{a.sling} missing: cargo build --release -p sling")
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(a).items()}, "threads": a.threads}
    sling = a.work / "sling"
    result["binaries"] = {"sling": private_copy(a.sling, sling)}
    result["sling_version"] = subprocess.run([str(sling), "--version"], capture_output=True, text=True).stdout.strip()
    sv = LAB / "llama.cpp" / ".sling_version"
    result["llama_cpp"] = ("vendored by llama-cpp-python " + sv.read_text().strip()) if sv.exists() else "unknown"
    run_all(a, result, sling)
    result["summary"] = summarize(result)
    result["verdicts"] = verdicts(result["summary"])
    result["total_s"] = time.perf_counter() - t0
    if changed_since(result["binaries"]["sling"]):
        result["notes"] = [f"{a.sling} was rebuilt during the run; the measured copy is the one from the start"]
    jpath.write_text(json.dumps(result, indent=1))
    md = render_md(result)
    mpath.write_text(md)
    print(md)
    print(f"total {result['total_s']:.0f} s; results in {jpath} and {mpath}")


if __name__ == "__main__":
    main()
