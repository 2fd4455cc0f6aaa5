#!/usr/bin/env python3
"""Evaluation benchmark: `sling eval` (both arithmetics) vs `llama-perplexity --kl-divergence`, same machine, one run.

    /root/.cache/sling-lab/venv/bin/python scripts/bench/eval.py      # ~3 min on 2 cores (+1 min the first time)

Models: calibrate.py's synthetic Qwen3-MoE checkpoints (generated once into $SLING_LAB/bench-calib with the same
parameters, shared with that benchmark), one per --layers count, each quantized with `sling quantize --to
gguf:PRESET` (byte-identical to llama-quantize's) and converted to the F32 GGUF llama-perplexity needs for its base
logits. Text: calibrate.py's (calib.txt repeated), --chunks x --ctx tokens.

Per model, measured with measure.py (wall, CPU, peak RSS of the process tree):
  sling eval                `sling eval --ref MODEL Q.gguf --data TEXT --ctx C --chunks N -t T --json`
                            (default --as llama.cpp-cpu: llama.cpp's CPU activation rounding)
  sling eval --as weights   the same, the dequantized weights in f32
  llama-perplexity          `-m F32.gguf --kl-divergence-base BASE` then `-m Q.gguf --kl-divergence`, both with
                            `-c C --chunks N -t T -ctk f32 -ctv f32 -fa off` (the settings `--as llama.cpp-cpu`
                            reproduces)
Writes RESULTS/NAME.json and RESULTS/NAME.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import calibrate  # noqa: E402  (model generation and the text, shared)
import measure  # noqa: E402

REPO = HERE.parents[1]
LAB = calibrate.LAB
LLAMA_BIN = calibrate.LLAMA_BIN


def model(a, layers: int, sling: Path) -> Path:
    ns = SimpleNamespace(**vars(a))
    p = calibrate.model_params(ns, layers)
    tag = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
    mdir = a.work / f"qwen3moe-{layers}l-{tag}"
    if not (mdir / "params.json").exists():
        print(f"== generating {mdir}", flush=True)
        subprocess.run([a.python, str(HERE / "calibrate.py"), "--generate", str(mdir), "--params", json.dumps(p)],
                       check=True)
    return mdir


def sling_json(log: Path) -> dict:
    text = log.read_text()
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def llama_figures(log: Path) -> dict:
    t = log.read_text(errors="replace")
    out = {}
    m = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", t)
    out["ppl"] = float(m.group(1)) if m else None
    m = re.search(r"Mean\s+KLD:\s*([0-9.]+)", t)
    out["kld_mean"] = float(m.group(1)) if m else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,8")
    for k, v in (("hidden", 1024), ("heads", 16), ("head_dim", 64), ("kv_heads", 4), ("experts", 32), ("top_k", 4),
                 ("moe_ff", 512), ("seed", 1234)):
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=v)
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=LAB / "bench-calib")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="eval")
    ap.add_argument("--sling", type=Path, default=REPO / "target" / "release" / "sling")
    ap.add_argument("--python", default=calibrate.DEFAULT_PY if Path(calibrate.DEFAULT_PY).exists() else sys.executable)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    logs = a.work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)}
    ppl = str(LLAMA_BIN / "llama-perplexity")
    result = {"machine": measure.machine_info(), "args": {k: str(v) for k, v in vars(a).items()}, "runs": []}
    text = None
    for nl in [int(x) for x in a.layers.split(",")]:
        mdir = model(a, nl, a.sling)
        q = mdir.with_name(f"{mdir.name}-{a.preset}.gguf")
        f32 = mdir.with_name(f"{mdir.name}-f32.gguf")
        if not q.exists():
            subprocess.run([str(a.sling), "-q", "quantize", str(mdir), "--to", f"gguf:{a.preset}", "--tokenizer-pre",
                            "gpt-2", "--no-manifest", "-o", str(q)], check=True)
        if not f32.exists():
            subprocess.run([str(a.sling), "-q", "convert", str(mdir), "--type", "f32", "--tokenizer-pre", "gpt-2",
                            "--no-manifest", "--no-model-card", "-o", str(f32)], check=True)
        if text is None:
            text, _ = calibrate.make_text(a, a.sling, mdir)
        common = ["--data", str(text), "--ctx", str(a.ctx), "--chunks", str(a.chunks), "--json"]
        largs = ["-f", str(text), "-c", str(a.ctx), "--chunks", str(a.chunks), "-t", str(a.threads), "-ctk", "f32",
                 "-ctv", "f32", "-fa", "off"]
        base = a.work / "base.kld"
        runs = [
            ("sling eval (--as llama.cpp-cpu)", [str(a.sling), "-t", str(a.threads), "eval", "--ref", str(mdir), str(q),
                                                 *common], None),
            ("sling eval --as weights", [str(a.sling), "-t", str(a.threads), "eval", "--ref", str(mdir), str(q), *common,
                                         "--as", "weights"], None),
            ("llama-perplexity base (F32)", [ppl, "-m", str(f32), *largs, "--kl-divergence-base", str(base)], env),
            ("llama-perplexity --kl-divergence", [ppl, "-m", str(q), *largs, "--kl-divergence-base", str(base),
                                                  "--kl-divergence"], env),
        ]
        for label, cmd, e in runs:
            measure.warm([q, f32, *mdir.glob("*.safetensors")])
            log = logs / f"eval-{nl}l-{re.sub(r'[^a-z0-9]+', '-', label.lower())}.log"
            r = measure.measure(cmd, log, e)
            if label.startswith("sling"):
                j = sling_json(log)
                r.update(ppl=j["ppl"], kld_mean=j["kld_mean"], arithmetic=j.get("arithmetic"))
            elif "--kl-divergence" in label:
                r.update(llama_figures(log))
            r.update(layers=nl, tool=label)
            result["runs"].append(r)
            print(f"{nl} layers  {label:34s} {r['wall_s']:6.2f} s  {r.get('max_rss_kib', 0) / 1024:7.0f} MiB"
                  f"  PPL {r.get('ppl')}  KLD {r.get('kld_mean')}", flush=True)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    md = [f"# {a.name}: sling eval vs llama-perplexity --kl-divergence", "",
          f"{result['machine'].get('date_utc', '')} · sling {result['machine'].get('git_rev', '')} · {a.preset} · "
          f"{a.chunks} x {a.ctx} tokens · {a.threads} threads", "",
          "| layers | tool | wall s | user s | peak RSS MiB | PPL | mean KLD |", "|---|---|---:|---:|---:|---:|---:|"]
    def num(x, f):
        return "" if x is None else format(x, f)
    for r in result["runs"]:
        md.append(f"| {r['layers']} | {r['tool']} | {r['wall_s']:.2f} | {r.get('user_s') or 0:.1f} |"
                  f" {(r.get('max_rss_kib') or 0) / 1024:.0f} | {num(r.get('ppl'), '.2f')} |"
                  f" {num(r.get('kld_mean'), '.6f')} |")
    (a.results / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
