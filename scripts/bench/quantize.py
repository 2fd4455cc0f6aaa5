#!/usr/bin/env python3
"""Quantization benchmark: `sling quantize` (HF checkpoint -> quantized GGUF in one pass) vs the two-pass reference
pipeline (convert_hf_to_gguf.py --outtype bf16, then llama-quantize), and sling's quantizer kernels vs llama.cpp's.

    /root/.cache/sling-lab/venv/bin/python scripts/bench/quantize.py     # 1 GB and 4 GB + kernels, ~25-30 min on 2 cores

Needs target/release/sling (cargo build --release -p sling), the kernel benchmark
target/release/examples/qbench (cargo build --release -p sling-kernels --example qbench) and the reference tools of
scripts/setup-reference.sh (convert_hf_to_gguf.py, llama-quantize, ggml-quant-ref with its `bench` mode).

End to end (--skip-e2e to leave out), for every model size (--sizes, default 1,4 GB; make_synthetic.py's synthetic
Qwen3-MoE, real Qwen3-30B-A3B dimensions) and every preset (--presets, default Q4_K_M,Q8_0,IQ4_XS):
  sling             `sling quantize MODEL --to gguf:PRESET -o OUT --tokenizer-pre gpt-2` with the default thread
                    count (all cores, N); at the --detail-sizes (default: the smallest size) also with `-t 1`, with
                    `--no-manifest` (no provenance hashing) and with both
  reference         step 1 `convert_ref.py MODEL --outtype bf16` (convert_hf_to_gguf.py; it has no thread option),
                    measured once per model size (it is the same for every preset), then step 2
                    `llama-quantize BF16 OUT PRESET N` with the same thread count as sling (N; at the detail sizes
                    also 1). The pipeline's wall time is the sum of both steps, its peak RSS the larger one.
and then checks that sling's output (default threads) holds the same tensors (name, type, shape, bytes) and the
same metadata as llama-quantize's, whole file (sha256; tests/interop/gguf_compare.py).
Throughput is the size of the source safetensors (10^9 bytes) divided by the wall time.

Measurement is run.py's (scripts/bench/measure.py): /usr/bin/time -v per command, RSS sampled every 20 ms (anon
and file-backed), inputs read into the page cache before every run (the model's shards; the BF16 file before
llama-quantize), outputs deleted and `sync` before, a timed `sync` after, a wait for the rest of the machine to go
quiet (< 0.25 cores) before each run, and the CPU the rest of the machine used during each run (other_cpu_s).
A run during which the others used more than --noisy cores (default 0.3) is run again, up to --max-tries times in
all; the least disturbed attempt counts (all are kept in the JSON).

Kernels (--skip-kernels to leave out): for each type (--types, default the 15 block types sling writes), single
thread, on the same data (--kernel-rows x --kernel-cols f32, default 1024 x 4096 = 16 MiB of seeded normal values,
std 0.02, like the checkpoints' weights), without and with importance weights (seeded positive values):
  llama.cpp  `ggml-quant-ref bench TYPE NROWS NPERROW REPS [IMATRIX]`: ggml_quantize_chunk, the call llama-quantize
             makes, in libggml-base (-O3, baseline x86-64) of the pinned llama.cpp
  sling      `qbench TYPE NROWS NPERROW REPS [IMATRIX]` (kernels/examples/qbench.rs): sling_kernels::quantize_rows,
             the call sling quantize makes
Both time only that call, REPS times (--kernel-reps, default 5), and report the best; MB/s is f32 input MB
(10^6 bytes) per second. Both also time dequantization (ggml's to_float row by row; sling_quantizers::dequantize),
and print an FNV-1a hash of their output bytes, which must be equal (recorded as bytes_equal).

Outputs: RESULTS/quantize.json (everything) and RESULTS/quantize.md (the tables); RESULTS defaults to
scripts/bench/results. With --skip-e2e or --skip-kernels the other part of an existing quantize.json is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import (changed_since, cpu_busy_s, machine_info, measure, private_copy, rm,  # scripts/bench/measure.py
                     sync_time, wait_quiet, warm)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_PY = "/root/.cache/sling-lab/venv/bin/python"
REQUIRES_IMATRIX = ("iq2_xxs", "iq2_xs", "iq1_s")
KERNEL_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs",
                "tq1_0", "tq2_0", "mxfp4")

sys.path.insert(0, str(REPO / "tests" / "interop"))
import lab  # noqa: E402  (tests/interop/lab.py: where the reference tools are; puts llama.cpp's gguf-py on sys.path)


class Quiet:
    """The budget of waits for the machine to go quiet."""

    def __init__(self, per_run: float, total: float):
        self.per_run, self.total, self.used = per_run, total, 0.0

    def wait(self) -> float:
        s = wait_quiet(min(self.per_run, max(0.0, self.total - self.used)))
        self.used += s
        return s


def other_cores(r: dict) -> float:
    return r["other_cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else 0.0


# ------------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------------
def run_e2e(a, result: dict, quiet: Quiet, sling: Path):
    import gguf_compare  # tests/interop/gguf_compare.py

    llama_quantize = lab.LLAMA_BIN / "llama-quantize"
    if not llama_quantize.exists():
        sys.exit(f"{llama_quantize} missing: {lab.SETUP_HINT}")
    nproc = os.cpu_count()
    sizes = [float(s) for s in a.sizes.split(",")]
    detail = [float(s) for s in a.detail_sizes.split(",")] if a.detail_sizes else [min(sizes)]
    presets = a.presets.split(",")
    outdir, logs = a.work / "out", a.work / "logs"
    outdir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    e2e = {"sizes": sizes, "detail_sizes": detail, "presets": presets, "nproc": nproc, "models": [], "runs": [],
           "verification": []}
    result["e2e"] = e2e

    for size in sizes:
        tag = f"{size:g}g"
        mdir = a.work / f"qwen3moe-{tag}"
        if not (a.keep_models and (mdir / "config.json").exists()):
            print(f"== generating {mdir}", flush=True)
            gen = subprocess.run([a.python, str(HERE / "make_synthetic.py"), "--size", str(size), "--out", str(mdir),
                                  "--force"], check=True, capture_output=True, text=True)
            print(gen.stdout.strip(), flush=True)
        shards = sorted(mdir.glob("*.safetensors"))
        in_bytes = sum(f.stat().st_size for f in shards)
        cfg = json.loads((mdir / "config.json").read_text())
        e2e["models"].append({"size_gb": size, "dir": str(mdir), "safetensors_bytes": in_bytes, "shards": len(shards),
                              "layers": cfg["num_hidden_layers"], "experts": cfg["num_experts"],
                              "hidden": cfg["hidden_size"], "moe_intermediate": cfg["moe_intermediate_size"]})
        is_detail = size in detail

        def run(tool, preset, threads, cmd, out_path, inputs, step=None, keep=False):
            """Measures cmd --repeat (reference: --ref-repeat) times; noisy attempts are retried."""
            reps = a.ref_repeat if tool == "reference" else a.repeat
            for i in range(reps):
                for attempt in range(a.max_tries):
                    for p in (out_path, out_path.with_suffix(".sling.json")):
                        rm(p)
                    subprocess.run(["sync"], check=True)
                    quiet_s = quiet.wait()
                    warm_s = warm(inputs)
                    name = f"{tool.replace(' ', '')}-{step or 'all'}-{tag}-{preset}-t{threads}-{i}-{attempt}"
                    print(f"-- {name}: {' '.join(map(str, cmd))}", flush=True)
                    r = measure([str(c) for c in cmd], logs / f"{name}.log")
                    r["sync_s"] = sync_time()
                    r.update(tool=tool, step=step, size_gb=size, preset=preset, threads=threads, rep=i,
                             attempt=attempt, input_bytes=in_bytes, warm_s=warm_s, quiet_wait_s=quiet_s,
                             cmd=" ".join(map(str, cmd)))
                    if out_path.exists():
                        r["output_bytes"] = out_path.stat().st_size
                    oc = other_cores(r)
                    print(f"   wall {r['wall_s']:.2f}s  {in_bytes / r['wall_s'] / 1e9:.3f} GB/s  "
                          f"maxrss {r['max_rss_kib'] / 1024:.0f} MiB (anon {r['peak_rss_anon_kib'] / 1024:.0f}, "
                          f"file {r['peak_rss_file_kib'] / 1024:.0f})  sync {r['sync_s']:.2f}s  "
                          f"others {oc:.2f} cores", flush=True)
                    e2e["runs"].append(r)
                    if oc <= a.noisy:
                        break
                    if attempt + 1 < a.max_tries:
                        print(f"   noisy (others used {oc:.2f} cores > {a.noisy}): running it again", flush=True)
            if not keep:
                rm(out_path)
                rm(out_path.with_suffix(".sling.json"))

        sl = [sling, "quantize", mdir, "--tokenizer-pre", "gpt-2", "-q"]
        kept = {}
        # The reference's step 1, once per model size: the BF16 GGUF stays for every llama-quantize run.
        bf16 = outdir / "ref-bf16.gguf"
        if not a.skip_ref:
            run("reference", "BF16", 1, [a.python, HERE / "convert_ref.py", mdir, "--outtype", "bf16", "--outfile",
                                         bf16], bf16, shards, step="convert", keep=True)
        imatrix = None
        if not a.skip_ref and any(p in a.imatrix_presets.split(",") for p in presets):
            # An importance matrix for the presets that need one (llama-quantize refuses the IQ1/IQ2 presets
            # without): llama-imatrix on the reference BF16 file, untimed, handed to both tools alike.
            imatrix = outdir / "imatrix.gguf"
            print(f"== llama-imatrix for {tag} (untimed)", flush=True)
            subprocess.run([lab.LLAMA_BIN / "llama-imatrix", "-m", bf16, "-f", lab.CALIB, "-o", imatrix, "-c", "64",
                            "--chunks", "4", "-t", str(nproc)], check=True, capture_output=True)
        for preset in presets:
            out = outdir / f"sling-{preset}.gguf"
            im = ["--imatrix", imatrix] if imatrix and preset in a.imatrix_presets.split(",") else []
            e2e.setdefault("imatrix_presets", [])
            if im:
                e2e["imatrix_presets"].append(preset)
            sl_im = sl + im
            run("sling", preset, f"default({nproc})", sl_im + ["--to", f"gguf:{preset}", "-o", out], out, shards,
                keep=True)
            kept["sling"] = out
            if not a.skip_ref:
                ref = outdir / f"ref-{preset}.gguf"
                run("reference", preset, nproc, [llama_quantize, *im, bf16, ref, preset, nproc], ref, [bf16],
                    step="quantize", keep=True)
            if is_detail:
                t = outdir / "sling-t.gguf"
                run("sling --no-manifest", preset, f"default({nproc})",
                    sl_im + ["--no-manifest", "--to", f"gguf:{preset}", "-o", t], t, shards)
                run("sling", preset, 1, sl_im + ["-t", "1", "--to", f"gguf:{preset}", "-o", t], t, shards)
                run("sling --no-manifest", preset, 1,
                    sl_im + ["--no-manifest", "-t", "1", "--to", f"gguf:{preset}", "-o", t], t, shards)
                if not a.skip_ref and nproc != 1:
                    t = outdir / "ref-t.gguf"
                    run("reference", preset, 1, [llama_quantize, *im, bf16, t, preset, 1], t, [bf16], step="quantize")
            if not a.skip_ref:
                print(f"== comparing sling-{preset} with llama-quantize's ({tag})", flush=True)
                t0 = time.perf_counter()
                c = gguf_compare.compare(str(out), str(ref))
                types = {}
                for tt in gguf_compare.read(str(out))[1].values():
                    types[tt[0]] = types.get(tt[0], 0) + 1
                v = {"size_gb": size, "preset": preset, "tensors_total": c.tensors_total,
                     "tensors_identical": c.tensors_identical, "tensor_order_equal": c.order_equal,
                     "tensor_diffs": c.tensor_diffs[:20], "kv_compared": c.kv_compared, "kv_diffs": c.kv_diffs[:20],
                     "tensor_types": dict(sorted(types.items())), "file_identical": c.file_identical,
                     "equal": c.file_identical,
                     "sling_bytes": out.stat().st_size, "reference_bytes": ref.stat().st_size,
                     "seconds": time.perf_counter() - t0}
                print(f"   tensors {c.tensors_identical}/{c.tensors_total} identical, order equal {c.order_equal}, "
                      f"metadata diffs {len(c.kv_diffs)} {c.kv_diffs[:4]}, types {v['tensor_types']}", flush=True)
                e2e["verification"].append(v)
                rm(ref)
            rm(out)
            rm(out.with_suffix(".sling.json"))
        rm(bf16)
        if imatrix:
            rm(imatrix)
        if not a.keep_models:
            rm(mdir)


def pick(runs: list[dict]) -> list[dict]:
    """Per repeat, the attempt the others disturbed least."""
    by_rep = {}
    for r in runs:
        by_rep.setdefault(r["rep"], []).append(r)
    return [min(rs, key=other_cores) for rs in by_rep.values()]


def summarize_e2e(e2e: dict) -> list[dict]:
    groups = {}
    for r in e2e["runs"]:
        groups.setdefault((r["tool"], r["step"], r["size_gb"], r["preset"], str(r["threads"])), []).append(r)
    stats = {}
    for key, runs in groups.items():
        rs = pick(runs)
        walls = [r["wall_s"] for r in rs]
        stats[key] = {
            "n": len(rs), "attempts": len(runs), "wall_s": statistics.median(walls), "wall_min_s": min(walls),
            "wall_max_s": max(walls), "sync_s": statistics.median(r["sync_s"] for r in rs),
            "max_rss_mib": max(r["max_rss_kib"] for r in rs) / 1024,
            "peak_anon_mib": max(r["peak_rss_anon_kib"] for r in rs) / 1024,
            "peak_file_mib": max(r["peak_rss_file_kib"] for r in rs) / 1024,
            "cpu_pct": statistics.median(r["cpu_pct"] or 0 for r in rs),
            "involuntary_cs": max(r.get("involuntary_cs") or 0 for r in rs),
            "cpu_s": statistics.median((r["user_s"] or 0) + (r["sys_s"] or 0) for r in rs),
            "other_cores": max(other_cores(r) for r in rs), "input_bytes": rs[0]["input_bytes"],
            "output_bytes": rs[0].get("output_bytes"),
        }
    nproc = e2e["nproc"]
    rows = []
    for (tool, step, size, preset, threads), s in stats.items():
        if tool == "reference" and step == "convert":
            continue
        row = {"tool": tool, "size_gb": size, "preset": preset, "threads": threads, **s}
        if tool == "reference":
            conv = stats.get(("reference", "convert", size, "BF16", "1"))
            row.update(quantize_wall_s=s["wall_s"], quantize_max_rss_mib=s["max_rss_mib"], quantize_cpu_s=s["cpu_s"],
                       convert_cpu_s=conv["cpu_s"] if conv else None,
                       convert_wall_s=conv["wall_s"] if conv else None,
                       convert_max_rss_mib=conv["max_rss_mib"] if conv else None)
            if conv:
                row["wall_s"] = conv["wall_s"] + s["wall_s"]
                row["cpu_s"] = conv["cpu_s"] + s["cpu_s"]
                row["max_rss_mib"] = max(conv["max_rss_mib"], s["max_rss_mib"])
                row["peak_anon_mib"] = max(conv["peak_anon_mib"], s["peak_anon_mib"])
                row["peak_file_mib"] = max(conv["peak_file_mib"], s["peak_file_mib"])
                row["other_cores"] = max(conv["other_cores"], s["other_cores"])
                row["wall_min_s"] = row["wall_max_s"] = None
        row["gbps"] = row["input_bytes"] / row["wall_s"] / 1e9
        rows.append(row)
    # equal threads: sling's "default(N)" runs N threads
    def nthreads(r):
        return nproc if str(r["threads"]).startswith("default") else int(r["threads"])
    for r in rows:
        ref = next((x for x in rows if x["tool"] == "reference" and x["size_gb"] == r["size_gb"]
                    and x["preset"] == r["preset"] and nthreads(x) == nthreads(r)), None)
        r["speedup_vs_ref"] = ref["wall_s"] / r["wall_s"] if ref else None
        r["cpu_ratio_vs_ref"] = ref["cpu_s"] / r["cpu_s"] if ref else None
        one = next((x for x in rows if x["tool"] == r["tool"] and x["size_gb"] == r["size_gb"]
                    and x["preset"] == r["preset"] and nthreads(x) == 1), None)
        r["scaling_vs_1_thread"] = one["wall_s"] / r["wall_s"] if one and nthreads(r) > 1 else None
        if r["tool"] == "reference" and one and nthreads(r) > 1:
            r["quantize_scaling_vs_1_thread"] = one["quantize_wall_s"] / r["quantize_wall_s"]
    order = {"sling": 0, "sling --no-manifest": 1, "reference": 2}
    rows.sort(key=lambda r: (r["size_gb"], r["preset"], order[r["tool"]], -nthreads(r)))
    return rows


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------
def run_kernels(a, result: dict, quiet: Quiet, qbench: Path):
    import numpy as np

    ref_bin = lab.LLAMA_BIN / "ggml-quant-ref"
    if not ref_bin.exists():
        sys.exit(f"{ref_bin} missing: {lab.SETUP_HINT}")
    kdir = a.work / "kernels"
    kdir.mkdir(parents=True, exist_ok=True)
    nrows, ncols, reps = a.kernel_rows, a.kernel_cols, a.kernel_reps
    rng = np.random.default_rng(a.kernel_seed)
    rows = kdir / "rows.f32"
    (rng.standard_normal(nrows * ncols, dtype=np.float32) * np.float32(0.02)).astype("<f4").tofile(rows)
    imatrix = kdir / "imatrix.f32"
    # Importance weights look like llama-imatrix's: mean squared activations, positive, spread over ~2 decades.
    (np.float32(0.05) + rng.standard_normal(ncols, dtype=np.float32) ** 2).astype("<f4").tofile(imatrix)
    nbytes = nrows * ncols * 4
    k = {"nrows": nrows, "n_per_row": ncols, "reps": reps, "rounds": a.kernel_rounds, "input_bytes": nbytes,
         "seed": a.kernel_seed,
         "llama_cpp": str(ref_bin), "sling": str(qbench), "runs": []}
    result["kernels"] = k
    types = a.types.split(",")

    def bench(side, typ, im, rnd):
        exe = ref_bin if side == "llama.cpp" else qbench
        cmd = [str(exe), "bench", typ] if side == "llama.cpp" else [str(exe), typ]
        cmd += [str(nrows), str(ncols), str(reps)] + ([str(imatrix)] if im else [])
        for attempt in range(a.max_tries):
            quiet_s = quiet.wait()
            busy0, ru0, t0 = cpu_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            with open(rows, "rb") as f:
                p = subprocess.run(cmd, stdin=f, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
            out = {line.split()[0]: line.split()[1:] for line in p.stdout.splitlines() if line.strip()}
            q = [float(x) for x in out["quantize"]]
            dq = [float(x) for x in out.get("dequantize", [])]
            # CPU the rest of the machine used meanwhile (machine busy time minus the benchmark process's)
            own = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
            other = max(0.0, cpu_busy_s() - busy0 - own) / wall
            r = {"side": side, "type": typ, "imatrix": im, "round": rnd, "attempt": attempt, "quantize_s": q, "dequantize_s": dq,
                 "fnv1a64": out["fnv1a64"][0], "process_wall_s": wall, "other_cores": other, "quiet_wait_s": quiet_s,
                 "process_cpu_s": own,
                 "involuntary_cs": ru.ru_nivcsw - ru0.ru_nivcsw,
                 "quantize_mbps": nbytes / 1e6 / min(q), "dequantize_mbps": nbytes / 1e6 / min(dq) if dq else None}
            k["runs"].append(r)
            print(f"   {side:9s} {typ:7s} {'imatrix' if im else '       '} quantize {r['quantize_mbps']:8.1f} MB/s  "
                  f"dequantize {r['dequantize_mbps'] or 0:8.1f} MB/s  others {other:.2f} cores", flush=True)
            if other <= a.noisy:
                break
        return r

    print(f"== kernels: {nrows} x {ncols} f32 ({nbytes / 2**20:.0f} MiB), best of {reps}, single thread", flush=True)
    for rnd in range(a.kernel_rounds):
        if a.kernel_rounds > 1:
            print(f"-- round {rnd + 1} of {a.kernel_rounds}", flush=True)
        for typ in types:
            # ggml aborts without weights for these (ggml_quantize_requires_imatrix), sling refuses
            for im in (True,) if typ in REQUIRES_IMATRIX else (False, True):
                # alternate the sides so that both see the same machine
                for side in ("llama.cpp", "sling"):
                    bench(side, typ, im, rnd)


def summarize_kernels(k: dict) -> list[dict]:
    """Per type, imatrix and side: the best time over every repeat of every round (and every attempt)."""
    runs = {}
    for r in k["runs"]:
        runs.setdefault((r["type"], r["imatrix"], r["side"]), []).append(r)
    nbytes = k["input_bytes"]

    def best(rs, what):
        ts = [t for r in rs for t in r[what]]
        return nbytes / 1e6 / min(ts) if ts else None

    def per_round_ratios(gs, ss):
        rounds = sorted({r.get("round", 0) for r in gs} & {r.get("round", 0) for r in ss})
        return [best([r for r in ss if r.get("round", 0) == n], "quantize_s")
                / best([r for r in gs if r.get("round", 0) == n], "quantize_s") for n in rounds]

    rows = []
    types = list(dict.fromkeys(r["type"] for r in k["runs"]))
    for typ in types:
        for im in (False, True):
            gs, ss = runs.get((typ, im, "llama.cpp")), runs.get((typ, im, "sling"))
            if not gs or not ss:
                continue
            g_plain = runs.get((typ, False, "llama.cpp"))
            rr = per_round_ratios(gs, ss)
            g_mbps, s_mbps = best(gs, "quantize_s"), best(ss, "quantize_s")
            g_dq, s_dq = best(gs, "dequantize_s"), best(ss, "dequantize_s")
            hashes = {r["fnv1a64"] for r in gs + ss}
            rows.append({
                "type": typ, "imatrix": im,
                # ggml ignores the weights for some types (same bytes with and without)
                "imatrix_used": None if not im or not g_plain else g_plain[0]["fnv1a64"] != gs[0]["fnv1a64"],
                "llama_cpp_mbps": g_mbps, "sling_mbps": s_mbps, "ratio": s_mbps / g_mbps,
                "ratio_rounds": rr, "ratio_min": min(rr), "ratio_max": max(rr),
                "llama_cpp_dequant_mbps": g_dq, "sling_dequant_mbps": s_dq,
                "dequant_ratio": s_dq / g_dq if g_dq and s_dq else None,
                "bytes_equal": len(hashes) == 1,
                "rounds": len(rr), "samples_per_side": sum(len(r["quantize_s"]) for r in ss),
                "other_cores": statistics.median(r["other_cores"] for r in gs + ss),
            })
    return rows


# ------------------------------------------------------------------------------------------------------------
def render_md(result) -> str:
    m = result["machine"]
    f = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        f"Machine: {m['nproc']} CPUs, {m['cpu']} (model {m['cpu_model_number']}, {m['hypervisor'] or 'bare metal'}), "
        f"{m['mem_gib']} GiB RAM, kernel {m['kernel']}; {result.get('sling_version', '?')} at {m['git_rev']} "
        f"(sling sha256 {result['binaries'].get('sling', {}).get('sha256', '?')[:12]}, qbench sha256 "
        f"{result['binaries'].get('qbench', {}).get('sha256', '?')[:12]}); {m['date_utc']}.", ""]
    if "e2e" in result:
        e2e = result["e2e"]
        prev = result.get("previous", {}).get("e2e")
        lines += [
            "### End to end: HF safetensors (bf16) -> quantized GGUF",
            "",
            *([f"(Measured in an earlier invocation: {prev['machine']['date_utc']} at {prev['machine']['git_rev']}.)", ""]
              if prev else []),
            f"Threads: sling `default(N)` runs N = {e2e['nproc']} threads; the reference's llama-quantize gets the "
            "same N (convert_hf_to_gguf.py has no thread option). Reference wall = convert + llama-quantize.",
            *([f"With an importance matrix (llama-imatrix on the reference BF16 file, untimed, given to both): "
               f"{', '.join(e2e['imatrix_presets'])}."] if e2e.get("imatrix_presets") else []),
            "",
            "| model | preset | tool | threads | wall s | GB/s source | speed-up vs reference (equal threads) | "
            "CPU s | cores used | CPU-time ratio reference / sling | peak RSS MiB | anon / file MiB | "
            "convert + quantize s | speed-up vs 1 thread | + sync s | other load (cores) | runs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["e2e_summary"]:
            spread = (f" ({r['wall_min_s']:.1f}–{r['wall_max_s']:.1f})" if r["n"] > 1 and r["wall_min_s"] else "")
            steps = (f"{f(r['convert_wall_s'], 1)} + {f(r['quantize_wall_s'], 1)}" if r["tool"] == "reference"
                     else "—")
            sc = r["scaling_vs_1_thread"]
            scs = f"{sc:.2f}x" if sc else "—"
            tries = f" ({r['attempts']} attempts)" if r["attempts"] > r["n"] else ""
            if r.get("quantize_scaling_vs_1_thread"):
                scs += f" (llama-quantize {r['quantize_scaling_vs_1_thread']:.2f}x)"
            lines.append(
                f"| {r['size_gb']:g} GB | {r['preset']} | {r['tool']} | {r['threads']} | {r['wall_s']:.1f}{spread} | "
                f"{r['gbps']:.3f} | {f(r['speedup_vs_ref']) + 'x' if r['speedup_vs_ref'] else '—'} | "
                f"{r['cpu_s']:.1f} | {r['cpu_s'] / r['wall_s']:.2f} | "
                f"{f(r['cpu_ratio_vs_ref']) + 'x' if r['cpu_ratio_vs_ref'] else '—'} | "
                f"{r['max_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} / {r['peak_file_mib']:.0f} | {steps} | {scs} | "
                f"{r['sync_s']:.2f} | {r['other_cores']:.2f} | {r['n']}{tries} |")
        lines.append("")
        for v in e2e["verification"]:
            lines.append(f"- {v['size_gb']:g} GB {v['preset']}: sling vs llama-quantize tensors {v['tensors_identical']}/"
                         f"{v['tensors_total']} byte-identical, order equal: {v['tensor_order_equal']}, metadata keys "
                         f"differing: {len(v['kv_diffs'])}{' (' + '; '.join(v['kv_diffs']) + ')' if v['kv_diffs'] else ''}"
                         + (f"; whole file identical: {v['file_identical']}" if "file_identical" in v
                            else " (naming keys ignored)")
                         + f"; types {v['tensor_types']}; {v['sling_bytes']:,} bytes")
        lines.append("")
    if "kernels" in result:
        k = result["kernels"]
        lines += [
            f"### Kernels: single thread, {k['nrows']} rows x {k['n_per_row']} f32 "
            f"({k['input_bytes'] / 2**20:.0f} MiB), best of {k['reps']} calls x {k.get('rounds', 1)} rounds",
            "",
            *([f"(Measured in an earlier invocation: {result['previous']['kernels']['machine']['date_utc']}.)", ""]
              if result.get("previous", {}).get("kernels") else []),
            "| type | importance weights | llama.cpp MB/s | sling MB/s | sling / llama.cpp | per-round ratio (min–max) | "
            "dequant llama.cpp MB/s | dequant sling MB/s | dequant ratio | same bytes | other load (cores) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["kernels_summary"]:
            im = "no" if not r["imatrix"] else ("yes (ignored by the type)" if r["imatrix_used"] is False else "yes")
            lines.append(
                f"| {r['type']} | {im} | {r['llama_cpp_mbps']:.0f} | {r['sling_mbps']:.0f} | "
                f"{'**' if r['ratio'] < 1 else ''}{r['ratio']:.2f}x{'**' if r['ratio'] < 1 else ''} | "
                f"{r.get('ratio_min', r['ratio']):.2f}–{r.get('ratio_max', r['ratio']):.2f} | "
                f"{f(r['llama_cpp_dequant_mbps'], 0)} | {f(r['sling_dequant_mbps'], 0)} | {f(r['dequant_ratio'])}x | "
                f"{'yes' if r['bytes_equal'] else 'NO'} | {r['other_cores']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="model sizes in GB, comma-separated")
    ap.add_argument("--detail-sizes", default=None,
                    help="sizes that also get -t 1 (sling and llama-quantize) and --no-manifest (default: the smallest)")
    ap.add_argument("--presets", default="Q4_K_M,Q8_0,IQ4_XS")
    ap.add_argument("--imatrix-presets", default="IQ1_S,IQ1_M,IQ2_XXS,IQ2_XS,IQ2_S,IQ2_M,IQ3_XXS,IQ3_XS",
                    help="end to end: presets run with an importance matrix (llama-imatrix on the reference BF16 "
                         "file, 4 chunks of 64 tokens, untimed), given to sling and llama-quantize alike")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each sling configuration (median)")
    ap.add_argument("--ref-repeat", type=int, default=1, help="runs of each reference step")
    ap.add_argument("--noisy", type=float, default=0.3,
                    help="run again when the rest of the machine used more than this many cores meanwhile")
    ap.add_argument("--max-tries", type=int, default=2, help="attempts per measured run (see --noisy)")
    ap.add_argument("--types", default=",".join(KERNEL_TYPES), help="kernel benchmark: ggml type names")
    ap.add_argument("--kernel-rows", type=int, default=1024)
    ap.add_argument("--kernel-cols", type=int, default=4096)
    ap.add_argument("--kernel-reps", type=int, default=7)
    ap.add_argument("--kernel-seed", type=int, default=1234)
    ap.add_argument("--kernel-rounds", type=int, default=3,
                    help="passes over all types (minutes apart: the best over all rounds counts)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sling-qbench"), help="models and outputs go here")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="quantize", help="results file names: RESULTS/NAME.json and RESULTS/NAME.md")
    ap.add_argument("--sling", type=Path, default=REPO / "target" / "release" / "sling")
    ap.add_argument("--qbench", type=Path, default=REPO / "target" / "release" / "examples" / "qbench")
    ap.add_argument("--python", default=DEFAULT_PY if Path(DEFAULT_PY).exists() else sys.executable,
                    help="python with numpy, safetensors, torch, gguf (the reference converter's environment)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-ref", action="store_true", help="end to end: sling only")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="before each run, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--quiet-budget", type=float, default=600, help="total seconds of such waits")
    ap.add_argument("--keep-models", action="store_true", help="reuse/keep the synthetic models in WORK")
    ap.add_argument("--nice", type=int, default=0,
                    help="run this script and every measured command at this nice value, and set its session's "
                         "autogroup to it (negative: needs root; gives the measured commands the CPU before other "
                         "sessions' processes on a shared machine)")
    ap.add_argument("--render-only", action="store_true",
                    help="recompute the summaries and quantize.md from RESULTS/quantize.json; measure nothing")
    a = ap.parse_args()
    if a.render_only:
        jpath = a.results / f"{a.name}.json"
        result = json.loads(jpath.read_text())
        if "e2e" in result:
            result["e2e_summary"] = summarize_e2e(result["e2e"])
        if "kernels" in result:
            result["kernels_summary"] = summarize_kernels(result["kernels"])
        jpath.write_text(json.dumps(result, indent=2))
        (a.results / f"{a.name}.md").write_text(render_md(result))
        print(render_md(result))
        return
    if a.nice:
        os.nice(a.nice)
        # With sched_autogroup (Linux default for desktop-like configs) nice only ranks processes within their
        # session's autogroup; the autogroup's own nice ranks it against other sessions (other users' builds).
        try:
            Path("/proc/self/autogroup").write_text(str(a.nice))
        except OSError as e:
            print(f"note: could not set the autogroup nice: {e}", flush=True)

    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time missing: apt-get install -y time")
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    jpath = a.results / f"{a.name}.json"
    old = json.loads(jpath.read_text()) if jpath.exists() and (a.skip_e2e or a.skip_kernels) else {}
    result = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(a).items()}, "binaries": {},
              "nice": os.getpriority(os.PRIO_PROCESS, 0),
              "autogroup": Path("/proc/self/autogroup").read_text().strip()
              if Path("/proc/self/autogroup").exists() else None}
    quiet = Quiet(a.quiet_wait, a.quiet_budget)
    t_start = time.perf_counter()

    # Measure private copies: target/release/* may be rebuilt while the benchmark runs.
    copies = {}
    if not a.skip_e2e:
        if not a.sling.exists():
            sys.exit(f"{a.sling} missing: cargo build --release -p sling")
        copies["sling"] = private_copy(a.sling, a.work / "sling")
        result["sling_version"] = subprocess.run([str(a.work / "sling"), "--version"], capture_output=True,
                                                 text=True).stdout.strip()
    if not a.skip_kernels:
        if not a.qbench.exists():
            sys.exit(f"{a.qbench} missing: cargo build --release -p sling-kernels --example qbench")
        copies["qbench"] = private_copy(a.qbench, a.work / "qbench")
    result["binaries"] = copies

    if not a.skip_kernels:
        run_kernels(a, result, quiet, a.work / "qbench")
        result["kernels_summary"] = summarize_kernels(result["kernels"])
    if not a.skip_e2e:
        run_e2e(a, result, quiet, a.work / "sling")
        result["e2e_summary"] = summarize_e2e(result["e2e"])

    result["total_s"] = time.perf_counter() - t_start
    result["quiet_wait_total_s"] = quiet.used
    notes = [f"{c['source']} was rebuilt during the run; the measured copy is the one from the start"
             for c in copies.values() if changed_since(c)]
    if notes:
        result["notes"] = notes
        print("NOTE:", *notes)
    # keep the part that was not run from the previous results
    for part in ("e2e", "kernels"):
        if part not in result and part in old:
            result[part], result[f"{part}_summary"] = old[part], old[f"{part}_summary"]
            result.setdefault("previous", {})[part] = old.get("previous", {}).get(part) or {
                "machine": old["machine"], "binaries": old.get("binaries"), "sling_version": old.get("sling_version"),
                "total_s": old.get("total_s")}
            for b, info in (old.get("binaries") or {}).items():
                result["binaries"].setdefault(b, info)
            if part == "e2e" and "sling_version" in old:
                result.setdefault("sling_version", old["sling_version"])
    jpath.write_text(json.dumps(result, indent=2))
    md = render_md(result)
    (a.results / f"{a.name}.md").write_text(md)
    print(md)
    print(f"total {result['total_s']:.0f} s; results in {jpath} and {a.results / (a.name + '.md')}")


if __name__ == "__main__":
    main()
