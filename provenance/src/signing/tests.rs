//! Unit tests of `signing`: a real model_signing signature (the worked example of the format notes),
//! sign → verify round trips, every kind of mismatch, key formats, and hostile bundles.

use std::fs;
use std::path::{Path, PathBuf};

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use p256::SecretKey;
use proptest::prelude::*;

use super::*;

/// Public key of the worked example (`model_signing sign key` with model-signing 1.1.1).
const EXAMPLE_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEV6ZufPqRspqAevLFoL7V/AccWlce
J3T+KU1/3dHSiez0EyUepZK6yXqtiwtoVA4q4uzADCuzT+a1jlBG5PK93w==
-----END PUBLIC KEY-----
";
const EXAMPLE_HINT: &str = "92a84b941fcd6028a6594bd168440db73493764f49ba992c12f39ecf42df44db";
const EXAMPLE_SIG: &str =
    "MEUCIDESu252bh27HR447dLQhdAI8YfTZniP3lNo0WTzqlq4AiEAywqVNYS8cfcOmqTjx5avb1KTZr5DW8v8MhOyct0bcVA=";
/// The exact signed payload (1,053 bytes, no trailing newline), as protobuf's MessageToJson wrote it.
const EXAMPLE_PAYLOAD: &str = r#"{
  "_type": "https://in-toto.io/Statement/v1",
  "subject": [
    {
      "name": "tiny-model",
      "digest": {
        "sha256": "c75ea00c6769500284257f81f44cd5f78b476a553273a566b4766040ca494f6d"
      }
    }
  ],
  "predicateType": "https://model_signing/signature/v1.0",
  "predicate": {
    "serialization": {
      "ignore_paths": [
        ".gitignore",
        ".git",
        ".gitattributes",
        ".github"
      ],
      "method": "files",
      "hash_type": "sha256",
      "allow_symlinks": false
    },
    "resources": [
      {
        "digest": "f68a01c5183a987078f1551e41df128be7273510adba30d0a83cc905e36d13a8",
        "algorithm": "sha256",
        "name": "config.json"
      },
      {
        "digest": "62e1cb3d236c6ee44130c54bf720f87b2ba1b0d58965634af9a3c3e541a462ef",
        "algorithm": "sha256",
        "name": "model.safetensors"
      },
      {
        "digest": "414f8e9fd34ff68f66cbdab5ec63a5e738aa107f3454fa7edb51f49528abf9c6",
        "algorithm": "sha256",
        "name": "sub/notes.txt"
      }
    ]
  }
}"#;

/// The worked example's model: `tiny-model/` with its git files (ignored).
fn example_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny-model");
    fs::create_dir_all(m.join("sub")).unwrap();
    fs::create_dir_all(m.join(".git")).unwrap();
    fs::write(m.join("config.json"), "{\"model_type\": \"tiny\"}\n").unwrap();
    fs::write(m.join("model.safetensors"), "hello weights\n").unwrap();
    fs::write(m.join("sub/notes.txt"), "nested file\n").unwrap();
    fs::write(m.join(".gitattributes"), "*.safetensors filter=lfs\n").unwrap();
    fs::write(m.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    m
}

/// The worked example's bundle, byte for byte as model_signing wrote it.
fn example_bundle() -> String {
    bundle_json(EXAMPLE_PAYLOAD.as_bytes(), &STANDARD.decode(EXAMPLE_SIG).unwrap(), EXAMPLE_HINT)
}

