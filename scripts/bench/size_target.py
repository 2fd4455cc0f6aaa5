#!/usr/bin/env python3
"""What `--to gguf:auto` costs beside the quantization itself (docs/performance.md, "Size-targeted allocation").

    $SLING_LAB/venv/bin/python scripts/bench/size_target.py --size 1 --out /tmp/sling-bench

On a synthetic Qwen3-MoE checkpoint (make_synthetic.py: Qwen3-30B-A3B's layer shapes, 32 experts) with an imatrix
from `sling calibrate` (untimed), one after the other on the same machine:

  quantize IQ2_XXS          sling quantize --to gguf:IQ2_XXS --imatrix   (the quantization the allocation adds to)
  plan auto (measure)       sling plan --to gguf:auto --target-bpw 2.5 --imatrix   (per-type error measurement only)
  plan auto (measure+probe) the same with --data calib.txt --ctx 64 --chunks 8   (and the KL probes)
  quantize auto             sling quantize --to gguf:auto --target-bpw 2.5 --imatrix --data …   (all of it)

Wall time, CPU time and peak RSS of each (measure.py). Writes results/size_target-<size>g-<threads>t.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
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
    common = [str(src), "--tokenizer-pre", lab.TOKPRE, "--imatrix", str(im), "-t", str(a.threads)]
    probe = ["--data", str(lab.CALIB), "--ctx", "64", "--chunks", "8"]
    out = a.out / "size-target.gguf"
    runs = [
        ("quantize IQ2_XXS", [sling, "-q", "quantize", *common, "--to", "gguf:IQ2_XXS", "--no-manifest", "-o", str(out)]),
        ("plan auto (measure)", [sling, "-q", "plan", *common, "--to", "gguf:auto", "--target-bpw", str(a.bpw),
                                 "--json"]),
        ("plan auto (measure+probe)", [sling, "-q", "plan", *common, "--to", "gguf:auto", "--target-bpw",
                                       str(a.bpw), *probe, "--json"]),
        ("quantize auto", [sling, "-q", "quantize", *common, "--to", "gguf:auto", "--target-bpw", str(a.bpw), *probe,
                           "--no-manifest", "-o", str(out)]),
    ]
    rows = []
    for name, cmd in runs:
        print(f"== {name}", flush=True)
        r = measure(cmd, a.out / f"size-target-{name.split()[0]}-{len(rows)}.log")
        rows.append({"step": name, "wall_s": r["wall_s"], "cpu_s": (r.get("user_s") or 0) + (r.get("sys_s") or 0),
                     "peak_rss_mib": (r.get("max_rss_kib") or 0) / 1024, "other_cpu_s": r["other_cpu_s"]})
        print(f"   {rows[-1]['wall_s']:.1f} s wall, {rows[-1]['cpu_s']:.1f} s CPU, "
              f"{rows[-1]['peak_rss_mib']:.0f} MiB peak RSS", flush=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    res = {"model": src.name, "source_bytes": size, "threads": a.threads, "target_bpw": a.bpw, "rows": rows}
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"size_target-{a.size:g}g-{a.threads}t.json").write_text(json.dumps(res, indent=2) + "\n")
    base = rows[0]["wall_s"]
    md = [f"Synthetic Qwen3-MoE, {size / 1e9:.2f} GB bf16, {a.threads} threads, --target-bpw {a.bpw}:", "",
          "| step | wall | × quantize IQ2_XXS | CPU | peak RSS |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['step']} | {r['wall_s']:.1f} s | {r['wall_s'] / base:.2f} | {r['cpu_s']:.1f} s | "
                  f"{r['peak_rss_mib']:.0f} MiB |")
    (results / f"size_target-{a.size:g}g-{a.threads}t.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
