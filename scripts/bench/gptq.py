#!/usr/bin/env python3
"""GPTQ (or AWQ) benchmark: `sling quantize --to vllm:w4a16 --method gptq|awq` vs llm-compressor `oneshot` W4A16.

    /root/.cache/sling-lab/venv/bin/python scripts/bench/gptq.py [--src DIR] [--sling PATH] [--ctx 128 --chunks 0]

Same checkpoint, same calibration tokens, same machine, one run each:
  reference    scripts/bench/gptq_ref.py in llm-compressor's venv: oneshot(GPTQModifier W4A16, group 128, symmetric,
               ignore lm_head + routers), CPU, sequential pipeline, batch 1, pre-tokenized samples
  sling gptq   sling quantize SRC --to vllm:w4a16 --method gptq --tokens TOKENS --ctx L --chunks N (SLING_GPTQ below:
               the one place that spells the sling command; --sling-input text passes --data calib.txt instead)
  sling rtn    sling quantize SRC --to vllm:w4a16 --method rtn: the round-to-nearest baseline of the KL ratio
  (--ref-rtn)  llm-compressor oneshot W4A16 without data (scripts/bench/targets_ref.py): its RTN, for reference
The calibration samples: tests/interop/data/calib.txt tokenized with SRC's tokenizer.json (tokenizers library, no
special tokens), cut into consecutive chunks of --ctx tokens (the tail dropped), the first --chunks of them (0: all).
Both tools get exactly these ids (TOKENS.json for llm-compressor, whitespace-separated ids for sling's --tokens).
GPTQ settings, the same on both sides: --damp (0.01), --block (128), activation order (llm-compressor's default
actorder=static=weight; sling --act-order; --no-act-order for neither), every routed expert calibrated on every
token (llm-compressor's moe_calibrate_all_experts default True; sling --all-experts; --no-all-experts for neither).

Measured per run (scripts/bench/measure.py, as targets.py): wall time, user/sys, peak RSS (VmHWM and sampled
RssAnon/RssFile), the model read into the page cache before, outputs deleted and `sync` before, a wait for the rest
of the machine to go quiet, the CPU others used meanwhile. Quality: `sling eval --ref SRC OUT --data eval.txt --json`
(KL divergence of each output's next-token distribution from the source's, top-1 agreement, PPL) for every output;
the KL ratios gptq/rtn. sling is measured from a private copy (WORK/sling, sha256 recorded).
Default SRC: the trained fixture qwen3moe-trained (tests/interop/lab.py trained_root(), generated on first use).

--method awq: AWQ on both sides (gptq_ref.py --method awq: AWQModifier + QuantizationModifier; sling --method awq;
the GPTQ settings do not apply), outputs RESULTS/awq.json and RESULTS/awq.md. --method awq-gptq: AWQ then GPTQ on
both sides (gptq_ref.py --method awq-gptq: AWQModifier + GPTQModifier; sling --method awq-gptq with the GPTQ
settings), RESULTS/awq-gptq.json and .md.

Outputs: RESULTS/gptq.json and RESULTS/gptq.md (RESULTS defaults to scripts/bench/results). --skip-ref / --skip-sling
run one side only (e.g. before sling has --method gptq); the table shows what ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from measure import changed_since, machine_info, measure, private_copy, rm, sync_time, wait_quiet, warm

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LAB = Path(os.environ.get("SLING_LAB") or Path.home() / ".cache" / "sling-lab")
DATA = REPO / "tests" / "interop" / "data"


def SLING_GPTQ(a, sling: Path, src: Path, out: Path, method: str, tokens_txt: Path, n: int) -> list:
    """The sling command of the benchmark (the one place to adapt when the CLI changes)."""
    cmd = [sling, "quantize", src, "--to", "vllm:w4a16", "--method", method, "-o", out, "--no-manifest", "-q"]
    if method != "rtn":
        if method == "awq":
            cmd += ["--tokens", tokens_txt] if a.sling_input == "tokens" else ["--data", a.calib]
            cmd += ["--ctx", a.ctx, "--chunks", n]
            return cmd + (["--all-experts"] if a.all_experts else [])
        if a.sling_input == "tokens":
            cmd += ["--tokens", tokens_txt]
        else:
            cmd += ["--data", a.calib]
        cmd += ["--ctx", a.ctx, "--chunks", n, "--damp", a.damp, "--gptq-block-size", a.block]
        if a.act_order:
            cmd += ["--act-order"]
        if a.all_experts:
            cmd += ["--all-experts"]
    return cmd


def calibration_chunks(src: Path, calib: Path, ctx: int, chunks: int) -> list[list[int]]:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(calib.read_text(), add_special_tokens=False).ids
    n = len(ids) // ctx
    if chunks:
        n = min(n, chunks)
    if n == 0:
        raise SystemExit(f"{calib}: {len(ids)} tokens, fewer than one chunk of {ctx}")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def sling_eval(sling: Path, src: Path, out: Path, a, log: Path) -> dict:
    cmd = [str(sling), "eval", "--ref", str(src), str(out), "--data", str(a.eval), "--json", "--ctx", str(a.eval_ctx)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(r.stderr)
    if r.returncode != 0:
        return {"error": f"sling eval exited {r.returncode}: {r.stderr[-1500:]}", "cmd": " ".join(cmd)}
    d = json.loads(r.stdout)
    d["eval_wall_s"] = time.perf_counter() - t0
    return d


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The source, the two tools and the two texts (shared with gptq_subsets.py)."""
    ap.add_argument("--src", type=Path, help="HF model directory (default: the trained fixture qwen3moe-trained)")
    ap.add_argument("--sling", type=Path, default=REPO / "target" / "release" / "sling")
    ap.add_argument("--llmc-python", default=str(LAB / "venv-llmc" / "bin" / "python"))
    ap.add_argument("--calib", type=Path, default=DATA / "calib.txt")
    ap.add_argument("--eval", type=Path, default=DATA / "eval.txt")


