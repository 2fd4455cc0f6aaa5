"""Compare two GGUF files: the whole file (sha256), and, to say where they differ, with the `gguf` package (the
reference reader): every tensor's name, type, shape and bytes, every metadata key's type and value, the order of
the keys and of the tensors, the GGUF version and the tensor data offsets (alignment and padding)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


def _kv_value(f):
    import gguf
    t = f.types[0] if f.types else None
    if t == gguf.GGUFValueType.ARRAY:
        sub = f.types[1] if len(f.types) > 1 else None
        if sub == gguf.GGUFValueType.STRING:
            return ("array", "string", [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data])
        return ("array", str(sub), [np.asarray(f.parts[i]).tolist() for i in f.data])
    if t == gguf.GGUFValueType.STRING:
        return ("string", bytes(f.parts[f.data[0]]).decode("utf-8", "replace"))
    return (str(t), np.asarray(f.parts[f.data[0]]).tolist())


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def layout(path) -> dict:
    """GGUF version, alignment, where the tensor data starts, each tensor's data offset, and the file size."""
    import gguf
    r = gguf.GGUFReader(path)
    return {"version": int(r.fields["GGUF.version"].parts[-1][0]), "alignment": int(r.alignment),
            "data_offset": int(r.data_offset), "tensor_offsets": [int(t.data_offset) for t in r.tensors],
            "size": int(r.data.nbytes)}


def read(path):
    import gguf
    r = gguf.GGUFReader(path)
    kvs = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        kvs[name] = _kv_value(f)
    tensors = {}
    for t in r.tensors:
        tensors[t.name] = (t.tensor_type.name, tuple(int(x) for x in t.shape), hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest())
    return kvs, tensors, [t.name for t in r.tensors]


@dataclass
class Comparison:
    tensors_total: int = 0
    tensors_identical: int = 0
    tensor_diffs: list = field(default_factory=list)
    order_equal: bool = True
    kv_diffs: list = field(default_factory=list)
    kv_compared: int = 0
    ours_kvs: dict = field(default_factory=dict, repr=False)
    ref_kvs: dict = field(default_factory=dict, repr=False)
    ours_order: list = field(default_factory=list, repr=False)
    # whole file: sha256 equality, and where it breaks (key order, version/alignment/offsets/size)
    file_identical: bool = False
    ours_sha256: str = ""
    ref_sha256: str = ""
    kv_order_equal: bool = True
    layout_diffs: list = field(default_factory=list)

    @property
    def ok(self):
        """Every tensor and every compared key equal (the per-item view; see `whole_file_ok` for the file)."""
        return not self.tensor_diffs and not self.kv_diffs

    @property
    def whole_file_ok(self):
        return self.file_identical

    def explain(self) -> str:
        """Why the files differ, for assertion messages."""
        lines = [f"sha256 sling {self.ours_sha256} vs reference {self.ref_sha256}"]
        lines += self.tensor_diffs[:20] + self.kv_diffs
        if not self.order_equal:
            lines.append("tensor order differs")
        if not self.kv_order_equal:
            a, b = list(self.ours_kvs), list(self.ref_kvs)
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            lines.append(f"metadata key order differs at key #{i}: sling {a[i:i + 3]} vs reference {b[i:i + 3]}")
        lines += self.layout_diffs
        return "\n".join(lines)


def compare(ours: str, ref: str, ignore_keys=(), expected_diffs: dict | None = None) -> Comparison:
    """`expected_diffs`: key -> value sling must write where the reference differs on purpose."""
    expected_diffs = expected_diffs or {}
    ok, ot, oorder = read(ours)
    rk, rt, rorder = read(ref)
    c = Comparison(ours_kvs=ok, ref_kvs=rk, ours_order=oorder)
    c.order_equal = oorder == rorder
    c.ours_sha256, c.ref_sha256 = file_sha256(ours), file_sha256(ref)
    c.file_identical = c.ours_sha256 == c.ref_sha256
    c.kv_order_equal = list(ok) == list(rk)
    if not c.file_identical:
        lo, lr = layout(ours), layout(ref)
        c.layout_diffs = [f"{k}: sling {lo[k] if k != 'tensor_offsets' else '...'} vs reference "
                          f"{lr[k] if k != 'tensor_offsets' else '...'}" for k in lo if lo[k] != lr[k]]
    for name in sorted(set(ot) | set(rt)):
        c.tensors_total += 1
        if name not in ot:
            c.tensor_diffs.append(f"{name}: missing in sling output")
        elif name not in rt:
            c.tensor_diffs.append(f"{name}: not in reference output")
        elif ot[name] != rt[name]:
            c.tensor_diffs.append(f"{name}: sling {ot[name][:2]} vs reference {rt[name][:2]}" + (" (bytes differ)" if ot[name][:2] == rt[name][:2] else ""))
        else:
            c.tensors_identical += 1
    for key in sorted(set(ok) | set(rk)):
        if any(key == k or (k.endswith("*") and key.startswith(k[:-1])) for k in ignore_keys):
            continue
        c.kv_compared += 1
        if key in expected_diffs:
            want = expected_diffs[key]
            got = ok.get(key, (None, None))[-1]
            if isinstance(got, list) and len(got) == 1 and not isinstance(want, list):
                got = got[0]  # scalars read back as one-element lists
            if got != want:
                c.kv_diffs.append(f"{key}: sling {ok.get(key)} but the intended value is {want}")
            continue
        if ok.get(key) != rk.get(key):
            a, b = ok.get(key), rk.get(key)
            short = lambda v: v if v is None or len(str(v)) < 200 else str(v)[:200] + "..."
            c.kv_diffs.append(f"{key}: sling {short(a)} vs reference {short(b)}")
    return c
