#!/usr/bin/env python3
"""GPTQ quality over several calibration sets: sling vs llm-compressor (BF16 and float32 calibration).

    /root/.cache/sling-lab/venv/bin/python scripts/bench/gptq_subsets.py [--src DIR] [--window 10]

One calibration set says little about "KLD no worse": which codes GPTQ picks depends on the calibration tokens, and
two correct implementations land a few percent apart on any one set. So this runs the same comparison on several
disjoint sets and reports the spread. The sets: tests/interop/data/calib.txt tokenized with SRC's tokenizer (as
gptq.py does), cut into chunks of each --ctxs length, then consecutive windows of --window chunks (disjoint within
one length; a set is its ctx and window), plus every full chunk at ctx 128 (the set docs/gptq.md reports).

Per set, with the settings of gptq.py's defaults (W4A16, group 128, symmetric, damp 0.01, block 128, act-order
"weight", every expert calibrated on every token):
  llm-compressor      scripts/bench/gptq_ref.py (oneshot GPTQModifier), model loaded in bfloat16 (its default)
  llm-compressor f32  the same, --dtype float32
  sling               sling quantize SRC --to vllm:w4a16 --method gptq --act-order --all-experts --tokens ...
and `sling eval --ref SRC OUT --data eval.txt --json` (ctx 512) of each output: KL divergence from the source.

Outputs: RESULTS/gptq-subsets.json and RESULTS/gptq-subsets.md (RESULTS defaults to scripts/bench/results): per set
the three KLDs, sling's ratio to each, and over the sets the geometric mean of the ratios and how many sets sling
is at or below each. Quality only: the timings are gptq.py's job.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

from gptq import HERE, REPO, add_common_args, calibration_chunks, prepare, sling_eval  # scripts/bench/gptq.py
from measure import machine_info, private_copy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--ctxs", default="128,96", help="chunk lengths, comma-separated")
    ap.add_argument("--window", type=int, default=10, help="chunks per set")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sling-bench-gptq-subsets"))
    ap.add_argument("--results", type=Path, default=HERE / "results")
    a = ap.parse_args()

    src = prepare(a)
    sling = a.work / "sling"
    copied = private_copy(a.sling, sling)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    sets = []
    for ctx in (int(c) for c in a.ctxs.split(",")):
        chunks = calibration_chunks(src, a.calib, ctx, 0)
        for k in range(len(chunks) // a.window):
            sets.append((f"ctx {ctx}, chunks {k * a.window}–{(k + 1) * a.window - 1}", ctx,
                         chunks[k * a.window:(k + 1) * a.window]))
    sets.append(("ctx 128, every chunk", 128, calibration_chunks(src, a.calib, 128, 0)))

    def quant(name: str, cmd: list, out: Path, log: Path) -> dict:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
        log.write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            return {"error": f"{name} exited {r.returncode}: {r.stderr[-1500:]}"}
        return sling_eval(sling, src, out, a, log.with_suffix(".eval.log"))

    rows = []
    for i, (label, ctx, chunks) in enumerate(sets):
        d = a.work / f"set{i}"
        d.mkdir(exist_ok=True)
        tj, tt = d / "tokens.json", d / "tokens.txt"
        tj.write_text(json.dumps({"ctx": ctx, "chunks": chunks}))
        tt.write_text("\n".join(" ".join(map(str, c)) for c in chunks) + "\n")
        ref = [a.llmc_python, HERE / "gptq_ref.py", src, None, "--tokens", tj, "--damp", 0.01, "--block", 128,
               "--actorder", "weight"]
        runs = {
            "llm-compressor": ref[:3] + [d / "llmc"] + ref[4:],
            "llm-compressor f32": ref[:3] + [d / "llmc-f32"] + ref[4:] + ["--dtype", "float32"],
            "sling": [sling, "quantize", src, "--to", "vllm:w4a16", "--method", "gptq", "-o", d / "sling",
                      "--no-manifest", "-q", "--tokens", tt, "--ctx", ctx, "--chunks", len(chunks), "--damp", 0.01,
                      "--act-order", "--all-experts"],
        }
        outs = {"llm-compressor": d / "llmc", "llm-compressor f32": d / "llmc-f32", "sling": d / "sling"}
        row = {"set": label, "ctx": ctx, "chunks": len(chunks), "tokens": ctx * len(chunks), "eval": {}}
        for name, cmd in runs.items():
            e = quant(name, cmd, outs[name], d / f"{name.replace(' ', '-')}.log")
            row["eval"][name] = e
            k = e.get("kld_mean")
            print(f"{label}: {name}: " + (f"KLD {k:.6f} ± {e['kld_mean_err']:.6f}" if k is not None else e["error"]),
                  flush=True)
        rows.append(row)

    def kld(r, name):
        return r["eval"][name].get("kld_mean")

    summary = {}
    for ref in ("llm-compressor", "llm-compressor f32"):
        ratios = [kld(r, "sling") / kld(r, ref) for r in rows if kld(r, "sling") and kld(r, ref)]
        summary[ref] = {
            "sets": len(ratios),
            "geomean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
            "min_ratio": min(ratios, default=None), "max_ratio": max(ratios, default=None),
            "sling_at_or_below": sum(x <= 1.0 for x in ratios)}
    res = {"machine": machine_info(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()), "src": str(src), "sling_binary": {k: copied[k] for k in ("sha256", "mtime_utc")},
           "git": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
           "eval": {"file": str(a.eval), "ctx": a.eval_ctx}, "rows": rows, "summary": summary}
    (a.results / "gptq-subsets.json").write_text(json.dumps(res, indent=1) + "\n")

    lines = ["# GPTQ W4A16 over calibration sets: sling vs llm-compressor", "",
             f"Source `{src}`; sets of `{a.calib.name}` (scripts/bench/gptq_subsets.py); KL divergence from the source "
             f"over `{a.eval.name}` (`sling eval`, ctx {a.eval_ctx}). {res['date_utc']}, git "
             f"{res['git']}.", "",
             "| set | tokens | llm-compressor (BF16) | llm-compressor (float32) | sling | sling / BF16 | sling / float32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ks = [kld(r, n) for n in ("llm-compressor", "llm-compressor f32", "sling")]
        f = [f"{k:.5f}" if k else "—" for k in ks]
        rat = [f"{ks[2] / k:.3f}" if ks[2] and k else "—" for k in ks[:2]]
        lines.append(f"| {r['set']} | {r['tokens']} | {f[0]} | {f[1]} | {f[2]} | {rat[0]} | {rat[1]} |")
    lines.append("")
    for ref, s in summary.items():
        if s["sets"]:
            lines.append(f"sling / {ref}: geometric mean {s['geomean_ratio']:.3f} over {s['sets']} sets (range "
                         f"{s['min_ratio']:.3f}–{s['max_ratio']:.3f}); sling at or below it on {s['sling_at_or_below']}.")
    (a.results / "gptq-subsets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
