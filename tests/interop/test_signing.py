"""`sling sign` / `sling verify --signature` against the OpenSSF model-signing tool (PyPI model-signing 1.1.1,
key-based ECDSA P-256), in both directions:

- a signature made by `sling sign` verifies with `model_signing verify key`, and lists the same files, digests,
  root digest and ignore paths as the one `model_signing sign key` makes of the same artifact;
- a signature made by `model_signing sign key` verifies with `sling verify --signature`;
- a tampered, extra or missing file, or the wrong key, fails BOTH tools (sling: exit 1, naming the file);
- the same for a single-file artifact (one resource named "."), for the default signature path `model.sig`
  inside the model directory, and for a real `sling convert` output directory (GGUF + manifest);
- paths model_signing was told to ignore (`--ignore-paths`, recorded in the signed statement) are skipped by both.

model_signing is required (scripts/setup-reference.sh installs it): a missing one fails every test here.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lab

NEEDED = ("model_signing", "cryptography")


@pytest.fixture(autouse=True, scope="module")
def _require_model_signing():
    miss = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if miss:
        pytest.fail(f"python module(s) {', '.join(miss)} missing in {sys.executable}: {lab.SETUP_HINT}", pytrace=False)


# ---------------------------------------------------------------------------------------------------------------
# helpers
def keypair(d: Path, name: str = "k", sec1: bool = False) -> tuple[Path, Path]:
    """A fresh P-256 key pair: PKCS#8 (or SEC1 "EC PRIVATE KEY", as openssl ecparam writes) + SPKI PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if sec1 else serialization.PrivateFormat.PKCS8
    priv, pub = d / f"{name}.pem", d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def model_dir(d: Path) -> Path:
    """Nested and hidden files, an empty directory, and git paths (ignored by both tools)."""
    m = d / "tiny-model"
    for sub in ("sub/deeper", ".git/refs", ".github", "empty"):
        (m / sub).mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": b'{"model_type": "tiny"}\n',
        "model.safetensors": b"hello weights\n" * 1000,
        "sub/notes.txt": b"nested file\n",
        "sub/deeper/x.bin": bytes(range(256)) * 5000,
        "a.txt": b"a", "a/b": b"b", "B": b"upper", "_u": b"underscore",
        ".hidden": b"hidden files are signed\n",
        ".gitattributes": b"*.safetensors filter=lfs\n", ".gitignore": b"*.tmp\n",
        ".git/HEAD": b"ref: refs/heads/main\n", ".github/ci.yml": b"on: push\n",
    }
    for name, data in files.items():
        (m / name).parent.mkdir(parents=True, exist_ok=True)
        (m / name).write_bytes(data)
    return m


def ms(*args, cwd=None) -> subprocess.CompletedProcess:
    """The model_signing CLI of this venv."""
    return subprocess.run([sys.executable, "-m", "model_signing", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def ms_sign(model, key, sig, cwd=None):
    r = ms("sign", "key", model, "--private_key", key, "--signature", sig, cwd=cwd)
    assert r.returncode == 0 and "Signing succeeded" in r.stdout, f"model_signing sign failed:\n{r.stdout}{r.stderr}"


def ms_verify(model, pub, sig, cwd=None) -> subprocess.CompletedProcess:
    return ms("verify", "key", model, "--public_key", pub, "--signature", sig, cwd=cwd)


def ms_verified(model, pub, sig, cwd=None) -> None:
    r = ms_verify(model, pub, sig, cwd)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, \
        f"model_signing verify key refused {sig}:\n{r.stdout}{r.stderr}"


def ms_refused(model, pub, sig, what: str) -> str:
    r = ms_verify(model, pub, sig)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Verification succeeded" not in r.stdout, \
        f"model_signing verify key accepted {sig} ({what}):\n{out}"
    return out


def sling_run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(lab.SLING_BIN), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def sling_sign(model, key, sig=None, cwd=None) -> dict:
    extra = ["--signature", sig] if sig is not None else []
    r = sling_run("sign", model, "--key", key, *extra, "--json", cwd=cwd)
    assert r.returncode == 0, f"sling sign exited {r.returncode}:\n{r.stderr}"
    return json.loads(r.stdout)


def sling_verify(model, pub, sig, cwd=None) -> tuple[int, dict]:
    r = sling_run("verify", "--signature", sig, "--public-key", pub, model, "--json", cwd=cwd)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError as e:
        raise AssertionError(f"sling verify --json printed no JSON (exit {r.returncode}): {e}\n{r.stderr}") from e


def sling_verified(model, pub, sig, cwd=None) -> dict:
    rc, j = sling_verify(model, pub, sig, cwd)
    assert rc == 0 and j["status"] == "verified", f"sling verify --signature refused {sig}: {j}"
    return j


def sling_refused(model, pub, sig, kind: str, file: str | None) -> dict:
    rc, j = sling_verify(model, pub, sig)
    assert rc == 1 and j["status"] == "mismatch", f"sling verify --signature: exit {rc}, {j}"
    assert any(p["kind"] == kind and p["file"] == file for p in j["problems"]), (kind, file, j["problems"])
    if file is not None:
        assert any(file in p["message"] or file == "." for p in j["problems"])
    return j


def statement(sig: Path) -> dict:
    b = json.loads(sig.read_text())
    return json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))