/// A deterministic P-256 key pair written as PKCS#8 (`k.pem`) and SPKI (`k.pub`) under `dir`.
fn keys(dir: &Path, seed: u8) -> (PathBuf, PathBuf, SigningKey) {
    let sk = SecretKey::from_slice(&[seed; 32]).unwrap();
    let k = dir.join(format!("k{seed}.pem"));
    let p = dir.join(format!("k{seed}.pub"));
    fs::write(&k, sk.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    fs::write(&p, sk.public_key().to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
    (k, p, SigningKey::from(sk))
}

/// A small model with nested, hidden and git files.
fn model(dir: &Path) -> PathBuf {
    let m = dir.join("m");
    fs::create_dir_all(m.join("a")).unwrap();
    fs::create_dir_all(m.join(".git/objects")).unwrap();
    fs::create_dir_all(m.join(".github")).unwrap();
    fs::create_dir_all(m.join("empty")).unwrap();
    fs::write(m.join("model.gguf"), b"GGUF\0weights").unwrap();
    fs::write(m.join("model.sling.json"), b"{}\n").unwrap();
    fs::write(m.join("a/b"), b"b").unwrap();
    fs::write(m.join("a.txt"), b"a").unwrap();
    fs::write(m.join("B"), b"upper").unwrap();
    fs::write(m.join("_u"), b"underscore").unwrap();
    fs::write(m.join(".hidden"), b"h").unwrap();
    fs::write(m.join(".gitignore"), b"*.tmp").unwrap();
    fs::write(m.join(".git/objects/x"), b"x").unwrap();
    fs::write(m.join(".github/ci.yml"), b"on: push").unwrap();
    m
}

fn statement_of(sig: &Path) -> Value {
    let b: Value = serde_json::from_slice(&fs::read(sig).unwrap()).unwrap();
    let payload = STANDARD.decode(b["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap();
    serde_json::from_slice(&payload).unwrap()
}

fn kinds(r: &SigVerifyReport) -> Vec<(SigProblemKind, Option<String>)> {
    r.problems.iter().map(|p| (p.kind, p.file.clone())).collect()
}

/// Writes a bundle around any payload, signed by `sk`.
fn write_signed(path: &Path, payload: &[u8], sk: &SigningKey) {
    let sig: Signature = sk.sign(&pae(payload));
    let hint = key_hint(&PublicKey::from(sk.verifying_key()));
    fs::write(path, bundle_json(payload, sig.to_der().as_bytes(), &hint)).unwrap();
}

#[test]
fn pae_is_dsse_v1() {
    assert_eq!(pae(b"{}"), b"DSSEv1 28 application/vnd.in-toto+json 2 {}".to_vec());
    assert_eq!(PAYLOAD_TYPE.len(), 28);
}

#[test]
fn key_hint_matches_model_signing() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("k.pub");
    fs::write(&p, EXAMPLE_PUB).unwrap();
    let key = load_public_key(&p).unwrap();
    assert_eq!(key_hint(&key), EXAMPLE_HINT);
    // The hint is over the re-encoded key, not the file's bytes.
    fs::write(&p, EXAMPLE_PUB.replace('\n', "\r\n")).unwrap();
    assert_eq!(key_hint(&load_public_key(&p).unwrap()), EXAMPLE_HINT);
}

#[test]
fn verifies_a_model_signing_signature() {
    let t = tempfile::tempdir().unwrap();
    let m = example_model(t.path());
    let sig = t.path().join("tiny-model.sig");
    fs::write(&sig, example_bundle()).unwrap();
    let pubk = t.path().join("k.pub");
    fs::write(&pubk, EXAMPLE_PUB).unwrap();
    let r = verify(&m, &sig, &pubk).unwrap();
    assert!(r.verified(), "{:?}", r.problems);
    assert_eq!(r.files_checked, 3);
    assert_eq!(r.model_name.as_deref(), Some("tiny-model"));
    assert_eq!(r.root_digest.as_deref(), Some("c75ea00c6769500284257f81f44cd5f78b476a553273a566b4766040ca494f6d"));
    assert!(r.warnings.is_empty());

    // sling's own signature of the same model lists the same resources and root digest.
    let (k, p, _) = keys(t.path(), 7);
    let mine = t.path().join("mine.sig");
    let out = sign(&m, &k, &mine).unwrap();
    assert_eq!(out.root_digest, "c75ea00c6769500284257f81f44cd5f78b476a553273a566b4766040ca494f6d");
    let ours = statement_of(&mine);
    let theirs: Value = serde_json::from_str(EXAMPLE_PAYLOAD).unwrap();
    assert_eq!(ours["subject"], theirs["subject"]);
    assert_eq!(ours["predicateType"], theirs["predicateType"]);
    assert_eq!(ours["predicate"]["resources"], theirs["predicate"]["resources"]);
    assert!(verify(&m, &mine, &p).unwrap().verified());

    // One edited byte in the example model fails it, naming the file.
    fs::write(m.join("sub/notes.txt"), "nested filE\n").unwrap();
    let r = verify(&m, &sig, &pubk).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::FileHash, Some("sub/notes.txt".into()))]);
    assert!(r.problems[0].message.contains("sub/notes.txt"));
}