def prepare(a) -> Path:
    """The source directory (default: the trained fixture, generated on first use); makes --work and --results."""
    if a.src is None:
        sys.path.insert(0, str(REPO / "tests" / "interop"))
        import lab
        a.src = lab.fixture_dir("qwen3moe-trained")
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    return a.src.resolve()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--ctx", type=int, default=128, help="tokens per calibration sample")
    ap.add_argument("--chunks", type=int, default=0, help="calibration samples (0: every full chunk of calib)")
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--no-act-order", dest="act_order", action="store_false")
    ap.add_argument("--no-all-experts", dest="all_experts", action="store_false")
    ap.add_argument("--method", choices=("gptq", "awq", "awq-gptq"), default="gptq")
    ap.add_argument("--sling-input", choices=("tokens", "text"), default="tokens",
                    help="sling gets the ids (--tokens, default) or the text (--data calib.txt, its own chunking)")
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--skip-sling", action="store_true")
    ap.add_argument("--ref-rtn", action="store_true", help="also llm-compressor's RTN (oneshot without data)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sling-bench-gptq"))
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--quiet-wait", type=float, default=60)
    a = ap.parse_args()

    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time missing: apt-get install -y time")
    src = prepare(a)
    logs = a.work / "logs"
    logs.mkdir(exist_ok=True)
    if not a.sling.exists():
        sys.exit(f"{a.sling} missing: cargo build --release -p sling (or --sling PATH)")
    sling = a.work / "sling"
    copied = private_copy(a.sling, sling)

    chunks = calibration_chunks(src, a.calib, a.ctx, a.chunks)
    n = len(chunks)
    tokens_json, tokens_txt = a.work / "calib-tokens.json", a.work / "calib-tokens.txt"
    tokens_json.write_text(json.dumps({"ctx": a.ctx, "chunks": chunks}))
    tokens_txt.write_text("\n".join(" ".join(map(str, c)) for c in chunks) + "\n")
    shards = sorted(src.glob("*.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def version(py, code):
        p = subprocess.run([py, "-c", code], capture_output=True, text=True)
        return p.stdout.strip() or p.stderr.strip()[-200:]
    result = {
        "machine": machine_info(), "src": str(src), "sling": str(a.sling),
        "sling_version": subprocess.run([str(sling), "--version"], capture_output=True, text=True).stdout.strip(),
        "sling_binary": {k: copied[k] for k in ("sha256", "size", "mtime_utc")},
        "versions": {} if a.skip_ref else {"llmcompressor": version(a.llmc_python, (
            "import importlib.metadata as m; print(' '.join(f'{p} '+m.version(p) for p in "
            "('llmcompressor','compressed-tensors','torch','transformers')))"))},
        "calibration": {"file": str(a.calib), "ctx": a.ctx, "chunks": n, "tokens": n * a.ctx,
                        "sling_input": a.sling_input},
        "gptq": {"damp": a.damp, "block": a.block, "act_order": a.act_order, "all_experts": a.all_experts,
                 "scheme": "W4A16 (int4, group 128, symmetric)", "method": a.method},
        "eval": {"file": str(a.eval), "ctx": a.eval_ctx}, "runs": [], "failures": []}

    def run(tool: str, cmd: list, out: Path):
        rm(out)
        subprocess.run(["sync"], check=True)
        q = wait_quiet(a.quiet_wait)
        w = warm(shards)
        name = tool.replace(" ", "-")
        print(f"-- {tool}: {' '.join(map(str, cmd))}", flush=True)
        try:
            r = measure([str(c) for c in cmd], logs / f"{name}.log", env=env)
        except SystemExit as e:
            print(f"   FAILED: {str(e)[-1500:]}", flush=True)
            result["failures"].append({"tool": tool, "cmd": " ".join(map(str, cmd)), "error": str(e)[-3000:]})
            return None
        r.update(tool=tool, sync_s=sync_time(), quiet_wait_s=q, warm_s=w, cmd=" ".join(map(str, cmd)))
        for line in reversed((logs / f"{name}.log").read_text(errors="replace").splitlines()):
            if line.startswith("{") and '"phases"' in line:
                r["ref_phases"] = json.loads(line)["phases"]
                break
        print(f"   wall {r['wall_s']:.1f}s  user {r['user_s']:.1f}  sys {r['sys_s']:.1f}  maxrss "
              f"{r['max_rss_kib'] / 1024:.0f} MiB  others {r['other_cpu_s'] / max(r['wall_s'], 1e-9):.2f} cores",
              flush=True)
        e = sling_eval(sling, src, out, a, logs / f"{name}.eval.log")
        r["eval"] = e
        if "kld_mean" in e:
            print(f"   KLD {e['kld_mean']:.6f} ± {e['kld_mean_err']:.6f}  top-1 {100 * e['top1']:.2f} %  "
                  f"PPL {e['ppl']:.3f} (ref {e['ppl_ref']:.3f})", flush=True)
        else:
            print(f"   eval failed: {e['error'][-500:]}", flush=True)
        result["runs"].append(r)
        return r

    t0 = time.perf_counter()
    out = a.work / "out"
    out.mkdir(exist_ok=True)
    if not a.skip_ref:
        if a.method == "awq":
            run("llm-compressor awq", [a.llmc_python, HERE / "gptq_ref.py", src, out / "ref-awq", "--tokens",
                                       tokens_json, "--method", "awq"]
                + ([] if a.all_experts else ["--no-all-experts"]), out / "ref-awq")
        else:
            m = a.method
            run(f"llm-compressor {m}", [a.llmc_python, HERE / "gptq_ref.py", src, out / f"ref-{m}", "--tokens",
                                        tokens_json, "--damp", a.damp, "--block", a.block, "--method", m,
                                        "--actorder", "weight" if a.act_order else "none"]
                + ([] if a.all_experts else ["--no-all-experts"]), out / f"ref-{m}")
        if a.ref_rtn:
            run("llm-compressor rtn", [a.llmc_python, HERE / "targets_ref.py", "oneshot", src, out / "ref-rtn",
                                       "--scheme", "W4A16"], out / "ref-rtn")
    if not a.skip_sling:
        m = a.method
        run(f"sling {m}", SLING_GPTQ(a, sling, src, out / f"sling-{m}", m, tokens_txt, n), out / f"sling-{m}")
        run("sling rtn", SLING_GPTQ(a, sling, src, out / "sling-rtn", "rtn", tokens_txt, n), out / "sling-rtn")
    result["total_s"] = time.perf_counter() - t0
    if changed_since(copied):
        result["note"] = f"{a.sling} was rebuilt during the run; the measured copy is the one from the start"

    kld = {r["tool"]: r["eval"].get("kld_mean") for r in result["runs"]}
    rtn = kld.get("sling rtn") or kld.get("llm-compressor rtn")
    result["summary"] = {
        "kld": kld, "rtn_baseline": "sling rtn" if kld.get("sling rtn") else ("llm-compressor rtn" if rtn else None),
        "kld_ratio_vs_rtn": {t: (v / rtn if v is not None and rtn else None) for t, v in kld.items()},
        "wall_s": {r["tool"]: r["wall_s"] for r in result["runs"]},
        "max_rss_mib": {r["tool"]: r["max_rss_kib"] / 1024 for r in result["runs"]},
    }
    ref = next((r for r in result["runs"] if r["tool"] == f"llm-compressor {a.method}"), None)
    mine = next((r for r in result["runs"] if r["tool"] == f"sling {a.method}"), None)
    if ref and mine:
        result["summary"]["speedup_sling_vs_llmc"] = ref["wall_s"] / mine["wall_s"]
    (a.results / f"{a.method}.json").write_text(json.dumps(result, indent=2, default=str))
    md = render_md(result)
    (a.results / f"{a.method}.md").write_text(md)
    print(md)


def render_md(res: dict) -> str:
    c, g = res["calibration"], res["gptq"]
    lines = [
        f"# {g.get('method', 'gptq').upper()} W4A16: sling vs llm-compressor", "",
        f"Source `{res['src']}`; calibration {c['chunks']} x {c['ctx']} tokens of `{Path(c['file']).name}` "
        f"(identical ids on both sides; sling input: {c['sling_input']}); damp {g['damp']}, block {g['block']}, "
        f"act-order {g['act_order']}, all experts {g['all_experts']}. KL divergence from the source over "
        f"`{Path(res['eval']['file']).name}` (`sling eval`, ctx {res['eval']['ctx']}). Machine: {res['machine']['cpu']} "
        f"x{res['machine']['nproc']}, {res['machine']['date_utc']}, git {res['machine']['git_rev']}. "
        f"{res['versions'].get('llmcompressor', '')}; {res['sling_version']}.", "",
        "| tool | wall s | user s | peak RSS MiB | KLD mean | ± | top-1 % | PPL (src) | KLD / RTN |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratio = res["summary"]["kld_ratio_vs_rtn"]
    for r in res["runs"]:
        e = r["eval"]
        if "kld_mean" in e:
            q = (f"{e['kld_mean']:.6f} | {e['kld_mean_err']:.6f} | {100 * e['top1']:.2f} | "
                 f"{e['ppl']:.3f} ({e['ppl_ref']:.3f})")
        else:
            q = "eval failed | | | "
        rr = ratio.get(r["tool"])
        lines.append(f"| {r['tool']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['max_rss_kib'] / 1024:.0f} | {q} | "
                     f"{'' if rr is None else f'{rr:.3f}'} |")
    for f in res["failures"]:
        lines.append(f"| {f['tool']} | failed | | | | | | | |")
    if res["summary"].get("rtn_baseline"):
        lines += ["", f"KLD / RTN: relative to {res['summary']['rtn_baseline']}."]
    if "speedup_sling_vs_llmc" in res["summary"]:
        lines += [f"sling {g.get('method', 'gptq')} is {res['summary']['speedup_sling_vs_llmc']:.2f}x the speed of llm-compressor "
                  "(wall, one process each, imports included)."]
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