def bundle_shape(sig: Path) -> dict:
    """Everything about a bundle that does not depend on the key or the (randomized vs RFC 6979) signature."""
    b = json.loads(sig.read_text())
    st = statement(sig)
    ser = dict(st["predicate"]["serialization"])
    ser["ignore_paths"] = sorted(ser.get("ignore_paths", []))  # model_signing's order is unspecified
    return {"keys": list(b), "mediaType": b["mediaType"], "vm": sorted(b["verificationMaterial"]),
            "tlog": b["verificationMaterial"]["tlogEntries"], "env": sorted(b["dsseEnvelope"]),
            "payloadType": b["dsseEnvelope"]["payloadType"],
            "sig_fields": [sorted(s) for s in b["dsseEnvelope"]["signatures"]],
            "_type": st["_type"], "predicateType": st["predicateType"], "subject": st["subject"],
            "serialization": ser, "resources": st["predicate"]["resources"]}


def compare_with_model_signing(model: Path, key: Path, tmp: Path, sling_sig: Path) -> None:
    ref = tmp / "reference.sig"
    ms_sign(model, key, ref)
    ours, theirs = bundle_shape(sling_sig), bundle_shape(ref)
    for k in theirs:
        assert ours[k] == theirs[k], f"{k}: sling {ours[k]!r} != model_signing {theirs[k]!r}"
    # The key hint is over the key, so it is the same for both.
    hint = lambda p: json.loads(p.read_text())["verificationMaterial"]["publicKey"]["hint"]  # noqa: E731
    assert hint(sling_sig) == hint(ref)
    ref.unlink()


# ---------------------------------------------------------------------------------------------------------------
# tests
def test_sling_signs_model_signing_verifies(tmp_path):
    m = model_dir(tmp_path)
    key, pub = keypair(tmp_path)
    sig = tmp_path / "tiny-model.sig"
    j = sling_sign(m, key, sig)
    names = [f["name"] for f in j["files"]]
    assert names == [".hidden", "B", "_u", "a/b", "a.txt", "config.json", "model.safetensors", "sub/deeper/x.bin",
                     "sub/notes.txt"], names
    ms_verified(m, pub, sig)
    compare_with_model_signing(m, key, tmp_path, sig)
    sling_verified(m, pub, sig)
    lab.record("signing", "sling_sign->model_signing_verify", {"files": len(names), "root": j["root_digest"]})


def test_model_signing_signs_sling_verifies(tmp_path):
    m = model_dir(tmp_path)
    key, pub = keypair(tmp_path)
    sig = tmp_path / "tiny-model.sig"
    ms_sign(m, key, sig)
    j = sling_verified(m, pub, sig)
    assert j["files_checked"] == 9 and j["model_name"] == "tiny-model"
    assert j["root_digest"] == statement(sig)["subject"][0]["digest"]["sha256"]
    lab.record("signing", "model_signing_sign->sling_verify", {"files": j["files_checked"]})


