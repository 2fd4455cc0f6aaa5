#!/usr/bin/env python3
"""vLLM and MLX targets benchmark: `sling quantize --to vllm:SCHEME / mlx:BITS` vs the tools people use today.

    /root/.cache/sling-lab/venv/bin/python scripts/bench/targets.py        # 1 GB and 2.5 GB, ~15-25 min on 2 cores

Needs target/release/sling (cargo build --release -p sling), mlx-lm in the main lab venv (--python) and
llm-compressor in its own venv (--llmc-python; `python3 -m venv ~/.cache/sling-lab/venv-llmc && pip install -r
shared/oracles/requirements-llmc.lock.txt`, llmcompressor 0.14.0.1, compressed-tensors 0.19.0, torch 2.14 CPU).

For every model size (--sizes, default 1,2.5 GB; make_synthetic.py's bf16 Qwen3-MoE, same tensor shapes, more
layers) and every target (--targets, default all four):
  vllm:w4a16      sling `--to vllm:w4a16` (int4, group 128, symmetric, pack-quantized)
                  vs llm-compressor `oneshot` + QuantizationModifier(scheme="W4A16") with no dataset (RTN), CPU
  vllm:fp8-block  sling `--to vllm:fp8-block` vs llm-compressor `model_free_ptq(scheme="FP8_BLOCK")` (data-free,
                  streams the safetensors shard by shard, no model definition)
  vllm:nvfp4      sling `--to vllm:nvfp4` vs `model_free_ptq(scheme="NVFP4A16")`
  mlx:4           sling `--to mlx:4` (affine, group 64) vs `python -m mlx_lm convert --hf-path SRC --mlx-path OUT
                  -q --q-bits 4 --q-group-size 64` (mlx-lm, Linux CPU build of MLX)
The llm-compressor commands are scripts/bench/targets_ref.py (see there; one process per run, Python imports
included, as sling's process start is). sling runs with `--no-manifest` (the references hash nothing) at the
default thread count (all cores) and with `-t 1`; at the --detail-sizes (default: the smallest) also once with the
manifest (sha256 of every source and output file and tensor, the default). The references have no thread option:
torch and MLX use all cores. Speed-ups compare wall times with the reference's (one process each, end to end).

Sanity check of the outputs, per size and target, sling's (`--no-manifest`, default threads) against the
reference's: both directories' safetensors are opened with the safetensors library (torch) and every tensor read;
recorded: the tensor names only one side has, names whose dtype or shape differ, how many tensors are
byte-identical, the share of differing bytes in the others, and the total safetensors size of each side.

Measurement is run.py's and quantize.py's (scripts/bench/measure.py): /usr/bin/time -v per command (wall, user,
sys, peak RSS = VmHWM), RssAnon/RssFile sampled every 20 ms, the model read into the page cache before every run,
outputs deleted and `sync` before, a timed `sync` after, a wait for the rest of the machine to go quiet (< 0.25
cores) before each run, and the CPU the rest of the machine used meanwhile (other_cpu_s). A run during which the
others used more than --noisy cores (default 0.3) is run again, up to --max-tries times; the least disturbed attempt
counts (all are kept in the JSON). sling is measured from a private copy (WORK/sling, sha256 recorded).

Outputs: RESULTS/targets.json (everything) and RESULTS/targets.md (the table); RESULTS defaults to
scripts/bench/results. `--update` measures only --sizes x --targets again (e.g. rows a busy machine disturbed) and
keeps the other (size, target) pairs of the existing targets.json (the replaced runs stay there under
superseded_runs); it refuses a sling binary whose sha256 differs
(pass --sling with the measured copy). Options: --sizes 1,2.5  --targets vllm:w4a16,vllm:fp8-block,vllm:nvfp4,mlx:4
--repeat 1 --work /tmp/sling-bench-targets  --skip-ref  --keep-models  --sling PATH  --python PATH  --llmc-python PATH.
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

from measure import changed_since, machine_info, measure, private_copy, rm, sync_time, wait_quiet, warm

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LAB = Path("/root/.cache/sling-lab")
DEFAULT_PY = LAB / "venv" / "bin" / "python"
DEFAULT_LLMC_PY = LAB / "venv-llmc" / "bin" / "python"
TARGETS = ("vllm:w4a16", "vllm:fp8-block", "vllm:nvfp4", "mlx:4")
# what each target is measured against, and the goal (speed-up of sling, default threads, --no-manifest)
REFERENCE = {
    "vllm:w4a16": ("llm-compressor oneshot W4A16 (RTN)", 5.0),
    "vllm:fp8-block": ("llm-compressor model_free_ptq FP8_BLOCK", 3.0),
    "vllm:nvfp4": ("llm-compressor model_free_ptq NVFP4A16", 3.0),
    "mlx:4": ("mlx_lm.convert -q --q-bits 4 --q-group-size 64", 3.0),
}
RSS_GOAL_MIB = 512


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


def dir_bytes(p: Path, suffix: str = "") -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name.endswith(suffix))


def ref_cmd(a, target: str, mdir: Path, out: Path) -> list:
    if target == "mlx:4":
        return [a.python, "-m", "mlx_lm", "convert", "--hf-path", mdir, "--mlx-path", out, "-q", "--q-bits", "4",
                "--q-group-size", "64"]
    mode, scheme = {"vllm:w4a16": ("oneshot", "W4A16"), "vllm:fp8-block": ("model-free", "FP8_BLOCK"),
                    "vllm:nvfp4": ("model-free", "NVFP4A16")}[target]
    return [a.llmc_python, HERE / "targets_ref.py", mode, mdir, out, "--scheme", scheme]


# ------------------------------------------------------------------------------------------------------------
def compare_dirs(sling_dir: Path, ref_dir: Path) -> dict:
    """Both sides' safetensors, opened with the safetensors library and read tensor by tensor."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as s:
                for k in s.keys():
                    out[k] = f
        return out

    sa, sb = index(sling_dir), index(ref_dir)
    common = sorted(set(sa) & set(sb))
    meta_diffs, identical, diff_bytes, diff_total, diff_tensors = [], 0, 0, 0, []
    handles = {}

    def get(f: Path, k: str):
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(k)

    for k in common:
        x, y = get(sa[k], k), get(sb[k], k)
        if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
            meta_diffs.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            continue
        bx = x.contiguous().view(torch.uint8).flatten()
        by = y.contiguous().view(torch.uint8).flatten()
        n = int((bx != by).sum())
        if n == 0:
            identical += 1
        else:
            diff_bytes += n
            diff_total += bx.numel()
            diff_tensors.append(k)
    return {
        "sling_tensors": len(sa), "reference_tensors": len(sb), "common": len(common),
        "only_sling": sorted(set(sa) - set(sb))[:20], "only_reference": sorted(set(sb) - set(sa))[:20],
        "n_only_sling": len(set(sa) - set(sb)), "n_only_reference": len(set(sb) - set(sa)),
        "dtype_or_shape_diffs": meta_diffs[:20], "n_dtype_or_shape_diffs": len(meta_diffs),
        "byte_identical": identical, "differing_tensors_sample": diff_tensors[:10],
        "differing_byte_share": diff_bytes / diff_total if diff_total else 0.0,
        "sling_safetensors_bytes": dir_bytes(sling_dir, ".safetensors"),
        "reference_safetensors_bytes": dir_bytes(ref_dir, ".safetensors"),
    }