#[test]
fn sign_then_verify_directory() {
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let (k, p, _) = keys(t.path(), 1);
    // The default name inside the model: it is ignored and recorded in ignore_paths.
    let sig = m.join(DEFAULT_SIGNATURE);
    let out = sign(&m, &k, &sig).unwrap();
    let names: Vec<&str> = out.files.iter().map(|f| f.name.as_str()).collect();
    // Component-wise order: `a/b` before `a.txt`; `B` < `_u` < `a`; hidden files signed, git paths not.
    assert_eq!(names, [".hidden", "B", "_u", "a/b", "a.txt", "model.gguf", "model.sling.json"]);
    assert_eq!(out.ignore_paths, [".git", ".gitattributes", ".github", ".gitignore", "model.sig"]);
    assert_eq!(out.model_name, "m");

    let bytes = fs::read(&sig).unwrap();
    assert_ne!(bytes.last(), Some(&b'\n'));
    let b: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(b["mediaType"], BUNDLE_MEDIA_TYPE);
    assert_eq!(b["verificationMaterial"]["tlogEntries"], json!([]));
    assert_eq!(b["verificationMaterial"]["publicKey"]["hint"], out.key_hint);
    assert_eq!(b["dsseEnvelope"]["payloadType"], PAYLOAD_TYPE);
    assert_eq!(b["dsseEnvelope"]["signatures"][0]["keyid"], "");
    let st = statement_of(&sig);
    assert_eq!(st["_type"], STATEMENT_TYPE);
    assert_eq!(st["predicateType"], PREDICATE_TYPE);
    assert_eq!(st["subject"][0]["digest"]["sha256"], out.root_digest);
    assert_eq!(st["predicate"]["serialization"]["method"], "files");
    assert_eq!(st["predicate"]["serialization"]["hash_type"], "sha256");
    assert_eq!(st["predicate"]["serialization"]["allow_symlinks"], false);
    assert_eq!(
        st["predicate"]["resources"][0],
        json!({"name": ".hidden", "algorithm": "sha256", "digest": hex(&Sha256::digest(b"h"))})
    );

    let r = verify(&m, &sig, &p).unwrap();
    assert!(r.verified(), "{:?}", r.problems);
    assert_eq!(r.files_checked, 7);
    // Deterministic (RFC 6979): the same model and key give the same bytes.
    sign(&m, &k, &sig).unwrap();
    assert_eq!(fs::read(&sig).unwrap(), bytes);
    // Git paths may change freely.
    fs::write(m.join(".gitignore"), b"changed").unwrap();
    fs::write(m.join(".git/objects/y"), b"new").unwrap();
    assert!(verify(&m, &sig, &p).unwrap().verified());
}

