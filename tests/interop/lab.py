"""Shared helpers of the interop suite: where sling and the reference tools are, how to run them, the cache of
reference outputs, and the results files.

Environment:
  SLING_BIN          the sling binary (default target/release/sling; scripts/test builds it)
  SLING_LAB          reference tools installed by scripts/setup-reference.sh (default ~/.cache/sling-lab)
  SLING_REFCACHE     cache of reference outputs (default $SLING_LAB/refcache)
  SLING_TEST_RESULTS results directory (default tests/interop/results)
  SLING_TEST_JOBS    parallel reference conversions / threads (default: number of CPUs)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO / "fixtures" / "models"
LAB = Path(os.environ.get("SLING_LAB") or Path.home() / ".cache" / "sling-lab")
LLAMA_CPP = LAB / "llama.cpp"
LLAMA_BIN = LAB / "llama.cpp-build" / "bin"
PYLIB = LAB / "pylib"
_target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
SLING_BIN = Path(os.environ.get("SLING_BIN") or _target / "release" / "sling")
CACHE = Path(os.environ.get("SLING_REFCACHE") or LAB / "refcache")
RESULTS = Path(os.environ.get("SLING_TEST_RESULTS") or HERE / "results")
JOBS = max(1, int(os.environ.get("SLING_TEST_JOBS") or os.cpu_count() or 1))

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
TOKPRE = "gpt-2"  # the fixtures' tokenizer is unknown to llama.cpp's chkhsh table; see convert_compat.py
# The first 16 ids of oracle_check's text "The quick brown fox jumps over the lazy dog..." in the fixtures'
# tokenizer (all fixtures share it; vocab 384). Fed as ids to both sides, so tokenization plays no part.
TOKEN_IDS = [342, 223, 83, 87, 296, 77, 264, 84, 328, 80, 305, 81, 90, 223, 76, 87]

# `general.*` naming keys the reference converter derives from the directory name, config.json `_name_or_path`, a
# model card and the parameter count (gguf-py `Metadata.load` / `size_label`). sling derives them the same way
# (targets/gguf/src/convert/naming.rs), so sling-vs-reference comparisons ignore nothing; this list is only for
# comparisons of two files converted from differently named directories (test_vllm.py).
NAMING_KEYS = {
    "general.name": "id_to_title of the directory name (e.g. 'Qwen3Moe')",
    "general.basename": "heuristic split of the directory name",
    "general.finetune": "heuristic split of the directory name",
    "general.version": "heuristic split of the directory name",
    "general.size_label": "from the parameter and expert counts (e.g. '8x112K')",
}
# The intended difference: sling writes sigmoid gating for DeepseekV3ForCausalLM, whose transformers-saved configs
# lack `scoring_func` (transformers hard-codes sigmoid); the reference then omits the key and llama.cpp falls back to
# softmax. sling's file is the reference's file for the config that states it: whole-file comparisons of these
# fixtures run the reference converter on a copy of the fixture (same directory name) whose config.json says
# `"scoring_func": "sigmoid"` (stated_fixture_dir).
GATING_KEY = "deepseek2.expert_gating_func"
SIGMOID = 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
INTENDED = {name: {GATING_KEY: SIGMOID} for name in ("deepseekv3", "deepseekv3-fp8")}
STATED_CONFIG = {"scoring_func": "sigmoid"}


def states_gating(name: str) -> bool:
    """Whether whole-file comparisons of fixture `name` need the reference run on stated_fixture_dir(name)."""
    return name.removesuffix("-wide") in INTENDED


SETUP_HINT = ("run scripts/setup-reference.sh (installs the reference tools under $SLING_LAB, default "
              "~/.cache/sling-lab), then scripts/test")

# Read GGUFs with the gguf-py of the pinned llama.cpp: it knows every type its converter writes (MXFP4 too).
if str(LLAMA_CPP / "gguf-py") not in sys.path:
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))


# ---------------------------------------------------------------------------------------------------------------
# tools
def missing_tools() -> list[str]:
    """Everything the suite needs that is not there, as human-readable lines (empty list: all present)."""
    miss = []
    if not (SLING_BIN.is_file() and os.access(SLING_BIN, os.X_OK)):
        miss.append(f"sling binary {SLING_BIN} (build it: cargo build --release -p sling, or set SLING_BIN)")
    for p, what in [
        (LLAMA_CPP / "convert_hf_to_gguf.py", "llama.cpp reference converter"),
        (LLAMA_CPP / "gguf-py" / "gguf", "llama.cpp gguf-py"),
        (LLAMA_BIN / "libllama.so", "libllama.so (llama.cpp build)"),
        (LLAMA_BIN / "llama-gguf-split", "llama-gguf-split"),
        (PYLIB / "llama_cpp" / "llama.py", "llama-cpp-python ctypes bindings"),
    ]:
        if not p.exists():
            miss.append(f"{what}: {p}")
    for mod in ("numpy", "torch", "transformers", "safetensors", "compressed_tensors", "mlx", "mlx_lm"):
        if importlib.util.find_spec(mod) is None:
            miss.append(f"python module {mod!r} in {sys.executable} (run pytest with $SLING_LAB/venv/bin/python)")
    return miss


def versions() -> dict:
    v = {}
    for pkg in ("torch", "transformers", "safetensors", "numpy", "tokenizers"):
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    sv = LLAMA_CPP / ".sling_version"
    v["llama.cpp"] = ("vendored by llama-cpp-python " + sv.read_text().strip()) if sv.exists() else "unknown"
    return v


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def fixture_names() -> tuple[str, ...]:
    return tuple(sorted(d.name for d in FIXTURES.iterdir() if (d / "config.json").is_file()))


# Wide fixtures: the same architectures with every matrix dimension a multiple of 256, so that K-quants and IQ4_XS
# apply without row fallbacks (~7 MB each, so generated here instead of committed). Named "<base>-wide".
WIDE = ("mixtral", "qwen3moe", "deepseekv3", "gptoss-mxfp4")
MAKE_FIXTURES = REPO / "fixtures" / "make_fixtures.py"


@lru_cache(maxsize=None)
def wide_root() -> Path:
    """$SLING_LAB/fixtures-wide/<hash of make_fixtures.py>, generated on first use (seeded: same bytes every time)."""
    def make(out: Path) -> None:
        r = subprocess.run([str(LAB / "venv" / "bin" / "python"), str(MAKE_FIXTURES), "--wide", "--out", str(out),
                            "--only", ",".join(WIDE)], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"make_fixtures.py --wide failed:\n{_tail(r.stderr)}")
    key = hashlib.sha256(MAKE_FIXTURES.read_bytes()).hexdigest()[:12] + "-v2"
    return _cached_run("fixtures-wide", key, "models", make, base=LAB)


# Trained fixtures: a tiny Qwen3-MoE trained on a fixed corpus (fixtures/make_trained.py; every Linear input width a
# multiple of 128), so that calibrated quantizers (GPTQ, AWQ) differ measurably from round to nearest. ~4 MB each,
# ~3 minutes to train on 2 cores, so generated here instead of committed. "-dead": expert DEAD_EXPERT unreachable.
TRAINED = ("qwen3moe-trained", "qwen3moe-trained-dead")
DEAD_EXPERT = "1:5"
MAKE_TRAINED = REPO / "fixtures" / "make_trained.py"


@lru_cache(maxsize=None)
def trained_root() -> Path:
    """$SLING_LAB/fixtures-trained/<hash>, generated on first use (seeded, deterministic algorithms, one thread: a
    second run on the same machine writes byte-identical files). The key covers make_trained.py, the tokenizer files
    it copies, the texts the dead expert is checked on, the dead-expert choice and the interpreter (its stdlib
    docstrings are the training corpus)."""
    def make(out: Path) -> None:
        r = subprocess.run([str(LAB / "venv" / "bin" / "python"), str(MAKE_TRAINED), "--out", str(out),
                            "--dead-expert", DEAD_EXPERT], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"make_trained.py failed:\n{_tail(r.stderr)}")
        (out / "log.txt").write_text(r.stderr)
    tok = FIXTURES / "qwen3moe"
    parts = [MAKE_TRAINED.read_bytes(), DEAD_EXPERT, os.path.realpath(LAB / "venv" / "bin" / "python")]
    parts += [(tok / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")]
    parts += [(HERE / "data" / f).read_bytes() for f in ("eval.txt", "calib.txt")]
    return _cached_run("fixtures-trained", _sha(*parts)[:12] + "-v1", "models", make, base=LAB)


def fixture_dir(name: str) -> Path:
    if name.endswith("-wide"):
        return wide_root() / name[: -len("-wide")]
    if name in TRAINED:
        return trained_root() / name
    return FIXTURES / name


@lru_cache(maxsize=None)
def stated_fixture_dir(name: str) -> Path:
    """A copy of fixture `name` whose config.json also states STATED_CONFIG (see INTENDED), in a directory of the same
    name (the reference derives general.name from it), cached under CACHE/stated-fixtures/."""
    src = fixture_dir(name)

    def make(out: Path) -> None:
        shutil.copytree(src, out)
        cfg = json.loads((src / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, **STATED_CONFIG}, indent=2) + "\n")
    key = _sha("stated-v1", fixture_hash(name), json.dumps(STATED_CONFIG, sort_keys=True))[:16]
    return _cached_run("stated-fixtures", f"{name}.{key}", src.name, make)


@lru_cache(maxsize=None)
def fixture_config(name: str) -> dict:
    return json.loads((fixture_dir(name) / "config.json").read_text())


@lru_cache(maxsize=None)
def fixture_hash(name: str) -> str:
    d = fixture_dir(name)
    parts = []
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        parts += [f.relative_to(d).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest()]
    return _sha(*parts)


@lru_cache(maxsize=None)
def reference_tool_id() -> str:
    """Identity of the reference converter: its sources, our wrapper and the python packages it runs on."""
    files = [LLAMA_CPP / "convert_hf_to_gguf.py", HERE / "convert_compat.py"]
    for sub in ("conversion", "gguf-py/gguf"):
        files += sorted((LLAMA_CPP / sub).rglob("*.py"))
    parts = [json.dumps(versions(), sort_keys=True)]
    for f in files:
        parts += [f.relative_to(LLAMA_CPP).as_posix() if f.is_relative_to(LLAMA_CPP) else f.name,
                  hashlib.sha256(f.read_bytes()).hexdigest()]
    return _sha(*parts)


def shards(out: Path) -> list[Path]:
    """The file(s) a conversion to `out` produced: `out` itself, or its split shards NAME-0000i-of-0000N.gguf."""
    if out.exists():
        return [out]
    return sorted(out.parent.glob(out.stem + "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf"))


def _tail(s: str | bytes, n: int = 3000) -> str:
    if isinstance(s, bytes):
        s = s.decode("utf-8", "replace")
    return s[-n:]


# ---------------------------------------------------------------------------------------------------------------
# sling
def sling(*args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(SLING_BIN), *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"sling {' '.join(map(str, args))} exited {r.returncode}:\n{_tail(r.stderr)}")
    return r


def sling_convert(name: str, outtype: str, out: Path, extra=()) -> list[Path]:
    sling("-q", "convert", fixture_dir(name), "--type", outtype, "-o", out, "--tokenizer-pre", TOKPRE, *extra)
    files = shards(Path(out))
    assert files, f"sling convert wrote nothing at {out}"
    return files


# ---------------------------------------------------------------------------------------------------------------
# reference converter (llama.cpp convert_hf_to_gguf.py through convert_compat.py), cached
def _ref_key(name: str, outtype: str, extra: tuple, stated: bool = False) -> str:
    parts = ("stated", json.dumps(STATED_CONFIG, sort_keys=True)) if stated else ()
    return _sha("convert-v1", fixture_hash(name), reference_tool_id(), outtype, *extra, *parts)


def _ref_dir(name: str, outtype: str, extra: tuple, stated: bool = False) -> Path:
    tag = ".stated" if stated else ""
    return CACHE / "convert" / f"{name}{tag}.{outtype}.{_ref_key(name, outtype, extra, stated)[:16]}"


def reference_convert(name: str, outtype: str, extra=(), stated: bool = False) -> list[Path]:
    """convert_hf_to_gguf.py output for fixture `name` (list of files: one, or the split shards), cached per
    (fixture content, outtype, extra arguments, reference tool identity). `stated`: on stated_fixture_dir(name)
    (the config states what sling assumes; see INTENDED)."""
    extra = tuple(map(str, extra))
    final = _ref_dir(name, outtype, extra, stated)
    if (final / "ok").exists():
        return shards(final / "model.gguf")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    try:
        env = {**os.environ, "SLING_LAB": str(LAB), "SLING_TOKPRE": TOKPRE,
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        src = stated_fixture_dir(name) if stated else fixture_dir(name)
        cmd = [str(LAB / "venv" / "bin" / "python"), str(HERE / "convert_compat.py"), str(src),
               "--outtype", outtype, "--outfile", str(tmp / "model.gguf"), *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise AssertionError(f"reference converter failed on {name} {outtype} {extra}:\n{_tail(r.stderr)}")
        (tmp / "log.txt").write_text(r.stderr)
        (tmp / "ok").write_text(json.dumps({"cmd": cmd[1:], "fixture_hash": fixture_hash(name)}))
        try:
            tmp.rename(final)
        except OSError:  # another process cached it meanwhile
            if not (final / "ok").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return shards(final / "model.gguf")


def prewarm_references(specs) -> None:
    """Run the missing reference conversions of `specs` [(name, outtype, extra[, stated])], JOBS at a time."""
    specs = [(s[0], s[1], tuple(map(str, s[2])), bool(s[3]) if len(s) > 3 else False) for s in specs]
    todo = sorted({s for s in specs if not (_ref_dir(*s) / "ok").exists()})
    if not todo:
        return
    with ThreadPoolExecutor(JOBS) as ex:
        # errors surface again (with the converter's stderr) in the test that needs the file
        list(ex.map(lambda s: _quiet(reference_convert, *s), todo))


def _quiet(fn, *a):
    try:
        return fn(*a)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------------------------
# llama-quantize / llama-imatrix on the reference converter's BF16 file: the two-pass reference pipeline, cached
CALIB = HERE / "data" / "calib.txt"


def sling_quantize(name: str, preset: str, out: Path, extra=()) -> list[Path]:
    sling("-q", "quantize", fixture_dir(name), "--to", f"gguf:{preset}", "-o", out, "--tokenizer-pre", TOKPRE,
          "--no-manifest", *extra)
    files = shards(Path(out))
    assert files, f"sling quantize wrote nothing at {out}"
    return files


def _cached_run(kind: str, key: str, out_name: str, run, base: Path | None = None) -> Path:
    """`run(tmp/out_name)` once; the result is kept under (base or CACHE)/kind/key/out_name (atomic rename)."""
    final = (base or CACHE) / kind / key
    if (final / "ok").exists():
        return final / out_name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    try:
        run(tmp / out_name)
        (tmp / "ok").write_text("")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "ok").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / out_name


@lru_cache(maxsize=None)
def _bin_hash(tool: str) -> str:
    return hashlib.sha256((LLAMA_BIN / tool).read_bytes()).hexdigest()


def cached_file(kind: str, name: str, key_parts, run) -> Path:
    """A file made by `run(out_path)`, cached under CACHE/kind/, keyed by the fixture, the reference tools and
    `key_parts`."""
    key = f"{name}." + _sha(kind, fixture_hash(name), reference_tool_id(), _bin_hash("llama-quantize"), *key_parts)[:16]
    return _cached_run(kind, key, "out.gguf", run)


def run_tool(tool: str, args) -> None:
    _run_tool(tool, args)


def _run_tool(tool: str, args) -> None:
    cmd = [str(LLAMA_BIN / tool), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)})
    if r.returncode != 0:
        raise AssertionError(f"{tool} failed (exit {r.returncode}): {' '.join(cmd)}\n{_tail(r.stderr)}")


def reference_imatrix(name: str, fmt: str = "gguf") -> Path:
    """llama-imatrix on the reference BF16 file of `name` over tests/interop/data/calib.txt (64-token chunks)."""
    bf16 = reference_convert(name, "bf16")[0]
    key = f"{name}.{fmt}." + _sha("imatrix-v1", fixture_hash(name), reference_tool_id(), _bin_hash("llama-imatrix"),
                                  CALIB.read_bytes(), fmt)[:16]
    return _cached_run("imatrix", key, f"imatrix.{fmt}", lambda out: _run_tool(
        "llama-imatrix", ["-m", bf16, "-f", CALIB, "-o", out, "-c", "64", "--chunks", "8", "-t", JOBS,
                          "--output-format", fmt]))


def reference_quantize(name: str, preset: str, extra=(), imatrix: Path | None = None, stated: bool = False) -> Path:
    """convert_hf_to_gguf.py --outtype bf16, then llama-quantize [extra] [--imatrix] BF16 OUT PRESET. `stated`: from
    the reference conversion of stated_fixture_dir(name) (see INTENDED)."""
    bf16 = reference_convert(name, "bf16", stated=stated)[0]
    extra = tuple(map(str, extra))
    im = ("--imatrix", str(imatrix)) if imatrix else ()
    st = ("stated", json.dumps(STATED_CONFIG, sort_keys=True)) if stated else ()
    key = f"{name}{'.stated' if stated else ''}.{preset}." + _sha(
        "quantize-v1", fixture_hash(name), reference_tool_id(), _bin_hash("llama-quantize"), preset, *extra, *im,
        imatrix.read_bytes() if imatrix else b"", *st)[:16]
    return _cached_run("quantize", key, "model.gguf", lambda out: _run_tool(
        "llama-quantize", [*extra, *im, bf16, out, preset, JOBS]))


# ---------------------------------------------------------------------------------------------------------------
# logits
def llama_logits(paths, ids: list[int], tmp: Path) -> list[np.ndarray]:
    """llama.cpp logits (float64 [n_tokens, n_vocab]) of each GGUF, in one child process (KV cache F32,
    flash-attention off; see llama_logits.py)."""
    out = tmp / "llama-logits"
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(LLAMA_BIN),
           "PYTHONPATH": os.pathsep.join([str(PYLIB), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, str(HERE / "llama_logits.py"), "--ids", ",".join(map(str, ids)), "--out", str(out),
           "--threads", str(JOBS), *map(str, paths)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise AssertionError(f"llama.cpp failed (exit {r.returncode}) on {list(map(str, paths))}:\n{_tail(r.stderr)}")
    return [np.load(out / f"{i}.npy") for i in range(len(paths))]


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def frontier(points) -> list[tuple[float, float]]:
    """The lower envelope of (bpw, KLD) points: those no point of smaller or equal size beats, by size."""
    out = []
    for b, k in sorted(points):
        if not out or k < out[-1][1]:
            out.append((b, k))
    return out


def frontier_at(points, bpw: float) -> float:
    """The frontier's KLD at `bpw`, interpolated in log space between its neighbouring points."""
    import math
    f = frontier(points)
    assert f[0][0] <= bpw <= f[-1][0], f"{bpw} bpw is outside the frontier {f[0][0]:.2f}..{f[-1][0]:.2f}"
    for (b0, k0), (b1, k1) in zip(f, f[1:]):
        if b0 <= bpw <= b1:
            t = (bpw - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(k0) + t * math.log(k1))
    return f[-1][1]


