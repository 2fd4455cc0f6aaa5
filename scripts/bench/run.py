#!/usr/bin/env python3
"""Conversion benchmark: sling vs llama.cpp's convert_hf_to_gguf.py vs `cp -r`, on synthetic Qwen3-MoE checkpoints.

    /root/.cache/sling-lab/venv/bin/python scripts/bench/run.py            # 1 GB and 4 GB, 6-10 min on 2 cores

For every model size (default 1 and 4 GB, written by make_synthetic.py; same tensor sizes, more layers):
  cp        `cp -r MODEL OUT/` (the copy-speed limit; the copy is deleted afterwards)
  sling     bf16 and q8_0 with the default thread count, bf16 with -t 1 and -t 2, q8_0 with -t 1
  reference convert_hf_to_gguf.py --outtype bf16 / q8_0 (through convert_ref.py, which maps the synthetic
            tokenizer's unknown pre-tokenizer hash to gpt-2; sling gets --tokenizer-pre gpt-2)
and then checks that sling's bf16 and q8_0 outputs hold the same tensors (name, type, shape, bytes) as the
reference's (tests/interop/gguf_compare.py).

Every measured command runs under `/usr/bin/time -v` (wall time, peak RSS = max of VmHWM) while this script also
samples /proc/PID/status every 20 ms for the peak RssAnon (heap) and RssFile (mapped file pages: sling and the
reference both mmap the safetensors, and those page-cache pages count in RSS although the kernel can drop them).
Page cache: caches cannot be dropped here (no root on /proc/sys/vm), so the opposite is done consistently: before
every measured run the output of the previous run is deleted, `sync` flushes dirty pages, and the model's files
are read once (`cat > /dev/null`) so every run starts with the input in the page cache. After every run `sync`
is timed separately (`sync_s`): sling fsyncs its output before renaming it, cp and the reference do not, so
`wall + sync_s` is the time until the output is on disk for each tool.

Noise: the machine may be shared. Before each run the script waits (up to --quiet-wait s per run, --quiet-budget s
in all) until the rest of the machine uses < 0.25 cores, and records for each run the CPU seconds the rest of the
machine used meanwhile (`other_cpu_s`, which includes kernel writeback and this script's 20 ms sampler). sling is
measured from a private copy of the binary (WORK/sling; its sha256 is recorded), since target/release/sling may be
rebuilt while the benchmark runs.

Outputs: RESULTS/bench.json (everything, every repeat) and RESULTS/bench.md (the table), RESULTS defaults to
scripts/bench/results. Options: --sizes 1,4  --repeat 3 (cp and sling; the median is reported)  --ref-repeat 1
--work /tmp/sling-bench  --skip-ref  --keep-models  --sling PATH  --python PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import (changed_since, machine_info, measure, private_copy, rm, sync_time,  # scripts/bench/measure.py
                     wait_quiet, warm)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_PY = "/root/.cache/sling-lab/venv/bin/python"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="model sizes in GB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs of cp and of each sling configuration (median)")
    ap.add_argument("--ref-repeat", type=int, default=1, help="runs of each reference configuration")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sling-bench"), help="models and outputs go here")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--sling", type=Path, default=REPO / "target" / "release" / "sling")
    ap.add_argument("--python", default=DEFAULT_PY if Path(DEFAULT_PY).exists() else sys.executable,
                    help="python with numpy, safetensors, torch, gguf (the reference converter's environment)")
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=30,
                    help="before each run, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--quiet-budget", type=float, default=180, help="total seconds of such waits")
    ap.add_argument("--keep-models", action="store_true", help="reuse/keep the synthetic models in WORK")
    a = ap.parse_args()

    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time missing: apt-get install -y time")
    if not a.sling.exists():
        sys.exit(f"{a.sling} missing: cargo build --release -p sling")
    sys.path.insert(0, str(REPO / "tests" / "interop"))
    import gguf_compare  # noqa: E402  (tests/interop/gguf_compare.py, needs the gguf package)

    sizes = [float(s) for s in a.sizes.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    outdir = a.work / "out"
    logs = a.work / "logs"
    outdir.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)

    # Measure a private copy: target/release/sling may be rebuilt while the benchmark runs.
    src_sling = a.sling
    a.sling = a.work / "sling"
    copied = private_copy(src_sling, a.sling)
    sling_ver = subprocess.run([str(a.sling), "--version"], capture_output=True, text=True).stdout.strip()
    sling_bin = {k: copied[k] for k in ("sha256", "size", "mtime_utc")}
    result = {"machine": machine_info(), "sling": str(src_sling), "sling_version": sling_ver, "sling_binary": sling_bin,
              "reference": "llama.cpp convert_hf_to_gguf.py via scripts/bench/convert_ref.py",
              "args": {k: str(v) for k, v in vars(a).items()}, "models": [], "runs": [], "verification": []}
    t_start = time.perf_counter()

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
        result["models"].append({"size_gb": size, "dir": str(mdir), "safetensors_bytes": in_bytes,
                                 "shards": len(shards), "layers": cfg["num_hidden_layers"],
                                 "experts": cfg["num_experts"], "hidden": cfg["hidden_size"],
                                 "moe_intermediate": cfg["moe_intermediate_size"]})

        keep = {}
        quiet_total = result.setdefault("_quiet_total", [0.0])

        def run(tool, typ, threads, cmd, out_path, repeat, keep_as=None):
            for i in range(repeat):
                rm(out_path)
                subprocess.run(["sync"], check=True)
                quiet_s = wait_quiet(min(a.quiet_wait, max(0.0, a.quiet_budget - quiet_total[0])))
                quiet_total[0] += quiet_s
                warm_s = warm(shards)
                name = f"{tool}-{tag}-{typ}-t{threads}-{i}"
                print(f"-- {name}: {' '.join(map(str, cmd))}", flush=True)
                r = measure([str(c) for c in cmd], logs / f"{name}.log")
                r["sync_s"] = sync_time()
                r.update(tool=tool, size_gb=size, type=typ, threads=threads, rep=i, input_bytes=in_bytes,
                         warm_s=warm_s, quiet_wait_s=quiet_s, cmd=" ".join(map(str, cmd)))
                if out_path.exists():
                    r["output_bytes"] = (sum(f.stat().st_size for f in out_path.rglob("*") if f.is_file())
                                         if out_path.is_dir() else out_path.stat().st_size)
                print(f"   wall {r['wall_s']:.2f}s  {in_bytes / r['wall_s'] / 1e9:.3f} GB/s  "
                      f"maxrss {r['max_rss_kib'] / 1024:.0f} MiB (anon {r['peak_rss_anon_kib'] / 1024:.0f}, "
                      f"file {r['peak_rss_file_kib'] / 1024:.0f})  sync {r['sync_s']:.2f}s  "
                      f"load {r['loadavg_before'][0]:.2f}  others {r['other_cpu_s'] / r['wall_s']:.2f} cores", flush=True)
                result["runs"].append(r)
            if keep_as:
                keep[keep_as] = out_path
            else:
                rm(out_path)

        # (a) copy-speed limit
        run("cp", "copy", 1, ["cp", "-r", mdir, outdir / "cp"], outdir / "cp", a.repeat)
        # (b) sling, default threads (all cores)
        sl = [a.sling, "convert", mdir, "--tokenizer-pre", "gpt-2", "-q"]
        nproc = os.cpu_count()
        run("sling", "bf16", f"default({nproc})", sl + ["--type", "bf16", "-o", outdir / "sling-bf16.gguf"],
            outdir / "sling-bf16.gguf", a.repeat, keep_as="sling-bf16")
        run("sling", "q8_0", f"default({nproc})", sl + ["--type", "q8_0", "-o", outdir / "sling-q8_0.gguf"],
            outdir / "sling-q8_0.gguf", a.repeat, keep_as="sling-q8_0")
        # sling without the provenance manifest (no hashing of sources and outputs)
        for typ in ("bf16", "q8_0"):
            run("sling --no-manifest", typ, f"default({nproc})",
                sl + ["--no-manifest", "--type", typ, "-o", outdir / "sling-t.gguf"], outdir / "sling-t.gguf", a.repeat)
        # (d) thread scaling
        for t in (1, 2):
            run("sling", "bf16", t, sl + ["--type", "bf16", "-t", str(t), "-o", outdir / "sling-t.gguf"],
                outdir / "sling-t.gguf", a.repeat)
        run("sling", "q8_0", 1, sl + ["--type", "q8_0", "-t", "1", "-o", outdir / "sling-t.gguf"],
            outdir / "sling-t.gguf", a.repeat)
        # (c) reference
        if not a.skip_ref:
            for typ in ("bf16", "q8_0"):
                out = outdir / f"ref-{typ}.gguf"
                run("reference", typ, 1, [a.python, HERE / "convert_ref.py", mdir, "--outtype", typ,
                                          "--outfile", out], out, a.ref_repeat, keep_as=f"ref-{typ}")
            for typ in ("bf16", "q8_0"):
                print(f"== comparing sling-{typ} with ref-{typ} ({tag})", flush=True)
                t0 = time.perf_counter()
                c = gguf_compare.compare(str(keep[f"sling-{typ}"]), str(keep[f"ref-{typ}"]))
                v = {"size_gb": size, "type": typ, "tensors_total": c.tensors_total,
                     "tensors_identical": c.tensors_identical, "tensor_order_equal": c.order_equal,
                     "tensor_diffs": c.tensor_diffs[:20], "kv_compared": c.kv_compared, "kv_diffs": c.kv_diffs[:20],
                     "tensors_equal": not c.tensor_diffs, "file_identical": c.file_identical,
                     "seconds": time.perf_counter() - t0}
                print(f"   whole file identical {c.file_identical}; tensors {c.tensors_identical}/{c.tensors_total} "
                      f"identical, order equal {c.order_equal}, kv diffs {len(c.kv_diffs)}: {c.kv_diffs[:4]}",
                      flush=True)
                result["verification"].append(v)
        for p in keep.values():
            rm(p)
        if not a.keep_models:
            rm(mdir)

    result["total_s"] = time.perf_counter() - t_start
    result["quiet_wait_total_s"] = result.pop("_quiet_total")[0]
    if changed_since(copied):
        result["note"] = f"{src_sling} was rebuilt during the run; the measured copy is the one from the start"
        print("NOTE:", result["note"])
    result["summary"] = summarize(result)
    (a.results / "bench.json").write_text(json.dumps(result, indent=2))
    md = render_md(result)
    (a.results / "bench.md").write_text(md)
    print(md)
    print(f"total {result['total_s']:.0f} s; results in {a.results}/bench.json and bench.md")


# ------------------------------------------------------------------------------------------------------------
def summarize(result) -> list[dict]:
    groups = {}
    for r in result["runs"]:
        groups.setdefault((r["tool"], r["size_gb"], r["type"], str(r["threads"])), []).append(r)
    rows = []
    for (tool, size, typ, threads), rs in groups.items():
        walls = [r["wall_s"] for r in rs]
        rows.append({
            "tool": tool, "size_gb": size, "type": typ, "threads": threads, "n": len(rs),
            "wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
            "sync_s": statistics.median(r["sync_s"] for r in rs),
            "input_bytes": rs[0]["input_bytes"],
            "gbps": rs[0]["input_bytes"] / statistics.median(walls) / 1e9,
            "max_rss_mib": max(r["max_rss_kib"] for r in rs) / 1024,
            "peak_anon_mib": max(r["peak_rss_anon_kib"] for r in rs) / 1024,
            "peak_file_mib": max(r["peak_rss_file_kib"] for r in rs) / 1024,
            "cpu_pct": statistics.median(r["cpu_pct"] or 0 for r in rs),
            "load_before": max(r["loadavg_before"][0] for r in rs),
            "other_cores": statistics.median(r["other_cpu_s"] / r["wall_s"] for r in rs),
        })
    def find(tool, size, typ):
        return next((x for x in rows if x["tool"] == tool and x["size_gb"] == size and x["type"] == typ), None)
    for r in rows:
        ref = find("reference", r["size_gb"], r["type"])
        cp = find("cp", r["size_gb"], "copy")
        r["speedup_vs_ref"] = ref["wall_s"] / r["wall_s"] if ref else None
        r["ratio_to_cp"] = r["wall_s"] / cp["wall_s"] if cp else None
        r["durable_ratio_to_cp"] = ((r["wall_s"] + r["sync_s"]) / (cp["wall_s"] + cp["sync_s"])) if cp else None
    order = {"cp": 0, "sling": 1, "sling --no-manifest": 1.5, "reference": 2}
    rows.sort(key=lambda r: (r["size_gb"], order[r["tool"]], r["type"], r["threads"]))
    return rows


def render_md(result) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['nproc']} CPUs, {m['cpu']} (model {m['cpu_model_number']}, {m['hypervisor'] or 'bare metal'}), "
        f"{m['mem_gib']} GiB RAM, kernel {m['kernel']}; {result['sling_version']} at {m['git_rev']} "
        f"(binary sha256 {result['sling_binary']['sha256'][:12]}, built {result['sling_binary']['mtime_utc']}); "
        f"{m['date_utc']}.",
        "",
        "| tool | model | type | threads | runs | wall s (median) | GB/s input | + sync s | peak RSS MiB | "
        "anon / file MiB | speed-up vs reference | ratio to cp | durable ratio to cp+sync | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        f = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"
        spread = f" ({r['wall_min_s']:.2f}–{r['wall_max_s']:.2f})" if r["n"] > 1 else ""
        lines.append(
            f"| {r['tool']} | {r['size_gb']:g} GB | {r['type']} | {r['threads']} | {r['n']} | {r['wall_s']:.2f}{spread} | "
            f"{r['gbps']:.3f} | {r['sync_s']:.2f} | {r['max_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} / "
            f"{r['peak_file_mib']:.0f} | {f(r['speedup_vs_ref'], 1) + 'x' if r['speedup_vs_ref'] else '—'} | "
            f"{f(r['ratio_to_cp'])} | {f(r['durable_ratio_to_cp'])} | {r['other_cores']:.2f} |")
    lines.append("")
    for v in result["verification"]:
        lines.append(f"- {v['size_gb']:g} GB {v['type']}: sling vs reference tensors {v['tensors_identical']}/"
                     f"{v['tensors_total']} byte-identical (order equal: {v['tensor_order_equal']}); "
                     f"metadata keys differing: {len(v['kv_diffs'])}; whole file identical: "
                     f"{v.get('file_identical', 'not checked')}" +
                     (f" ({'; '.join(v['kv_diffs'])})" if v["kv_diffs"] else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