#[test]
fn tampered_extra_and_missing_files() {
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let (k, p, _) = keys(t.path(), 2);
    let sig = t.path().join("model.sig");
    sign(&m, &k, &sig).unwrap();
    fs::write(m.join("a/b"), b"B").unwrap();
    let r = verify(&m, &sig, &p).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::FileHash, Some("a/b".into()))]);
    assert!(r.problems[0].message.starts_with("a/b: sha256 "), "{}", r.problems[0]);
    fs::write(m.join("a/b"), b"b").unwrap();

    fs::write(m.join("a/new.bin"), b"extra").unwrap();
    fs::write(m.join("empty/.x"), b"").unwrap();
    let r = verify(&m, &sig, &p).unwrap();
    assert_eq!(
        kinds(&r),
        vec![
            (SigProblemKind::ExtraFile, Some("a/new.bin".into())),
            (SigProblemKind::ExtraFile, Some("empty/.x".into()))
        ]
    );
    fs::remove_file(m.join("a/new.bin")).unwrap();
    fs::remove_file(m.join("empty/.x")).unwrap();

    fs::remove_file(m.join("model.sling.json")).unwrap();
    let r = verify(&m, &sig, &p).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::MissingFile, Some("model.sling.json".into()))]);
    assert!(r.problems[0].message.contains("model.sling.json: missing"));
}

#[test]
fn wrong_key_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let (k, _, _) = keys(t.path(), 3);
    let (_, other, _) = keys(t.path(), 4);
    let sig = t.path().join("model.sig");
    sign(&m, &k, &sig).unwrap();
    let r = verify(&m, &sig, &other).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::KeyMismatch, None)]);
    // Without the hint, the signature itself is checked (and fails).
    let mut b: Value = serde_json::from_slice(&fs::read(&sig).unwrap()).unwrap();
    b["verificationMaterial"]["publicKey"] = json!({});
    fs::write(&sig, b.to_string()).unwrap();
    let r = verify(&m, &sig, &other).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::BadSignature, None)]);
}

#[test]
fn edited_payload_or_signature_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let (k, p, sk) = keys(t.path(), 5);
    let sig = t.path().join("model.sig");
    sign(&m, &k, &sig).unwrap();
    let orig: Value = serde_json::from_slice(&fs::read(&sig).unwrap()).unwrap();

    // A payload edited to match a tampered file, keeping the old signature.
    let mut st = statement_of(&sig);
    st["predicate"]["resources"][0]["digest"] = json!(hex(&Sha256::digest(b"evil")));
    let mut b = orig.clone();
    b["dsseEnvelope"]["payload"] = json!(STANDARD.encode(st.to_string()));
    fs::write(&sig, b.to_string()).unwrap();
    assert_eq!(kinds(&verify(&m, &sig, &p).unwrap()), vec![(SigProblemKind::BadSignature, None)]);

    // A raw (r||s) signature instead of DER.
    let mut b = orig.clone();
    let der = STANDARD.decode(orig["dsseEnvelope"]["signatures"][0]["sig"].as_str().unwrap()).unwrap();
    let raw = Signature::from_der(&der).unwrap().to_bytes();
    b["dsseEnvelope"]["signatures"][0]["sig"] = json!(STANDARD.encode(raw));
    fs::write(&sig, b.to_string()).unwrap();
    assert_eq!(kinds(&verify(&m, &sig, &p).unwrap()), vec![(SigProblemKind::BadSignature, None)]);

    // Properly signed, but the subject digest does not match the resources.
    st["subject"][0]["digest"]["sha256"] = json!(hex(&Sha256::digest(b"not the root")));
    write_signed(&sig, st.to_string().as_bytes(), &sk);
    assert_eq!(kinds(&verify(&m, &sig, &p).unwrap()), vec![(SigProblemKind::RootDigest, None)]);
}