# ------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2.5", help="model sizes in GB, comma-separated")
    ap.add_argument("--detail-sizes", default=None, help="sizes that also get a run with the manifest "
                                                         "(default: the smallest)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each sling configuration (median)")
    ap.add_argument("--ref-repeat", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sling-bench-targets"))
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--sling", type=Path, default=REPO / "target" / "release" / "sling")
    ap.add_argument("--python", default=str(DEFAULT_PY if DEFAULT_PY.exists() else sys.executable),
                    help="python with numpy, safetensors, torch, mlx-lm")
    ap.add_argument("--llmc-python", default=str(DEFAULT_LLMC_PY), help="python with llmcompressor")
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="before each run, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--quiet-budget", type=float, default=420, help="total seconds of such waits")
    ap.add_argument("--noisy", type=float, default=0.3, help="others' cores above which a run is repeated")
    ap.add_argument("--max-tries", type=int, default=2)
    ap.add_argument("--keep-models", action="store_true", help="reuse/keep the synthetic models in WORK")
    ap.add_argument("--update", action="store_true",
                    help="measure only --sizes x --targets again and keep every other (size, target) of the existing "
                         "RESULTS/targets.json; refused unless the sling binary has the same sha256")
    a = ap.parse_args()

    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time missing: apt-get install -y time")
    if not a.sling.exists():
        sys.exit(f"{a.sling} missing: cargo build --release -p sling")
    if not a.skip_ref and not Path(a.llmc_python).exists():
        sys.exit(f"{a.llmc_python} missing (llm-compressor's venv, see the docstring) or use --skip-ref")
    sizes = [float(s) for s in a.sizes.split(",")]
    detail = [float(s) for s in a.detail_sizes.split(",")] if a.detail_sizes else [min(sizes)]
    targets = a.targets.split(",")
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    outdir, logs = a.work / "out", a.work / "logs"
    outdir.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)

    src_sling = a.sling
    sling = a.work / "sling"
    copied = private_copy(src_sling, sling)
    sling_ver = subprocess.run([str(sling), "--version"], capture_output=True, text=True).stdout.strip()

    def version(py, code):
        p = subprocess.run([py, "-c", code], capture_output=True, text=True)
        return p.stdout.strip() or p.stderr.strip()[-200:]
    versions = {
        "llmcompressor": version(a.llmc_python, "import importlib.metadata as m; print(' '.join(f'{p} '"
                                 "+m.version(p) for p in ('llmcompressor','compressed-tensors','torch','transformers')))"),
        "mlx": version(a.python, "import importlib.metadata as m; print(' '.join(f'{p} '+m.version(p) "
                                 "for p in ('mlx','mlx-lm','transformers')))"),
    } if not a.skip_ref else {}
    if a.update:
        prev_path = a.results / "targets.json"
        if not prev_path.exists():
            sys.exit(f"--update: {prev_path} missing")
        prev_sha = json.loads(prev_path.read_text())["sling_binary"]["sha256"]
        if prev_sha != copied["sha256"]:
            sys.exit(f"--update: {prev_path} measured sling {prev_sha[:12]}, this binary is {copied['sha256'][:12]} "
                     f"(pass --sling with the same binary, or measure everything again)")
    nproc = os.cpu_count()
    result = {"machine": machine_info(), "sling": str(src_sling), "sling_version": sling_ver,
              "sling_binary": {k: copied[k] for k in ("sha256", "size", "mtime_utc")}, "versions": versions,
              "args": {k: str(v) for k, v in vars(a).items()}, "nproc": nproc, "sizes": sizes,
              "detail_sizes": detail, "targets": targets, "references": {t: REFERENCE[t][0] for t in targets},
              "models": [], "runs": [], "verification": [], "failures": []}
    quiet = Quiet(a.quiet_wait, a.quiet_budget)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
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

        def run(tool, target, threads, cmd, out_path, keep=False):
            reps = a.ref_repeat if tool == "reference" else a.repeat
            for i in range(reps):
                for attempt in range(a.max_tries):
                    rm(out_path)
                    subprocess.run(["sync"], check=True)
                    quiet_s = quiet.wait()
                    warm_s = warm(shards)
                    name = f"{tool.replace(' ', '')}-{tag}-{target.replace(':', '_')}-t{threads}-{i}-{attempt}"
                    print(f"-- {name}: {' '.join(map(str, cmd))}", flush=True)
                    try:
                        r = measure([str(c) for c in cmd], logs / f"{name}.log", env=env)
                    except SystemExit as e:   # measure() exits on a failed command: record it, go on
                        print(f"   FAILED: {e}", flush=True)
                        result["failures"].append({"tool": tool, "size_gb": size, "target": target,
                                                   "threads": threads, "cmd": " ".join(map(str, cmd)),
                                                   "error": str(e)[-3000:]})
                        return
                    r["sync_s"] = sync_time()
                    r.update(tool=tool, size_gb=size, target=target, threads=threads, rep=i, attempt=attempt,
                             input_bytes=in_bytes, warm_s=warm_s, quiet_wait_s=quiet_s, cmd=" ".join(map(str, cmd)))
                    if out_path.exists():
                        r["output_bytes"] = dir_bytes(out_path)
                        r["output_safetensors_bytes"] = dir_bytes(out_path, ".safetensors")
                    if tool == "reference" and target.startswith("vllm:"):
                        for line in reversed((logs / f"{name}.log").read_text(errors="replace").splitlines()):
                            if line.startswith("{") and '"phases"' in line:
                                r["ref_phases"] = json.loads(line)["phases"]
                                break
                    oc = other_cores(r)
                    print(f"   wall {r['wall_s']:.2f}s  {in_bytes / r['wall_s'] / 1e9:.3f} GB/s  user {r['user_s']:.1f} "
                          f"sys {r['sys_s']:.1f}  maxrss {r['max_rss_kib'] / 1024:.0f} MiB (anon "
                          f"{r['peak_rss_anon_kib'] / 1024:.0f}, file {r['peak_rss_file_kib'] / 1024:.0f})  "
                          f"out {r.get('output_bytes', 0) / 1e6:.0f} MB  others {oc:.2f} cores", flush=True)
                    result["runs"].append(r)
                    if oc <= a.noisy:
                        break
                    if attempt + 1 < a.max_tries:
                        print(f"   noisy (others used {oc:.2f} cores > {a.noisy}): running it again", flush=True)
            if not keep:
                rm(out_path)

        for target in targets:
            base = [sling, "quantize", mdir, "--to", target, "-q"]
            keep_out = outdir / f"sling-{target.replace(':', '_')}"
            run("sling --no-manifest", target, f"default({nproc})", base + ["--no-manifest", "-o", keep_out], keep_out,
                keep=True)
            t = outdir / "sling-t"
            run("sling --no-manifest", target, 1, base + ["--no-manifest", "-t", "1", "-o", t], t)
            if size in detail:
                run("sling", target, f"default({nproc})", base + ["-o", t], t)
            if not a.skip_ref:
                ref = outdir / f"ref-{target.replace(':', '_')}"
                run("reference", target, f"default({nproc})", ref_cmd(a, target, mdir, ref), ref, keep=True)
                if not (ref.exists() and keep_out.exists()):
                    rm(ref)
                    rm(keep_out)
                    continue
                print(f"== comparing sling's {target} with the reference's ({tag})", flush=True)
                t0 = time.perf_counter()
                v = compare_dirs(keep_out, ref)
                v.update(size_gb=size, target=target, seconds=time.perf_counter() - t0)
                print(f"   tensors sling {v['sling_tensors']} / ref {v['reference_tensors']}, only sling "
                      f"{v['n_only_sling']}, only ref {v['n_only_reference']}, dtype/shape diffs "
                      f"{v['n_dtype_or_shape_diffs']}, byte-identical {v['byte_identical']}/{v['common']}, "
                      f"differing bytes in the others {100 * v['differing_byte_share']:.2f} %, safetensors "
                      f"{v['sling_safetensors_bytes']:,} vs {v['reference_safetensors_bytes']:,}", flush=True)
                result["verification"].append(v)
                rm(ref)
            rm(keep_out)
        if not a.keep_models:
            rm(mdir)

    result["total_s"] = time.perf_counter() - t_start
    result["quiet_wait_total_s"] = quiet.used
    if changed_since(copied):
        result["note"] = f"{src_sling} was rebuilt during the run; the measured copy is the one from the start"
        print("NOTE:", result["note"])
    if a.update:
        merge_previous(result, a.results / "targets.json")
    result["summary"] = summarize(result)
    result["goals"] = goals(result)
    (a.results / "targets.json").write_text(json.dumps(result, indent=2))
    md = render_md(result)
    (a.results / "targets.md").write_text(md)
    print(md)
    print(f"total {result['total_s']:.0f} s; results in {a.results}/targets.json and targets.md")


