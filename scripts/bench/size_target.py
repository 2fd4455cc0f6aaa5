#!/usr/bin/env python3
"""What `--to gguf:auto` / `mlx:auto` / `vllm:auto` costs beside the quantization itself (docs/performance.md, "Size-targeted
allocation").

    $SLING_LAB/venv/bin/python scripts/bench/size_target.py --size 1 --out /tmp/sling-bench
    $SLING_LAB/venv/bin/python scripts/bench/size_target.py --size 1 --target mlx --bpw 3.5
    $SLING_LAB/venv/bin/python scripts/bench/size_target.py --size 1 --target vllm --bpw 6

On a synthetic Qwen3-MoE checkpoint (make_synthetic.py: Qwen3-30B-A3B's layer shapes, 32 experts) with an imatrix
from `sling calibrate` (untimed), one after the other on the same machine:

  quantize IQ2_XXS          sling quantize --to gguf:IQ2_XXS --imatrix   (the quantization the allocation adds to)
  plan auto (measure)       sling plan --to gguf:auto --target-bpw 2.5 --imatrix   (per-type error measurement only)
  plan auto (measure+probe) the same with --data calib.txt --ctx 64 --chunks 8   (and the KL probes)
  quantize auto             sling quantize --to gguf:auto --target-bpw 2.5 --imatrix --data …   (all of it)

With --target mlx the same steps for MLX: `quantize mlx:4` (round to nearest, the quantization the allocation adds
to), then `mlx:auto` (measure; measure+probe; quantize); with --target vllm, `quantize vllm:w4a16` then `vllm:auto`.

Wall time, CPU time and peak RSS of each (measure.py). Writes results/size_target-<size>g-<threads>t.{json,md}
(`size_target-mlx-…` for MLX, `size_target-vllm-…` for vLLM).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests" / "interop"))
import lab  # noqa: E402
from measure import measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=float, default=1.0, help="model size in GB (make_synthetic.py)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sling-bench"))
    ap.add_argument("--bpw", type=float, default=2.5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--target", choices=("gguf", "mlx", "vllm"), default="gguf")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    src = a.out / f"qwen3moe-{a.size:g}g"
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "make_synthetic.py"), "--size", str(a.size), "--out", str(src)],
                       check=True)
    sling = str(lab.SLING_BIN)
    im = a.out / "size-target-imatrix.gguf"
    if not im.exists():
        print("== sling calibrate (untimed)", flush=True)
        subprocess.run([sling, "-q", "calibrate", str(src), "--data", str(lab.CALIB), "--ctx", "64", "--chunks", "8",
                        "-o", str(im)], check=True)
    probe = ["--data", str(lab.CALIB), "--ctx", "64", "--chunks", "8"]
    if a.target == "gguf":
        common = [str(src), "--tokenizer-pre", lab.TOKPRE, "--imatrix", str(im), "-t", str(a.threads)]
        out, base_to, base_name, tag = a.out / "size-target.gguf", "gguf:IQ2_XXS", "quantize IQ2_XXS", ""
        no_manifest = ["--no-manifest"]
    else:
        common = [str(src), "--imatrix", str(im), "-t", str(a.threads)]
        base_to = {"mlx": "mlx:4", "vllm": "vllm:w4a16"}[a.target]
        out, base_name, tag = a.out / f"size-target-{a.target}", f"quantize {base_to}", f"{a.target}-"
        no_manifest = []
        shutil.rmtree(out, ignore_errors=True)
    auto = f"{a.target}:auto"
    base_common = [c for c in common if c not in ("--imatrix", str(im))] if a.target != "gguf" else common
    runs = [
        (base_name, [sling, "-q", "quantize", *base_common, "--to", base_to, *no_manifest, "-o", str(out)]),
        ("plan auto (measure)", [sling, "-q", "plan", *common, "--to", auto, "--target-bpw", str(a.bpw), "--json"]),
        ("plan auto (measure+probe)", [sling, "-q", "plan", *common, "--to", auto, "--target-bpw", str(a.bpw), *probe,
                                       "--json"]),
        ("quantize auto", [sling, "-q", "quantize", *common, "--to", auto, "--target-bpw", str(a.bpw), *probe,
                           *no_manifest, "-o", str(out)]),
    ]
    rows = []
    for name, cmd in runs:
        print(f"== {name}", flush=True)
        if a.target != "gguf":
            shutil.rmtree(out, ignore_errors=True)
        r = measure(cmd, a.out / f"size-target-{name.split()[0]}-{len(rows)}.log")
        rows.append({"step": name, "wall_s": r["wall_s"], "cpu_s": (r.get("user_s") or 0) + (r.get("sys_s") or 0),
                     "peak_rss_mib": (r.get("max_rss_kib") or 0) / 1024, "other_cpu_s": r["other_cpu_s"]})
        print(f"   {rows[-1]['wall_s']:.1f} s wall, {rows[-1]['cpu_s']:.1f} s CPU, "
              f"{rows[-1]['peak_rss_mib']:.0f} MiB peak RSS", flush=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    res = {"model": src.name, "source_bytes": size, "threads": a.threads, "target_bpw": a.bpw, "rows": rows}
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"size_target-{tag}{a.size:g}g-{a.threads}t.json").write_text(json.dumps(res, indent=2) + "\n")
    base = rows[0]["wall_s"]
    md = [f"Synthetic Qwen3-MoE, {size / 1e9:.2f} GB bf16, {a.threads} threads, --target-bpw {a.bpw}:", "",
          f"| step | wall | × {base_name} | CPU | peak RSS |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['step']} | {r['wall_s']:.1f} s | {r['wall_s'] / base:.2f} | {r['cpu_s']:.1f} s | "
                  f"{r['peak_rss_mib']:.0f} MiB |")
    (results / f"size_target-{tag}{a.size:g}g-{a.threads}t.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