def kl_stats(ref: np.ndarray, test: np.ndarray) -> dict:
    """KL(P_ref || P_test) per position (nats, float64, full vocab), its mean and max, top-1 agreement."""
    assert ref.shape == test.shape, f"logits shape {test.shape} != reference {ref.shape}"
    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(test.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "maxabs": float(np.abs(ref - test).max()), "top1": float((ref.argmax(-1) == test.argmax(-1)).mean())}


def cached_array(kind: str, name: str, key_parts, compute) -> np.ndarray:
    """np.ndarray `compute()` cached under CACHE/kind/, keyed by the fixture's content and `key_parts`."""
    key = _sha(kind, fixture_hash(name), *key_parts)[:16]
    p = CACHE / kind / f"{name}.{key}.npy"
    if p.exists():
        return np.load(p)
    a = compute()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name, suffix=".npy", dir=p.parent)
    os.close(fd)
    np.save(tmp, a)
    os.replace(tmp, p)
    return a


# ---------------------------------------------------------------------------------------------------------------
# results: each test records figures; conftest writes them at the end of the session
_results: dict[str, dict] = {}


def llama_perplexity(text: Path, ppl_args: list[str], args: list[str], want: str) -> str:
    """llama-perplexity's output on `text`. Its figures cannot be lost any more (setup-reference.sh makes it drain its
    asynchronous logger at exit; test_eval.py checks that under CPU load); the run is still repeated (up to 3 times)
    when it exits non-zero after printing every chunk, seen once in ~600 runs in CI on mixtral-wide."""
    cmd = [str(LLAMA_BIN / "llama-perplexity"), "-f", str(text), "-t", str(JOBS), *ppl_args, *args]
    failures = []
    out = ""
    for _ in range(3):
        r = subprocess.run(cmd, capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(LLAMA_BIN)})
        out = r.stdout + r.stderr
        if r.returncode == 0 and want in out:
            return out
        failures.append(f"exit status {r.returncode}, {want!r} {'printed' if want in out else 'missing'}")
    raise AssertionError(f"llama-perplexity failed 3 times ({'; '.join(failures)}): {' '.join(cmd)}\n{out[-3000:]}")