# ------------------------------------------------------------------------------------------------------------
def merge_previous(result: dict, prev_path: Path):
    """--update: the (size, target) pairs this invocation did not measure come from the previous targets.json;
    its other invocations are listed under "invocations" (machine, time, what they measured)."""
    prev = json.loads(prev_path.read_text())
    mine = {(s, t) for s in result["sizes"] for t in result["targets"]}
    keep = lambda x: (x["size_gb"], x["target"]) not in mine  # noqa: E731
    # the runs measured again stay in the JSON (not in the table) under superseded_runs
    result["superseded_runs"] = prev.get("superseded_runs", []) + [r for r in prev["runs"] if not keep(r)]
    result["runs"] = [r for r in prev["runs"] if keep(r)] + result["runs"]
    result["verification"] = [v for v in prev["verification"] if keep(v)] + result["verification"]
    result["failures"] = [f for f in prev.get("failures", []) if keep(f)] + result["failures"]
    sizes = sorted(set(prev["sizes"]) | set(result["sizes"]))
    targets = [t for t in TARGETS if t in set(prev["targets"]) | set(result["targets"])]
    models = {m["size_gb"]: m for m in prev["models"]}
    models.update({m["size_gb"]: m for m in result["models"]})
    this = {"date_utc": result["machine"]["date_utc"], "git_rev": result["machine"]["git_rev"],
            "sizes": result["sizes"], "targets": result["targets"], "total_s": result["total_s"],
            "quiet_wait_total_s": result["quiet_wait_total_s"]}
    earlier = prev.get("invocations") or [
        {"date_utc": prev["machine"]["date_utc"], "git_rev": prev["machine"]["git_rev"], "sizes": prev["sizes"],
         "targets": prev["targets"], "total_s": prev["total_s"], "quiet_wait_total_s": prev.get("quiet_wait_total_s")}]
    # same sha256 (checked before measuring): keep the first record, whose mtime is the build's, not a copy's
    result["sling_binary"] = prev["sling_binary"]
    result.update(sizes=sizes, targets=targets, models=[models[s] for s in sizes],
                  references={t: REFERENCE[t][0] for t in targets}, invocations=earlier + [this])


