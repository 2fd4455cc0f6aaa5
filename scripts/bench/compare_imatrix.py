#!/usr/bin/env python3
"""Compare two llama.cpp GGUF imatrix files (in_sum2 + counts per tensor), numpy only (for the GPU machine,
which has no gguf package): the counts must be equal, the sums within a relative tolerance of the largest sum
of each tensor.

    python3 scripts/bench/compare_imatrix.py A.gguf B.gguf [--tol 1e-4]

Prints one line (tensors, worst relative difference and where) and exits 1 when over the tolerance or when
the files hold different tensors or counts. The reader follows the GGUF v3 layout (../shared/docs/gguf-spec.md):
header, metadata key/values (skipped by type), tensor infos, data at the alignment.
"""
from __future__ import annotations

import struct
import sys

import numpy as np

SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read(path: str) -> dict[str, np.ndarray]:
    b = open(path, "rb").read()
    if b[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file")
    off = 4
    version, n_t, n_kv = struct.unpack_from("<IQQ", b, off)
    off += 20
    align = 32

    def string(o: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", b, o)
        return b[o + 8 : o + 8 + n].decode(), o + 8 + n

    def skip(t: int, o: int) -> int:
        if t in SCALAR:
            return o + SCALAR[t]
        if t == 8:
            return string(o)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", b, o)
            o += 12
            for _ in range(n):
                o = skip(et, o)
            return o
        raise SystemExit(f"{path}: unknown metadata type {t}")

    for _ in range(n_kv):
        key, off = string(off)
        (t,) = struct.unpack_from("<I", b, off)
        off += 4
        if key == "general.alignment":
            (align,) = struct.unpack_from("<I", b, off)
        off = skip(t, off)
    infos = []
    for _ in range(n_t):
        name, off = string(off)
        (nd,) = struct.unpack_from("<I", b, off)
        dims = struct.unpack_from(f"<{nd}Q", b, off + 4)
        typ, toff = struct.unpack_from("<IQ", b, off + 4 + 8 * nd)
        off += 4 + 8 * nd + 12
        if typ != 0:
            raise SystemExit(f"{path}: {name} is not F32")
        infos.append((name, int(np.prod(dims)), toff))
    base = (off + align - 1) // align * align
    return {n: np.frombuffer(b, dtype="<f4", count=c, offset=base + o).astype(np.float64) for n, c, o in infos}


def main() -> int:
    args = sys.argv[1:]
    tol = 1e-4
    if "--tol" in args:
        i = args.index("--tol")
        tol = float(args[i + 1])
        del args[i : i + 2]
    a, b = read(args[0]), read(args[1])
    if a.keys() != b.keys():
        print(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
        return 1
    worst, where, bad = 0.0, "", 0
    for n in sorted(a):
        if n.endswith(".counts"):
            if not np.array_equal(a[n], b[n]):
                print(f"{n}: counts differ")
                bad += 1
            continue
        scale = max(np.abs(a[n]).max(), 1e-30)
        r = float(np.abs(a[n] - b[n]).max() / scale)
        if r > worst:
            worst, where = r, n
    ok = bad == 0 and worst <= tol
    print(f"{len(a) // 2} tensors, counts {'equal' if bad == 0 else f'differ in {bad}'}, "
          f"worst relative difference of the sums {worst:.2e} ({where}), tolerance {tol:g}: {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