#[test]
fn signed_ignore_paths_and_unsorted_resources_are_honoured() {
    // Another producer may list resources in any order and ignore more paths: as model_signing does,
    // the root is over the listed order and the recorded ignore_paths apply on verify.
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let (k, p, sk) = keys(t.path(), 6);
    let sig = t.path().join("model.sig");
    sign(&m, &k, &sig).unwrap();
    let mut st = statement_of(&sig);
    let mut res: Vec<Value> = st["predicate"]["resources"].as_array().unwrap().clone();
    res.retain(|r| r["name"] != "a.txt" && r["name"] != "a/b");
    res.reverse();
    let mut root = Sha256::new();
    for r in &res {
        root.update(unhex(r["digest"].as_str().unwrap()).unwrap());
    }
    st["predicate"]["resources"] = json!(res);
    st["predicate"]["serialization"]["ignore_paths"] = json!(["a.txt", "./a/", "/etc", "../x"]);
    st["subject"][0]["digest"]["sha256"] = json!(hex(&root.finalize()));
    write_signed(&sig, serde_json::to_vec(&st).unwrap().as_slice(), &sk);
    fs::write(m.join("a.txt"), b"changed").unwrap();
    fs::write(m.join("a/c"), b"new").unwrap();
    let r = verify(&m, &sig, &p).unwrap();
    assert!(r.verified(), "{:?}", r.problems);
    // But not the git paths' look-alikes.
    fs::write(m.join("a/.git"), b"not at the root").unwrap();
    fs::write(m.join(".gitx"), b"not a git path").unwrap();
    let r = verify(&m, &sig, &p).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::ExtraFile, Some(".gitx".into()))]);
}

#[test]
fn single_file_artifact() {
    let t = tempfile::tempdir().unwrap();
    let (k, p, _) = keys(t.path(), 8);
    let f = t.path().join("model.gguf");
    fs::write(&f, b"hello weights\n").unwrap();
    let sig = t.path().join("model.sig");
    let out = sign(&f, &k, &sig).unwrap();
    assert_eq!(out.model_name, "model.gguf");
    assert_eq!(
        out.files,
        vec![SignedFile {
            name: ".".into(),
            sha256: "62e1cb3d236c6ee44130c54bf720f87b2ba1b0d58965634af9a3c3e541a462ef".into()
        }]
    );
    assert_eq!(out.ignore_paths, GIT_PATHS);
    let r = verify(&f, &sig, &p).unwrap();
    assert!(r.verified(), "{:?}", r.problems);
    assert_eq!(r.files_checked, 1);
    fs::write(&f, b"hello weightz\n").unwrap();
    let r = verify(&f, &sig, &p).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::FileHash, Some(".".into()))]);
    assert!(r.problems[0].message.starts_with("model.gguf: "), "{}", r.problems[0]);
    // A directory signature does not verify a file, nor the reverse.
    let m = model(t.path());
    let r = verify(&m, &sig, &p).unwrap();
    assert!(r.problems.iter().any(|p| p.kind == SigProblemKind::MissingFile));
    assert!(matches!(sign(&f, &k, &f), Err(SigningError::Write { .. })));
    assert!(matches!(sign(&f, &k, t.path()), Err(SigningError::Write { .. })));
}

#[cfg(unix)]
#[test]
fn symlinks_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let (k, p, _) = keys(t.path(), 9);
    let sig = t.path().join("model.sig");
    sign(&m, &k, &sig).unwrap();
    std::os::unix::fs::symlink("model.gguf", m.join("link.gguf")).unwrap();
    match sign(&m, &k, &t.path().join("x.sig")) {
        Err(SigningError::Model { path, reason }) => {
            assert!(path.ends_with("link.gguf") && reason.contains("symbolic link"), "{path:?} {reason}")
        }
        other => panic!("{other:?}"),
    }
    let r = verify(&m, &sig, &p).unwrap();
    assert_eq!(kinds(&r), vec![(SigProblemKind::NotRegularFile, Some("link.gguf".into()))]);
    // The root itself.
    let l = t.path().join("mlink");
    std::os::unix::fs::symlink(&m, &l).unwrap();
    assert!(matches!(verify(&l, &sig, &p), Err(SigningError::Model { .. })));
}