def test_model_signing_ignore_paths_are_honoured(tmp_path):
    """`model_signing sign key --ignore-paths` records the paths in the signed statement; both verifiers skip them."""
    m = model_dir(tmp_path)
    (m / "README.md").write_text("# tiny\n")
    key, pub = keypair(tmp_path)
    sig = tmp_path / "tiny-model.sig"
    r = ms("sign", "key", m, "--private_key", key, "--signature", sig, "--ignore-paths", m / "README.md",
           "--ignore-paths", m / "sub" / "deeper")
    assert r.returncode == 0, r.stderr
    ign = statement(sig)["predicate"]["serialization"]["ignore_paths"]
    assert {"README.md", "sub/deeper"} <= set(ign), ign
    (m / "README.md").write_text("# edited after signing\n")
    (m / "sub" / "deeper" / "new.bin").write_bytes(b"new")
    ms_verified(m, pub, sig)
    sling_verified(m, pub, sig)
    (m / "sub" / "notes.txt").write_text("edited\n")
    ms_refused(m, pub, sig, "tampered file next to ignored ones")
    sling_refused(m, pub, sig, "file_hash", "sub/notes.txt")


@pytest.mark.parametrize("signer", ["sling", "model_signing"])
def test_tampering_fails_both(signer, tmp_path):
    m = model_dir(tmp_path)
    key, pub = keypair(tmp_path)
    sig = tmp_path / "tiny-model.sig"
    if signer == "sling":
        sling_sign(m, key, sig)
    else:
        ms_sign(m, key, sig)
    results = {}

    target = m / "sub" / "deeper" / "x.bin"
    orig = target.read_bytes()
    target.write_bytes(orig[:-1] + bytes([orig[-1] ^ 1]))  # one bit of the last byte
    assert "sub/deeper/x.bin" in ms_refused(m, pub, sig, "tampered file")
    results["tampered"] = sling_refused(m, pub, sig, "file_hash", "sub/deeper/x.bin")["problems"][0]["message"]
    target.write_bytes(orig)

    (m / "sub" / "extra.bin").write_bytes(b"not signed")
    assert "sub/extra.bin" in ms_refused(m, pub, sig, "extra file")
    results["extra"] = sling_refused(m, pub, sig, "extra_file", "sub/extra.bin")["problems"][0]["message"]
    (m / "sub" / "extra.bin").unlink()

    saved = (m / "config.json").read_bytes()
    (m / "config.json").unlink()
    assert "config.json" in ms_refused(m, pub, sig, "missing file")
    results["missing"] = sling_refused(m, pub, sig, "missing_file", "config.json")["problems"][0]["message"]
    (m / "config.json").write_bytes(saved)

    _, other = keypair(tmp_path, "other")
    ms_refused(m, other, sig, "wrong key")
    results["wrong_key"] = sling_refused(m, other, sig, "key_mismatch", None)["problems"][0]["message"]

    # Back to the signed state: both accept again.
    ms_verified(m, pub, sig)
    sling_verified(m, pub, sig)
    lab.record("signing", f"tamper/{signer}", results)


