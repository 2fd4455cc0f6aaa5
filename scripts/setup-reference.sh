#!/usr/bin/env bash
# Installs the reference tools sling's interop tests compare against. Idempotent, and cached:
# everything lands under $SLING_LAB (default ~/.cache/sling-lab) and is reused when present.
#
#   $SLING_LAB/venv             python: torch, transformers, gguf, safetensors, numpy (pinned below)
#   $SLING_LAB/llama.cpp        llama.cpp vendored by the llama-cpp-python==0.3.36 sdist (convert_hf_to_gguf.py)
#   $SLING_LAB/llama.cpp-build  its tools (llama-gguf-split, llama-quantize, ...) + libllama.so
#   $SLING_LAB/pylib/llama_cpp  the sdist's ctypes bindings, used with LLAMA_CPP_LIB_PATH
#   $SLING_LAB/llama.cpp-build/bin/ggml-quant-ref  quantizer oracle (tests/ggml-ref/ggml-quant-ref.c)
#   $SLING_LAB/venv-llmc        llm-compressor 0.14.0.1 in its own venv (it pins torch 2.14 / transformers 5.17 /
#                               compressed-tensors 0.19, older than the main venv's): the GPTQ reference
#                               (tests/interop/gptq_ref.py) and the benchmarks' references (scripts/bench/targets_ref.py,
#                               gptq_ref.py). Pinned below (LLMC_PKGS, from shared/oracles/requirements-llmc.lock.txt);
#                               stamped like venv. A venv-llmc made by hand that already holds exactly these versions is
#                               only stamped, not reinstalled. SKIP_LLMC=1 skips it. torch comes from PyPI (the CUDA
#                               build, ~4 GB with its nvidia-* wheels; runs on CPU) unless LLMC_TORCH_INDEX names another
#                               index, e.g. LLMC_TORCH_INDEX=https://download.pytorch.org/whl/cpu (~200 MB, 2.14.0+cpu).
#
# Pattern taken from ../shared/oracles/setup.sh. Env: SLING_LAB, JOBS, PYTHON, SKIP_LLMC, LLMC_TORCH_INDEX.
set -euo pipefail
LAB=${SLING_LAB:-$HOME/.cache/sling-lab}
VER=0.3.36
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
OLDPWD_REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$LAB/sdist"
cd "$LAB"

if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  apt-get update -qq && apt-get install -y -qq cmake ninja-build
fi

# Versions checked together (see ../shared/oracles/requirements-lab.lock.txt). torch from PyPI is the CUDA
# build (~4 GB of wheels); it runs on CPU. pytest runs the interop suite (tests/interop).
PKGS="numpy==2.4.6 safetensors==0.8.0 gguf==0.19.0 sentencepiece==0.2.3 protobuf==7.36.2 torch==2.15.0
      transformers==5.24.0 tokenizers==0.23.3 jinja2==3.1.6 diskcache==5.6.3 typing_extensions==4.16.0
      pytest==9.2.0 model-signing==1.1.1 pyopenssl==26.4.0
      compressed-tensors==0.20.1 mlx==0.32.4 mlx-cpu==0.32.4 mlx-lm==0.32.2"
stamp="venv/.sling-$(echo "$PKGS" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x venv/bin/python ] || "$PYTHON" -m venv venv
  venv/bin/pip install -q --upgrade pip
  venv/bin/pip install -q $PKGS
  touch "$stamp"
fi

# NVRTC from its PyPI wheel (~90 MB, no GPU needed): CI compiles every GPU kernel through it for sm_80 and sm_90
# (kernels/tests/nvrtc.rs); scripts/test puts $LAB/nvrtc/nvidia/cu13/lib on LD_LIBRARY_PATH.
NVRTC_PKG="nvidia-cuda-nvrtc==13.0.88"
if [ ! -f "nvrtc/.sling-$NVRTC_PKG" ]; then
  rm -rf nvrtc
  venv/bin/pip install -q --no-deps --target nvrtc "$NVRTC_PKG"
  touch "nvrtc/.sling-$NVRTC_PKG"
fi

# llm-compressor's venv (see the header). The check for a hand-made venv-llmc compares installed versions with the
# pins (torch's local label, e.g. +cpu, ignored) and stamps it when they all match.
LLMC_TORCH=2.14.0
LLMC_PKGS="llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 accelerate==1.15.0
           datasets==5.2.0 auto-round==0.15.1 huggingface_hub==1.33.0 numpy==2.4.6 safetensors==0.8.0
           tokenizers==0.23.3 pydantic==2.14.4 loguru==0.7.3"
if [ -z "${SKIP_LLMC:-}" ]; then
  llmc_stamp="venv-llmc/.sling-$(echo "$LLMC_TORCH $LLMC_PKGS" | sha256sum | cut -c1-12)"
  if [ ! -f "$llmc_stamp" ]; then
    [ -x venv-llmc/bin/python ] || "$PYTHON" -m venv venv-llmc
    if ! venv-llmc/bin/python - "torch==$LLMC_TORCH" $LLMC_PKGS <<'PY'