def pick(runs: list[dict]) -> list[dict]:
    """Per repeat, the attempt the others disturbed least."""
    by_rep = {}
    for r in runs:
        by_rep.setdefault(r["rep"], []).append(r)
    return [min(rs, key=other_cores) for rs in by_rep.values()]


def summarize(result) -> list[dict]:
    groups = {}
    for r in result["runs"]:
        groups.setdefault((r["tool"], r["size_gb"], r["target"], str(r["threads"])), []).append(r)
    rows = []
    for (tool, size, target, threads), runs in groups.items():
        rs = pick(runs)
        walls = [r["wall_s"] for r in rs]
        wall = statistics.median(walls)
        rows.append({
            "tool": tool, "size_gb": size, "target": target, "threads": threads, "n": len(rs), "attempts": len(runs),
            "wall_s": wall, "wall_min_s": min(walls), "wall_max_s": max(walls),
            "gbps": rs[0]["input_bytes"] / wall / 1e9, "input_bytes": rs[0]["input_bytes"],
            "user_s": statistics.median(r["user_s"] or 0 for r in rs),
            "sys_s": statistics.median(r["sys_s"] or 0 for r in rs),
            "cpu_s": statistics.median((r["user_s"] or 0) + (r["sys_s"] or 0) for r in rs),
            "sync_s": statistics.median(r["sync_s"] for r in rs),
            "max_rss_mib": max(r["max_rss_kib"] for r in rs) / 1024,
            "peak_anon_mib": max(r["peak_rss_anon_kib"] for r in rs) / 1024,
            "peak_file_mib": max(r["peak_rss_file_kib"] for r in rs) / 1024,
            "output_bytes": rs[0].get("output_bytes"),
            "output_safetensors_bytes": rs[0].get("output_safetensors_bytes"),
            "other_cores": max(other_cores(r) for r in rs),
            "ref_phases": rs[0].get("ref_phases"),
        })
    for r in rows:
        ref = next((x for x in rows if x["tool"] == "reference" and x["size_gb"] == r["size_gb"]
                    and x["target"] == r["target"]), None)
        r["speedup_vs_ref"] = ref["wall_s"] / r["wall_s"] if ref else None
        r["cpu_ratio_vs_ref"] = ref["cpu_s"] / r["cpu_s"] if ref and r["cpu_s"] else None
        one = next((x for x in rows if x["tool"] == r["tool"] and x["size_gb"] == r["size_gb"]
                    and x["target"] == r["target"] and x["threads"] == "1"), None)
        r["scaling_vs_1_thread"] = one["wall_s"] / r["wall_s"] if one and r["threads"] != "1" else None
    order = {"sling --no-manifest": 0, "sling": 1, "reference": 2}
    tix = {t: i for i, t in enumerate(TARGETS)}
    rows.sort(key=lambda r: (tix.get(r["target"], 9), r["size_gb"], order[r["tool"]], r["threads"] == "1"))
    return rows