def test_edited_signature_fails_both(tmp_path):
    m = model_dir(tmp_path)
    key, pub = keypair(tmp_path)
    sig = tmp_path / "tiny-model.sig"
    ms_sign(m, key, sig)
    b = json.loads(sig.read_text())
    st = statement(sig)
    st["predicate"]["resources"][0]["digest"] = "00" * 32
    b["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    sig.write_text(json.dumps(b))
    ms_refused(m, pub, sig, "edited payload")
    sling_refused(m, pub, sig, "bad_signature", None)
    # A bundle that is not one at all: sling cannot check (2), model_signing fails too.
    sig.write_text('{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}')
    ms_refused(m, pub, sig, "malformed bundle")
    rc, j = sling_verify(m, pub, sig)
    assert rc == 2 and j["status"] == "error", (rc, j)


@pytest.mark.parametrize("signer", ["sling", "model_signing"])
def test_single_file(signer, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    key, pub = keypair(tmp_path, sec1=True)
    sig = tmp_path / "model.sig"
    if signer == "sling":
        j = sling_sign(f, key, sig)
        assert [x["name"] for x in j["files"]] == ["."]
        compare_with_model_signing(f, key, tmp_path, sig)
    else:
        ms_sign(f, key, sig)
    assert statement(sig)["predicate"]["resources"][0]["name"] == "."
    assert statement(sig)["subject"][0]["name"] == "model.gguf"
    ms_verified(f, pub, sig)
    sling_verified(f, pub, sig)
    f.write_bytes(f.read_bytes() + b"\0")
    ms_refused(f, pub, sig, "tampered single file")
    j = sling_refused(f, pub, sig, "file_hash", ".")
    assert j["problems"][0]["message"].startswith("model.gguf:"), j
    lab.record("signing", f"single_file/{signer}", "ok")


@pytest.mark.parametrize("signer", ["sling", "model_signing"])
def test_default_signature_inside_model(signer, tmp_path):
    """Both tools default to ./model.sig; run from inside the model, the signature is then part of the directory
    and both must ignore it (it is recorded in ignore_paths)."""
    m = model_dir(tmp_path)
    key, pub = keypair(tmp_path)
    if signer == "sling":
        r = sling_run("sign", ".", "--key", key, cwd=m)
        assert r.returncode == 0, r.stderr
    else:
        r = ms("sign", "key", ".", "--private_key", key, cwd=m)
        assert r.returncode == 0, r.stderr
    sig = m / "model.sig"
    assert sig.is_file()
    ign = statement(sig)["predicate"]["serialization"]["ignore_paths"]
    assert sorted(ign) == [".git", ".gitattributes", ".github", ".gitignore", "model.sig"], ign
    assert statement(sig)["subject"][0]["name"] == "tiny-model"
    ms_verified(".", pub, "model.sig", cwd=m)
    ms_verified(m, pub, sig)
    sling_verified(".", pub, "model.sig", cwd=m)
    sling_verified(m, pub, sig)


def test_release_pipeline(tmp_path):
    """convert → sign → verify: the output directory of `sling convert` (GGUF + provenance manifest) signed by
    sling, checked by model_signing, by sling, and still by the manifest."""
    out = tmp_path / "release"
    out.mkdir()
    lab.sling_convert("qwen3moe", "q8_0", out / "qwen3moe-q8_0.gguf")
    key, pub = keypair(tmp_path)
    sig = tmp_path / "qwen3moe-q8_0.sig"
    j = sling_sign(out, key, sig)
    # the GGUF, its manifest and the model card written beside them (docs/pipeline.md)
    assert sorted(x["name"] for x in j["files"]) == ["README.md", "qwen3moe-q8_0.gguf", "qwen3moe-q8_0.sling.json"]
    ms_verified(out, pub, sig)
    sling_verified(out, pub, sig)
    assert lab.sling("verify", out / "qwen3moe-q8_0.gguf").returncode == 0
    ref = tmp_path / "ms.sig"
    ms_sign(out, key, ref)
    sling_verified(out, pub, ref)
    # One flipped byte in the GGUF fails the signature with both tools, and the manifest check too.
    g = out / "qwen3moe-q8_0.gguf"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0xFF
    g.write_bytes(bytes(data))
    ms_refused(out, pub, sig, "tampered GGUF")
    sling_refused(out, pub, sig, "file_hash", "qwen3moe-q8_0.gguf")
    sling_refused(out, pub, ref, "file_hash", "qwen3moe-q8_0.gguf")
    assert lab.sling("verify", g, check=False).returncode == 1
    lab.record("signing", "release_pipeline", {"files": len(j["files"]), "root": j["root_digest"]})


@pytest.mark.parametrize("to", ["vllm:w4a16", "mlx:4"])
def test_vllm_and_mlx_directories_sign_and_verify(tmp_path, to):
    """A `sling quantize --to vllm:…|mlx:…` directory (shards, config, tokenizer, card, sling.json) signed by sling
    verifies with model_signing and is the same statement model_signing makes; `sling verify DIR` still passes."""
    out = tmp_path / to.replace(":", "-")
    extra = ("--group-size", "32") if to.startswith("mlx") else ()
    r = sling_run("-q", "quantize", lab.fixture_dir("qwen3moe"), "--to", to, "-o", out, *extra)
    assert r.returncode == 0, r.stderr
    key, pub = keypair(tmp_path)
    sig = tmp_path / "artifact.sig"
    j = sling_sign(out, key, sig)
    names = [f["name"] for f in j["files"]]
    assert "sling.json" in names and "config.json" in names and "model.safetensors" in names, names
    ms_verified(out, pub, sig)
    compare_with_model_signing(out, key, tmp_path, sig)
    sling_verified(out, pub, sig)
    r = sling_run("verify", out)
    assert r.returncode == 0, r.stdout + r.stderr
    lab.record("signing", f"sling_sign->model_signing_verify {to} directory", {"files": len(names)})