def llama_kld_base(name: str, base: Path, text: Path, ppl_args: list[str], extra=()) -> Path:
    """`llama-perplexity --kl-divergence-base` logits of the reference converter's F32 file of fixture `name`."""
    f32 = reference_convert(name, "f32")[0]
    llama_perplexity(text, ppl_args, ["-m", str(f32), "--kl-divergence-base", str(base), *extra], "Final estimate")
    return base


def llama_kld(model: Path, base: Path, text: Path, ppl_args: list[str], extra=()) -> dict:
    """`llama-perplexity --kl-divergence` of `model` against `base`: mean and max KLD, both PPLs, same-top-1."""
    import re  # noqa: PLC0415
    out = llama_perplexity(text, ppl_args, ["-m", str(model), "--kl-divergence-base", str(base), "--kl-divergence",
                                            *extra], "Same top p:")

    def get(pat: str) -> float:
        m = re.search(pat, out)
        assert m, f"llama-perplexity printed no {pat!r}:\n{out[-3000:]}"
        return float(m.group(1))

    return {"kld_mean": get(r"Mean\s+KLD:\s+([0-9.eE+-]+)"), "kld_max": get(r"Maximum KLD:\s+([0-9.eE+-]+)"),
            "kld_p999": get(r"99\.9%\s+KLD:\s+([0-9.eE+-]+)"), "kld_p99": get(r"99\.0%\s+KLD:\s+([0-9.eE+-]+)"),
            "kld_median": get(r"Median\s+KLD:\s+([0-9.eE+-]+)"),
            "ppl": get(r"Mean PPL\(Q\)\s+:\s+([0-9.]+)"), "ppl_ref": get(r"Mean PPL\(base\)\s+:\s+([0-9.]+)"),
            "top1": get(r"Same top p:\s+([0-9.]+)") / 100,
            # an info line near the start: required only by the callers that compare it
            "chunks": int(m.group(1)) if (m := re.search(r"computing over ([0-9]+) chunks", out)) else None}


def record(section: str, key: str, value) -> None:
    _results.setdefault(section, {})[key] = value


def write_results() -> None:
    if not _results:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    for section, entries in _results.items():
        p = RESULTS / f"{section}.json"
        try:
            old = json.loads(p.read_text()) if p.exists() else {}
        except ValueError:
            old = {}
        merged = {**old.get("entries", {}), **entries}
        p.write_text(json.dumps({"versions": versions(), "entries": dict(sorted(merged.items()))}, indent=1) + "\n")
    from summary import render
    (RESULTS / "summary.md").write_text(render(RESULTS))