import importlib.metadata as m, sys
bad = []
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        have = m.version(name)
    except m.PackageNotFoundError:
        have = None
    if have is None or have.split("+")[0] != want:
        bad.append(f"{name} {have} (want {want})")
sys.exit(1 if bad else 0)
PY
    then
      venv-llmc/bin/pip install -q --upgrade pip
      if [ -n "${LLMC_TORCH_INDEX:-}" ]; then
        venv-llmc/bin/pip install -q --index-url "$LLMC_TORCH_INDEX" "torch==$LLMC_TORCH"
      fi
      venv-llmc/bin/pip install -q "torch==$LLMC_TORCH" $LLMC_PKGS
    fi
    rm -f venv-llmc/.sling-* && touch "$llmc_stamp"
  fi
fi

SD=sdist/llama_cpp_python-$VER
if [ ! -d "$SD" ]; then
  (cd sdist && ../venv/bin/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" \
     && tar xzf "llama_cpp_python-$VER.tar.gz")
fi
if [ ! -f llama.cpp/.sling_version ] || [ "$(cat llama.cpp/.sling_version)" != "$VER" ]; then
  rm -rf llama.cpp && cp -a "$SD/vendor/llama.cpp" llama.cpp
  rm -f llama.cpp/.git   # dangling submodule gitlink; build-info uses -DLLAMA_BUILD_COMMIT instead
  echo "$VER" > llama.cpp/.sling_version
fi
# The one change to the reference build: llama.cpp's asynchronous logger is a singleton it leaks on purpose
# (common/log.cpp, llama.cpp issue 22142), so lines still queued when main returns are lost. On a CPU-starved
# machine llama-perplexity then exits 0 without its final figures. It now drains the logger before returning
# (`common_log_flush`); nothing it computes changes. tests/interop/test_eval.py checks the figures under CPU load.
if [ ! -f llama.cpp/.sling_log_flush ]; then
  "$PYTHON" - <<'PY'
p = "llama.cpp/tools/perplexity/perplexity.cpp"
s = open(p).read()
old = "    llama_backend_free();\n\n    return 0;\n}\n"
assert s.count(old) == 1, "setup-reference.sh: perplexity.cpp's end of main moved; update the flush patch"
s = s.replace(old, "    llama_backend_free();\n\n    common_log_flush(common_log_main()); // sling: drain the logger\n\n"
                   "    return 0;\n}\n")
open(p, "w").write(s)
PY
  rm -f llama.cpp-build/bin/llama-perplexity   # rebuilt below
  touch llama.cpp/.sling_log_flush
fi
COMMIT=$(grep -m1 -o 'llama.cpp@[0-9a-f]*' "$SD/CHANGELOG.md" | cut -d@ -f2 || echo unknown)
[ -d pylib/llama_cpp ] || { mkdir -p pylib && cp -a "$SD/llama_cpp" pylib/llama_cpp; }

B=llama.cpp-build
TOOLS="llama-quantize llama-gguf-split llama-imatrix llama-perplexity llama-completion llama-tokenize"
need=0
for t in $TOOLS; do [ -x "$B/bin/$t" ] || need=1; done
if [ $need = 1 ]; then
  # GGML_NATIVE=OFF keeps the cached build valid if the cache moves to another x86-64 machine.
  cmake -S llama.cpp -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \
    -DGGML_F16C=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMIT="$COMMIT" -DLLAMA_BUILD_NUMBER=0 >/dev/null
  cmake --build "$B" -j"$JOBS" --target $TOOLS
fi
# ggml-quant-ref: the quantizer oracle for sling's bit-exactness tests (tests/ggml-ref), linked against the
# pinned libggml-base so it runs llama.cpp's own ggml_quantize_chunk, and libggml-cpu for the CPU backend's activation
# rounding (`act`). Rebuilt when its source changes.
REF_SRC="$OLDPWD_REPO/tests/ggml-ref/ggml-quant-ref.c"
REF_BIN="$B/bin/ggml-quant-ref"
ref_stamp="$B/bin/.ggml-quant-ref-$(sha256sum "$REF_SRC" | cut -c1-12)"
if [ ! -x "$REF_BIN" ] || [ ! -f "$ref_stamp" ]; then
  ${CC:-cc} -O2 -o "$REF_BIN" "$REF_SRC" -Illama.cpp/ggml/include -L"$B/bin" -lggml-base -lggml-cpu -Wl,-rpath,"$LAB/$B/bin"
  rm -f "$B"/bin/.ggml-quant-ref-* && touch "$ref_stamp"
fi
"$REF_BIN" info q4_K >/dev/null

LLAMA_CPP_LIB_PATH="$LAB/$B/bin" PYTHONPATH="$LAB/pylib" venv/bin/python -c \
  "import llama_cpp, gguf, transformers, torch; print('reference tools ready: llama.cpp $COMMIT, transformers', transformers.__version__)"
[ -n "${SKIP_LLMC:-}" ] || venv-llmc/bin/python -c \
  "import importlib.metadata as m; print('llm-compressor venv ready: llmcompressor', m.version('llmcompressor'), 'torch', m.version('torch'))"
