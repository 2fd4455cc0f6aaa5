"""The crate graph of docs/architecture.md holds (scripts/check-architecture), and the checker catches a
forbidden arrow (a target reached from the containers crate, the pipeline or provenance naming a target,
one target crate reaching the other)."""
from __future__ import annotations

import json
import subprocess
import sys

import lab

SCRIPT = lab.REPO / "scripts" / "check-architecture"


def _metadata() -> dict:
    return json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                                     cwd=lab.REPO, check=True, capture_output=True, text=True).stdout)


def test_crate_graph_holds():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_checker_catches_forbidden_arrows(tmp_path):
    for crate, dep in [("sling-formats", "sling-targets"), ("sling-pipeline", "sling-targets"),
                       ("sling-quantizers", "sling-formats"), ("sling-formats", "sling-quantizers"),
                       ("sling-pipeline", "sling-target-gguf"), ("sling-provenance", "sling-target-gguf"),
                       ("sling-provenance", "sling-pipeline"), ("sling-targets", "sling-target-gguf"),
                       ("sling-target-gguf", "sling-targets")]:
        meta = _metadata()
        pkg = next(p for p in meta["packages"] if p["name"] == crate)
        pkg["dependencies"].append({"name": dep, "kind": None})
        f = tmp_path / "meta.json"
        f.write_text(json.dumps(meta))
        r = subprocess.run([sys.executable, str(SCRIPT), "--metadata", str(f)], capture_output=True, text=True)
        assert r.returncode == 1 and f"{crate} -> {dep}" in r.stderr, (crate, dep, r.stderr)