def goals(result) -> dict:
    rows = result["summary"]
    g = {"speedup": [], "rss": []}
    for t in result["targets"]:
        need = REFERENCE[t][1]
        for size in result["sizes"]:
            r = next((x for x in rows if x["tool"] == "sling --no-manifest" and x["target"] == t
                      and x["size_gb"] == size and x["threads"].startswith("default")), None)
            if r and r["speedup_vs_ref"]:
                g["speedup"].append({"target": t, "size_gb": size, "speedup": r["speedup_vs_ref"], "goal": need,
                                     "met": r["speedup_vs_ref"] >= need})
        sl = [x for x in rows if x["tool"].startswith("sling") and x["target"] == t]
        by_size = {s: max((x["max_rss_mib"] for x in sl if x["size_gb"] == s), default=None) for s in result["sizes"]}
        vals = [v for v in by_size.values() if v is not None]
        if vals:
            g["rss"].append({"target": t, "max_rss_mib_by_size": by_size, "max": max(vals),
                             "growth": max(vals) / min(vals), "under_goal": max(vals) < RSS_GOAL_MIB})
    return g


def render_md(result) -> str:
    m = result["machine"]
    f = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    models = "; ".join(f"{x['size_gb']:g} GB = {x['layers']} layers, {x['safetensors_bytes'] / 1e9:.2f} GB in "
                       f"{x['shards']} shards" for x in result["models"])
    lines = [
        f"Machine: {m['nproc']} CPUs, {m['cpu']} (model {m['cpu_model_number']}, {m['hypervisor'] or 'bare metal'}), "
        f"{m['mem_gib']} GiB RAM, kernel {m['kernel']}; {result['sling_version']} at {m['git_rev']} "
        f"(binary sha256 {result['sling_binary']['sha256'][:12]}, built {result['sling_binary']['mtime_utc']}); "
        f"{m['date_utc']}; total {result['total_s']:.0f} s.",
        *([f"Measured in {len(result['invocations'])} invocations (--update), same binary: " + "; ".join(
            f"{i['date_utc']} at {i['git_rev']}: {','.join(f'{s:g}' for s in i['sizes'])} GB x {','.join(i['targets'])}"
            f" ({i['total_s']:.0f} s)" for i in result["invocations"]) + "."] if result.get("invocations") else []),
        "",
        f"References: {'; '.join(f'{k}: {v}' for k, v in result.get('versions', {}).items())}.",
        f"Models (make_synthetic.py, bf16 Qwen3-MoE, hidden 2048, 32 experts x 768): {models}.",
        f"Threads: `default({result['nproc']})` = all cores; the references use all cores (torch / MLX). "
        "Speed-up = reference wall / this row's wall, same model and target.",
        "",
        "| target | model | tool | threads | wall s | GB/s bf16 in | speed-up vs reference | user / sys s | "
        "CPU-time ratio ref / this | speed-up vs 1 thread | peak RSS MiB | anon / file MiB | output MB | "
        "other load (cores) | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        spread = f" ({r['wall_min_s']:.1f}–{r['wall_max_s']:.1f})" if r["n"] > 1 else ""
        tries = f" ({r['attempts']} attempts)" if r["attempts"] > r["n"] else ""
        tool = r["tool"] if r["tool"] != "reference" else result["references"][r["target"]]
        sc = f"{r['scaling_vs_1_thread']:.2f}x" if r["scaling_vs_1_thread"] else "—"
        lines.append(
            f"| {r['target']} | {r['size_gb']:g} GB | {tool} | {r['threads']} | {r['wall_s']:.1f}{spread} | "
            f"{r['gbps']:.3f} | {f(r['speedup_vs_ref'], 1) + 'x' if r['speedup_vs_ref'] else '—'} | "
            f"{r['user_s']:.1f} / {r['sys_s']:.1f} | {f(r['cpu_ratio_vs_ref'], 1) + 'x' if r['cpu_ratio_vs_ref'] else '—'} | "
            f"{sc} | {r['max_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} / {r['peak_file_mib']:.0f} | "
            f"{(r['output_bytes'] or 0) / 1e6:.0f} | {r['other_cores']:.2f} | {r['n']}{tries} |")
    lines.append("")
    phases = [r for r in result["summary"] if r.get("ref_phases")]
    if phases:
        lines.append("llm-compressor's time by phase (targets_ref.py): " + "; ".join(
            f"{r['target']} {r['size_gb']:g} GB: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in r["ref_phases"].items())
            for r in phases) + ".")
        lines.append("")
    tix = {t: i for i, t in enumerate(TARGETS)}
    for v in sorted(result["verification"], key=lambda v: (v["size_gb"], tix.get(v["target"], 9))):
        lines.append(
            f"- {v['size_gb']:g} GB {v['target']}: sling {v['sling_tensors']} tensors, reference {v['reference_tensors']}; "
            f"names only in sling {v['n_only_sling']}{' ' + str(v['only_sling'][:3]) if v['n_only_sling'] else ''}, "
            f"only in the reference {v['n_only_reference']}"
            f"{' ' + str(v['only_reference'][:3]) if v['n_only_reference'] else ''}; dtype/shape differences "
            f"{v['n_dtype_or_shape_diffs']}; byte-identical {v['byte_identical']}/{v['common']} (the others: "
            f"{100 * v['differing_byte_share']:.2f} % of their bytes differ); safetensors "
            f"{v['sling_safetensors_bytes']:,} vs {v['reference_safetensors_bytes']:,} bytes "
            f"({100 * (v['sling_safetensors_bytes'] / v['reference_safetensors_bytes'] - 1):+.2f} %)")
    if result["verification"]:
        lines.append("")
    for x in result.get("failures", []):
        lines.append(f"- FAILED: {x['target']} {x['size_gb']:g} GB {x['tool']} t{x['threads']}: `{x['cmd']}`: "
                     f"{x['error'].splitlines()[0][:300]}")
    g = result["goals"]
    for s in g["speedup"]:
        lines.append(f"- goal ≥ {s['goal']:g}x vs the reference, {s['target']} {s['size_gb']:g} GB "
                     f"(--no-manifest, default threads): {s['speedup']:.1f}x — {'met' if s['met'] else 'NOT met'}")
    for s in g["rss"]:
        by = ", ".join(f"{float(k):g} GB {v:.0f} MiB" for k, v in s["max_rss_mib_by_size"].items() if v is not None)
        lines.append(f"- sling peak RSS {s['target']} (max over its runs per size): {by}; growth {s['growth']:.2f}x; "
                     f"< {RSS_GOAL_MIB} MiB: {'met' if s['under_goal'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