#[test]
fn key_formats() {
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let sk = SecretKey::from_slice(&[11; 32]).unwrap();
    let pubk = t.path().join("k.pub");
    fs::write(&pubk, sk.public_key().to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
    // SEC1 as `openssl ecparam -genkey` writes it, with the parameters block first.
    let sec1 = t.path().join("sec1.pem");
    let params = "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";
    fs::write(&sec1, format!("{params}{}", sk.to_sec1_pem(LineEnding::LF).unwrap().as_str())).unwrap();
    let sig = t.path().join("model.sig");
    sign(&m, &sec1, &sig).unwrap();
    assert!(verify(&m, &sig, &pubk).unwrap().verified());

    let bad = |text: &str, what: &str| {
        let f = t.path().join("bad.pem");
        fs::write(&f, text).unwrap();
        match load_private_key(&f) {
            Err(SigningError::Key { path, reason }) => assert!(path == f && reason.contains(what), "{reason}"),
            other => panic!("{other:?}"),
        }
    };
    bad("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "encrypted");
    bad("hello", "no PEM private key");
    bad("-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n", "P-256");
    // A P-384 key (openssl ecparam -name secp384r1 -genkey | openssl pkcs8 -topk8 -nocrypt).
    bad(P384_PRIVATE, "P-256");
    let f = t.path().join("p384.pub");
    fs::write(&f, P384_PUBLIC).unwrap();
    assert!(matches!(load_public_key(&f), Err(SigningError::Key { .. })));
    assert!(matches!(verify(&m, &sig, &f), Err(SigningError::Key { .. })));
    // A private key where the public one is expected.
    assert!(matches!(verify(&m, &sig, &sec1), Err(SigningError::Key { reason, .. }) if reason.contains("private key")));
    assert!(matches!(verify(&m, &sig, &t.path().join("nope.pub")), Err(SigningError::Read { .. })));
}

const P384_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDDkPqFJ0avYY6cQfyBI
CbAIsYoqdBmHf+JxkiJQt50ioL5DO1LD93N+5HzUiY/YxauhZANiAAT81DXSDbbY
twIdl71ZxOhx8tv4vYe10RVwC+qjd/msWLgAvimbD2fo2a5hHouBTiqQHpY8Si+h
yWki+UiyJWi2yvybSU9ewJxkQAviJfzRBi/g1z9K2Cv7N/tA3mA5UXU=
-----END PRIVATE KEY-----
";
const P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE/NQ10g222LcCHZe9WcTocfLb+L2HtdEV
cAvqo3f5rFi4AL4pmw9n6NmuYR6LgU4qkB6WPEovoclpIvlIsiVotsr8m0lPXsCc
ZEAL4iX80QYv4Nc/Stgr+zf7QN5gOVF1
-----END PUBLIC KEY-----
";

#[test]
fn malformed_bundles_cannot_be_checked() {
    let t = tempfile::tempdir().unwrap();
    let m = example_model(t.path());
    let pubk = t.path().join("k.pub");
    fs::write(&pubk, EXAMPLE_PUB).unwrap();
    let sig = t.path().join("x.sig");
    let good: Value = serde_json::from_str(&example_bundle()).unwrap();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "not JSON"),
        ("[]".into(), "not a JSON object"),
        ("{\"mediaType\": 3}".into(), "mediaType"),
        ("[".repeat(100_000), "not JSON"),
        (edit(&|v| v["mediaType"] = json!("application/vnd.dev.sigstore.bundle+json;version=0.2")), "media type"),
        (edit(&|v| v["verificationMaterial"] = json!({"certificate": {"rawBytes": "AA=="}})), "certificate"),
        (edit(&|v| v["verificationMaterial"]["publicKey"] = json!("x")), "publicKey"),
        (edit(&|v| v["verificationMaterial"]["publicKey"]["hint"] = json!(7)), "hint"),
        (edit(&|v| v.as_object_mut().unwrap().remove("dsseEnvelope").map(|_| ()).unwrap_or(())), "dsseEnvelope"),
        (edit(&|v| v["dsseEnvelope"]["payload"] = json!("***")), "base64"),
        (edit(&|v| v["dsseEnvelope"]["signatures"] = json!([])), "empty"),
        (edit(&|v| v["dsseEnvelope"]["signatures"] = json!({"sig": "AA=="})), "signatures"),
        (edit(&|v| v["dsseEnvelope"]["signatures"][0]["sig"] = json!(null)), "sig"),
    ];
    for (text, what) in cases {
        fs::write(&sig, &text).unwrap();
        match verify(&m, &sig, &pubk) {
            Err(SigningError::Bundle { path, reason }) => {
                assert!(path == sig && reason.contains(what), "{what}: {reason}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A bad payload type fails after the signature check.
    fs::write(&sig, edit(&|v| v["dsseEnvelope"]["payloadType"] = json!("text/plain"))).unwrap();
    assert!(matches!(verify(&m, &sig, &pubk), Err(SigningError::Statement { .. })));
}

#[test]
fn malformed_signed_statements_cannot_be_checked() {
    let t = tempfile::tempdir().unwrap();
    let m = model(t.path());
    let (k, p, sk) = keys(t.path(), 12);
    let sig = t.path().join("model.sig");
    sign(&m, &k, &sig).unwrap();
    let st = statement_of(&sig);
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = st.clone();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "not JSON"),
        ("{}".into(), "_type"),
        (edit(&|v| v["_type"] = json!("https://in-toto.io/Statement/v0.1")), "in-toto"),
        (edit(&|v| v["predicateType"] = json!(PREDICATE_TYPE_V01)), "pre-1.0"),
        (edit(&|v| v["predicateType"] = json!("https://slsa.dev/provenance/v1")), "predicate type"),
        (edit(&|v| v["subject"] = json!([])), "one subject"),
        (edit(&|v| v["subject"][0]["digest"] = json!({"sha512": "00"})), "digest.sha256"),
        (edit(&|v| v["predicate"]["serialization"]["method"] = json!("shards")), "\"shards\""),
        (edit(&|v| v["predicate"]["serialization"]["hash_type"] = json!("blake3")), "blake3"),
        (
            edit(&|v| {
                v["predicate"]["serialization"]
                    .as_object_mut()
                    .unwrap()
                    .remove("allow_symlinks")
                    .map(|_| ())
                    .unwrap_or(())
            }),
            "allow_symlinks",
        ),
        (edit(&|v| v["predicate"]["serialization"]["ignore_paths"] = json!([1])), "non-string"),
        (edit(&|v| v["predicate"]["resources"] = json!(null)), "resources"),
        (edit(&|v| v["predicate"]["resources"][0]["digest"] = json!("zz")), "not hex"),
        (edit(&|v| v["predicate"]["resources"][0]["name"] = json!(["x"])), "name"),
        (edit(&|v| v["predicate"]["resources"][1]["name"] = json!("./.hidden")), "twice"),
    ];
    for (text, what) in cases {
        write_signed(&sig, text.as_bytes(), &sk);
        match verify(&m, &sig, &p) {
            Err(SigningError::Statement { reason, .. }) => assert!(reason.contains(what), "{what}: {reason}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// Any damage to a real bundle is either still verified or refused, never a panic.
    #[test]
    fn damaged_bundles_never_panic(pos in 0usize..2000, byte in any::<u8>(), cut in 0usize..2000) {
        let t = tempfile::tempdir().unwrap();
        let m = example_model(t.path());
        let pubk = t.path().join("k.pub");
        fs::write(&pubk, EXAMPLE_PUB).unwrap();
        let mut b = example_bundle().into_bytes();
        let i = pos % b.len();
        b[i] = byte;
        b.truncate(b.len() - cut % 50);
        let sig = t.path().join("x.sig");
        fs::write(&sig, &b).unwrap();
        let _ = verify(&m, &sig, &pubk);
    }

    /// Hostile statements, properly signed, never panic either.
    #[test]
    fn hostile_statements_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..300), json_ish in "[\\[\\]{}\":,a-z0-9._/ ]{0,200}") {
        let t = tempfile::tempdir().unwrap();
        let m = example_model(t.path());
        let (_, p, sk) = keys(t.path(), 13);
        let sig = t.path().join("x.sig");
        for body in [payload.as_slice(), json_ish.as_bytes()] {
            write_signed(&sig, body, &sk);
            let _ = verify(&m, &sig, &p);
        }
    }
}
