//! Signatures interoperable with the OpenSSF model-signing project (`model_signing` 1.1.1, key-based
//! ECDSA P-256).
//!
//! [`sign`] writes what `model_signing sign key --private_key KEY MODEL` writes, and [`verify`] checks
//! what it (or [`sign`]) wrote, the way `model_signing verify key --public_key PUB --signature SIG MODEL`
//! does. The format (see `docs/signing.md`):
//!
//! * The signature file is a Sigstore bundle v0.3 (compact JSON, no trailing newline): `mediaType`
//!   [`BUNDLE_MEDIA_TYPE`]; `verificationMaterial.publicKey.hint` = hex sha256 of the signer's public key
//!   as PEM SubjectPublicKeyInfo (no certificate, no transparency log, `tlogEntries: []`); `dsseEnvelope`
//!   = `{payload: base64(statement), payloadType: "application/vnd.in-toto+json", signatures: [{sig:
//!   base64(DER ECDSA signature), keyid: ""}]}`.
//! * The signature is ECDSA P-256 / SHA-256 (RFC 6979, deterministic) over the DSSE v1 pre-authentication
//!   encoding [`pae`] of the payload.
//! * The payload is an in-toto Statement v1 with predicate type [`PREDICATE_TYPE`]: one subject (the
//!   model's name, digest `sha256` = sha256 over the concatenated raw digests of the resources, in
//!   listed order), and `predicate.serialization = {method: "files", hash_type: "sha256",
//!   allow_symlinks: false, ignore_paths: [...]}` plus `predicate.resources = [{name, algorithm:
//!   "sha256", digest}]`, one per file (model-relative POSIX path), sorted component-wise like Python's
//!   `PurePosixPath`.
//! * The files are every regular file under the model directory, hidden ones included, except the
//!   git paths [`GIT_PATHS`] at the model root, the signature file itself when it lies inside the model
//!   directory, and (when verifying) the `ignore_paths` recorded in the signed statement. Symbolic links
//!   and special files are refused. A single-file artifact is one resource named `"."`.
//!
//! Errors that stop a signature from being made or checked are [`SigningError`]s (each names the
//! file); differences found by a completed check are [`SigProblem`]s in a [`SigVerifyReport`].

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use p256::{PublicKey, SecretKey};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::manifest::write_atomic;

/// `mediaType` of the Sigstore bundle that `model_signing` writes and requires.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// DSSE `payloadType` of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// `_type` of the in-toto statement.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of a model_signing v1.0 signature.
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// `predicateType` of pre-1.0 model_signing signatures (not supported).
pub const PREDICATE_TYPE_V01: &str = "https://model_signing/Digests/v0.1";
/// Default signature path of `model_signing sign` (relative to the current directory).
pub const DEFAULT_SIGNATURE: &str = "model.sig";
/// Paths at the model root that `model_signing` ignores by default (`--ignore-git-paths`).
pub const GIT_PATHS: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];
/// Read size when hashing files (model_signing reads 1 MiB chunks too; the digest does not depend on it).
const HASH_BUF: usize = 1 << 20;

/// Errors that stop a signature from being made or checked. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The key file is not a usable key (not PEM, encrypted, not ECDSA P-256, ...).
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// Something in the model cannot be signed (a symbolic link, a special file, a name that is not UTF-8).
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },
    /// The signature file is not a model_signing key-based signature bundle.
    #[error("{path}: not a model_signing signature bundle: {reason}")]
    Bundle { path: PathBuf, reason: String },
    /// The signed statement is malformed or of a kind this version does not check.
    #[error("{path}: {reason}")]
    Statement { path: PathBuf, reason: String },
}

// ---------------------------------------------------------------------------------------------
// Keys, encodings
// ---------------------------------------------------------------------------------------------

/// Standard base64 for decoding: padding optional (protobuf JSON and Python accept both).
const B64_DECODE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn b64_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    B64_DECODE.decode(clean.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(D[usize::from(b >> 4)]));
        s.push(char::from(D[usize::from(b & 15)]));
    }
    s
}

/// Hex to bytes, either case (like Python's `bytes.fromhex` without the whitespace).
fn unhex(s: &str) -> Option<Vec<u8>> {
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let pairs = s.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    pairs.map(|p| Some(nib(p[0])? << 4 | nib(p[1])?)).collect()
}

/// The DSSE v1 pre-authentication encoding of an in-toto payload: the bytes that are signed.
pub fn pae(payload: &[u8]) -> Vec<u8> {
    let mut v = format!("DSSEv1 {} {} {} ", PAYLOAD_TYPE.len(), PAYLOAD_TYPE, payload.len()).into_bytes();
    v.extend_from_slice(payload);
    v
}

/// The first `-----BEGIN {label}-----` ... `-----END {label}-----` block of `text`.
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let s = text.find(&begin)?;
    let e = s + text.get(s..)?.find(&end)? + end.len();
    text.get(s..e)
}

fn read_pem(path: &Path) -> Result<String, SigningError> {
    let bytes = std::fs::read(path).map_err(|source| SigningError::Read { path: path.to_path_buf(), source })?;
    String::from_utf8(bytes)
        .map_err(|_| SigningError::Key { path: path.to_path_buf(), reason: "not a PEM file (not text)".into() })
}

/// Loads an unencrypted ECDSA P-256 private key: PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE
/// KEY`, as `openssl ecparam -genkey` writes it, with or without the `EC PARAMETERS` block).
pub fn load_private_key(path: &Path) -> Result<SigningKey, SigningError> {
    let text = read_pem(path)?;
    let key_err = |reason: String| SigningError::Key { path: path.to_path_buf(), reason };
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(key_err(
            "encrypted private keys are not supported: decrypt it first (openssl pkey -in KEY -out PLAIN.pem)".into(),
        ));
    }
    let secret = if let Some(block) = pem_block(&text, "PRIVATE KEY") {
        SecretKey::from_pkcs8_pem(block)
            .map_err(|e| key_err(format!("not an ECDSA P-256 private key (only P-256 is supported): {e}")))?
    } else if let Some(block) = pem_block(&text, "EC PRIVATE KEY") {
        SecretKey::from_sec1_pem(block)
            .map_err(|e| key_err(format!("not an ECDSA P-256 private key (only P-256 is supported): {e}")))?
    } else {
        return Err(key_err("no PEM private key found (expected BEGIN PRIVATE KEY or BEGIN EC PRIVATE KEY)".into()));
    };
    Ok(SigningKey::from(secret))
}

/// Loads an ECDSA P-256 public key in PEM SubjectPublicKeyInfo form (`BEGIN PUBLIC KEY`).
pub fn load_public_key(path: &Path) -> Result<PublicKey, SigningError> {
    let text = read_pem(path)?;
    let key_err = |reason: String| SigningError::Key { path: path.to_path_buf(), reason };
    let Some(block) = pem_block(&text, "PUBLIC KEY") else {
        let reason = if text.contains("PRIVATE KEY-----") {
            "a private key, not a public key (derive it with: openssl ec -in KEY -pubout -out PUB.pem)"
        } else if text.contains("-----BEGIN CERTIFICATE-----") {
            "a certificate, not a public key (certificate-based model_signing signatures are not supported)"
        } else {
            "no PEM public key found (expected BEGIN PUBLIC KEY)"
        };
        return Err(key_err(reason.into()));
    };
    PublicKey::from_public_key_pem(block)
        .map_err(|e| key_err(format!("not an ECDSA P-256 public key (only P-256 is supported): {e}")))
}

/// The key hint model_signing records and checks: hex sha256 of the public key's PEM
/// SubjectPublicKeyInfo (64-column base64, `\n` line ends, final newline).
pub fn key_hint(key: &PublicKey) -> String {
    // Encoding a valid point cannot fail; an empty hint would only downgrade to "no hint".
    let pem = key.to_public_key_pem(LineEnding::LF).unwrap_or_default();
    hex(&Sha256::digest(pem.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Model walk
// ---------------------------------------------------------------------------------------------

/// Model-relative path components, compared like Python `PurePosixPath` objects.
type Key = Vec<String>;

/// Ignored paths as components relative to the model root; a path is ignored when one of them is a
/// prefix of it (Python `is_relative_to`).
struct Ignore(Vec<Key>);

impl Ignore {
    /// From model-relative strings as model_signing records them. Absolute entries are dropped (they
    /// cannot be relative to the model); `.` and empty components vanish as in `pathlib`.
    fn new<S: AsRef<str>>(paths: &[S]) -> Ignore {
        Ignore(paths.iter().filter_map(|p| rel_key(p.as_ref())).collect())
    }
    fn matches(&self, key: &[String]) -> bool {
        self.0.iter().any(|ig| key.starts_with(ig))
    }
}

/// `a//b/./c/` → `[a, b, c]`; `None` for an absolute path.
fn rel_key(s: &str) -> Option<Key> {
    if s.starts_with('/') {
        return None;
    }
    Some(s.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_string).collect())
}

/// The resource name of a key: `a/b`, or `.` for the model itself (single-file artifact).
fn key_name(key: &[String]) -> String {
    if key.is_empty() {
        ".".to_string()
    } else {
        key.join("/")
    }
}

/// What is wrong with a path that is neither a regular file nor a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Odd {
    Symlink,
    Special,
    NonUtf8,
}

impl Odd {
    fn reason(self) -> &'static str {
        match self {
            Odd::Symlink => "is a symbolic link (model_signing refuses symlinks by default; sling never follows them)",
            Odd::Special => "is neither a regular file nor a directory",
            Odd::NonUtf8 => "has a name that is not UTF-8 (it cannot be named in a signature)",
        }
    }
}

struct Found {
    key: Key,
    path: PathBuf,
}

#[derive(Default)]
struct Walk {
    files: Vec<Found>,
    /// (model-relative name, lossy; path; what is wrong)
    odd: Vec<(String, PathBuf, Odd)>,
}

/// Every regular file of the model (a directory, or a single file), minus the ignored paths.
/// Ignored directories are not entered.
fn walk(root: &Path, ignore: &Ignore) -> Result<Walk, SigningError> {
    let meta =
        std::fs::symlink_metadata(root).map_err(|source| SigningError::Read { path: root.to_path_buf(), source })?;
    let ft = meta.file_type();
    let mut w = Walk::default();
    if ft.is_symlink() {
        return Err(SigningError::Model { path: root.to_path_buf(), reason: Odd::Symlink.reason().into() });
    } else if ft.is_file() {
        if !ignore.matches(&[]) {
            w.files.push(Found { key: Vec::new(), path: root.to_path_buf() });
        }
    } else if ft.is_dir() {
        walk_dir(root, &mut Vec::new(), ignore, &mut w)?;
    } else {
        return Err(SigningError::Model { path: root.to_path_buf(), reason: Odd::Special.reason().into() });
    }
    Ok(w)
}

fn walk_dir(dir: &Path, prefix: &mut Key, ignore: &Ignore, w: &mut Walk) -> Result<(), SigningError> {
    let rd = std::fs::read_dir(dir).map_err(|source| SigningError::Read { path: dir.to_path_buf(), source })?;
    for entry in rd {
        let entry = entry.map_err(|source| SigningError::Read { path: dir.to_path_buf(), source })?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            let mut lossy = prefix.clone();
            lossy.push(entry.file_name().to_string_lossy().into_owned());
            w.odd.push((key_name(&lossy), path, Odd::NonUtf8));
            continue;
        };
        prefix.push(name);
        if !ignore.matches(prefix) {
            let ft = entry.file_type().map_err(|source| SigningError::Read { path: path.clone(), source })?;
            if ft.is_symlink() {
                w.odd.push((key_name(prefix), path, Odd::Symlink));
            } else if ft.is_dir() {
                walk_dir(&path, prefix, ignore, w)?;
            } else if ft.is_file() {
                w.files.push(Found { key: prefix.clone(), path });
            } else {
                w.odd.push((key_name(prefix), path, Odd::Special));
            }
        }
        prefix.pop();
    }
    Ok(())
}

/// sha256 of a whole file.
fn sha256_file(path: &Path) -> Result<[u8; 32], SigningError> {
    let err = |source| SigningError::Read { path: path.to_path_buf(), source };
    let mut f = File::open(path).map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let k = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        };
        h.update(buf.get(..k).unwrap_or(&[]));
    }
    Ok(h.finalize().into())
}

/// The informative model name: the final component of the path (of its resolved form for `.`/`..`).
fn model_name(artifact: &Path) -> String {
    if let Some(n) = artifact.file_name() {
        return n.to_string_lossy().into_owned();
    }
    std::fs::canonicalize(artifact)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// Absolute form of `p` with symlinks resolved as far as it exists (Python `Path.resolve()`).
fn resolve_lenient(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    };
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).map(|d| d.join(name)).unwrap_or(abs),
        _ => abs,
    }
}

/// The signature's path relative to the model root when it lies inside it (it is then ignored, as
/// model_signing's CLI does).
fn signature_inside(artifact: &Path, signature: &Path) -> Option<String> {
    let root = std::fs::canonicalize(artifact).ok()?;
    let sig = resolve_lenient(signature);
    let rel = sig.strip_prefix(&root).ok()?;
    let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Sorts like Python sorts `PurePosixPath` objects: component by component.
fn sort_by_key<T>(v: &mut [T], key: impl Fn(&T) -> &Key) {
    v.sort_by(|a, b| key(a).cmp(key(b)));
}

// ---------------------------------------------------------------------------------------------
// Signing
// ---------------------------------------------------------------------------------------------

/// One signed file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignedFile {
    /// Model-relative POSIX path (`.` for a single-file artifact).
    pub name: String,
    /// Lowercase hex sha256.
    pub sha256: String,
}

/// What [`sign`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SignOutcome {
    pub signature: PathBuf,
    pub model_name: String,
    /// The subject digest: sha256 over the raw file digests in resource order.
    pub root_digest: String,
    /// `verificationMaterial.publicKey.hint`.
    pub key_hint: String,
    pub ignore_paths: Vec<String>,
    pub files: Vec<SignedFile>,
}

/// The in-toto statement for `files` (already sorted), as model_signing builds it.
fn statement(model_name: &str, root_hex: &str, ignore_paths: &[String], files: &[SignedFile]) -> Value {
    let mut serialization = Map::new();
    serialization.insert("method".into(), json!("files"));
    serialization.insert("hash_type".into(), json!("sha256"));
    serialization.insert("allow_symlinks".into(), json!(false));
    if !ignore_paths.is_empty() {
        serialization.insert("ignore_paths".into(), json!(ignore_paths));
    }
    let resources: Vec<Value> =
        files.iter().map(|f| json!({"name": f.name, "algorithm": "sha256", "digest": f.sha256})).collect();
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_hex}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"serialization": Value::Object(serialization), "resources": resources},
    })
}

/// The Sigstore bundle around a signed payload (compact JSON, as `bundle.to_json()` writes it).
fn bundle_json(payload: &[u8], der_sig: &[u8], hint: &str) -> String {
    let b = json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": STANDARD.encode(payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": STANDARD.encode(der_sig), "keyid": ""}],
        },
    });
    b.to_string()
}

/// Signs the model at `artifact` (a directory or a single file) with the ECDSA P-256 key in
/// `private_key`, writing the bundle to `signature` (replaced atomically). Same files, names,
/// statement and bundle shape as `model_signing sign key`.
pub fn sign(artifact: &Path, private_key: &Path, signature: &Path) -> Result<SignOutcome, SigningError> {
    let key = load_private_key(private_key)?;
    if signature.is_dir() {
        return Err(SigningError::Write {
            path: signature.to_path_buf(),
            source: std::io::Error::other("is a directory (give a file name, e.g. model.sig)"),
        });
    }
    if resolve_lenient(signature) == resolve_lenient(artifact) {
        return Err(SigningError::Write {
            path: signature.to_path_buf(),
            source: std::io::Error::other("is the artifact itself"),
        });
    }
    let mut ignore_paths: Vec<String> = GIT_PATHS.iter().map(|s| s.to_string()).collect();
    if let Some(rel) = signature_inside(artifact, signature) {
        ignore_paths.push(rel);
    }
    ignore_paths.sort();
    ignore_paths.dedup();
    let w = walk(artifact, &Ignore::new(&ignore_paths))?;
    if let Some((_, path, odd)) = w.odd.first() {
        return Err(SigningError::Model { path: path.clone(), reason: odd.reason().into() });
    }
    let mut hashed: Vec<(Key, [u8; 32])> =
        w.files.par_iter().map(|f| sha256_file(&f.path).map(|d| (f.key.clone(), d))).collect::<Result<_, _>>()?;
    sort_by_key(&mut hashed, |(k, _)| k);
    let mut root = Sha256::new();
    for (_, d) in &hashed {
        root.update(d);
    }
    let root_hex = hex(&root.finalize());
    let files: Vec<SignedFile> = hashed.iter().map(|(k, d)| SignedFile { name: key_name(k), sha256: hex(d) }).collect();
    let name = model_name(artifact);
    let st = statement(&name, &root_hex, &ignore_paths, &files);
    // Pretty (2-space indent), like protobuf's MessageToJson; verifiers parse it, so layout is free.
    let payload = serde_json::to_string_pretty(&st).unwrap_or_else(|_| st.to_string()).into_bytes();
    let sig: Signature = key.sign(&pae(&payload));
    let der: DerSignature = sig.to_der();
    let hint = key_hint(&PublicKey::from(key.verifying_key()));
    let bundle = bundle_json(&payload, der.as_bytes(), &hint);
    write_atomic(signature, bundle.as_bytes()).map_err(|e| match e {
        crate::manifest::ManifestError::Write { path, source } => SigningError::Write { path, source },
        other => {
            SigningError::Write { path: signature.to_path_buf(), source: std::io::Error::other(other.to_string()) }
        }
    })?;
    Ok(SignOutcome {
        signature: signature.to_path_buf(),
        model_name: name,
        root_digest: root_hex,
        key_hint: hint,
        ignore_paths,
        files,
    })
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

/// What kind of difference a [`SigProblem`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SigProblemKind {
    /// The bundle's key hint names another public key.
    KeyMismatch,
    /// The ECDSA signature does not verify (or is not a DER signature).
    BadSignature,
    /// The subject digest does not match the listed resources.
    RootDigest,
    /// A signed file's sha256 differs.
    FileHash,
    /// A signed file is not in the model.
    MissingFile,
    /// The model holds a file the signature does not list.
    ExtraFile,
    /// A symbolic link, a special file or a non-UTF-8 name in the model.
    NotRegularFile,
}

/// One reason the model does not match its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SigProblem {
    pub kind: SigProblemKind,
    /// The file concerned (model-relative), where there is one.
    pub file: Option<String>,
    /// A one-line description naming the file or the reason.
    pub message: String,
}

impl std::fmt::Display for SigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The result of [`verify`]: verified when `problems` is empty.
#[derive(Clone, Debug, Serialize)]
pub struct SigVerifyReport {
    pub signature: PathBuf,
    /// The subject name recorded in the signature (informative), once the signature verified.
    pub model_name: Option<String>,
    /// The subject digest recorded in the signature, once the signature verified.
    pub root_digest: Option<String>,
    /// Signed files re-hashed.
    pub files_checked: usize,
    pub problems: Vec<SigProblem>,
    /// Things that do not fail the check (e.g. a bundle without a key hint).
    pub warnings: Vec<String>,
}

impl SigVerifyReport {
    pub fn verified(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The parts of the bundle that are checked.
struct Envelope {
    hint: Option<String>,
    payload: Vec<u8>,
    payload_type: String,
    sig: Vec<u8>,
}

fn get_obj<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, String> {
    v.get(field).and_then(Value::as_object).ok_or_else(|| format!("no `{field}` object"))
}

fn get_str<'a>(v: &'a Value, field: &str) -> Result<&'a str, String> {
    v.get(field).and_then(Value::as_str).ok_or_else(|| format!("no `{field}` string"))
}

/// Parses a bundle as model_signing reads it for key-based verification.
fn parse_bundle(bytes: &[u8]) -> Result<Envelope, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let media = get_str(&v, "mediaType")?;
    if media != BUNDLE_MEDIA_TYPE {
        return Err(format!("media type {media:?}, expected {BUNDLE_MEDIA_TYPE:?}"));
    }
    let vm = Value::Object(get_obj(&v, "verificationMaterial")?.clone());
    let pk = vm.get("publicKey").ok_or_else(|| {
        if vm.get("certificate").is_some() || vm.get("x509CertificateChain").is_some() {
            "signed with a certificate (only key-based signatures are supported)".to_string()
        } else {
            "no `verificationMaterial.publicKey` (not a key-based signature)".to_string()
        }
    })?;
    let pk = pk.as_object().ok_or("`verificationMaterial.publicKey` is not an object")?;
    let hint = match pk.get("hint") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`publicKey.hint` is not a string".into()),
    };
    let env = Value::Object(
        get_obj(&v, "dsseEnvelope")
            .map_err(|e| {
                if v.get("messageSignature").is_some() {
                    "a message signature, not a DSSE envelope".to_string()
                } else {
                    e
                }
            })?
            .clone(),
    );
    let payload =
        b64_decode(get_str(&env, "payload")?).map_err(|e| format!("`dsseEnvelope.payload` is not base64: {e}"))?;
    let payload_type = get_str(&env, "payloadType")?.to_string();
    let sigs = env.get("signatures").and_then(Value::as_array).ok_or("no `dsseEnvelope.signatures` list")?;
    let first = sigs.first().ok_or("`dsseEnvelope.signatures` is empty")?;
    let sig = b64_decode(get_str(first, "sig")?).map_err(|e| format!("`signatures[0].sig` is not base64: {e}"))?;
    Ok(Envelope { hint, payload, payload_type, sig })
}

/// One resource of a signed statement.
struct SignedResource {
    name: String,
    /// `None` for an absolute name (it can never match a model file).
    key: Option<Key>,
    algorithm: String,
    digest: Vec<u8>,
}

/// The signed statement, checked for shape.
struct Statement {
    model_name: String,
    root: String,
    ignore_paths: Vec<String>,
    resources: Vec<SignedResource>,
}

/// Parses the (authenticated) payload as a model_signing v1.0 statement of the `files`/`sha256` kind.
fn parse_statement(payload: &[u8]) -> Result<Statement, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("signed payload is not JSON: {e}"))?;
    let t = get_str(&v, "_type")?;
    if t != STATEMENT_TYPE {
        return Err(format!("signed payload is not an in-toto {STATEMENT_TYPE} statement (`_type` {t:?})"));
    }
    let pt = get_str(&v, "predicateType")?;
    if pt == PREDICATE_TYPE_V01 {
        return Err(format!(
            "pre-1.0 model_signing signature ({pt}): not supported, re-sign with model_signing >= 1.0"
        ));
    }
    if pt != PREDICATE_TYPE {
        return Err(format!("predicate type {pt:?}, expected {PREDICATE_TYPE:?}"));
    }
    let subjects = v.get("subject").and_then(Value::as_array).ok_or("no `subject` list")?;
    if subjects.len() != 1 {
        return Err(format!("expected exactly one subject, got {}", subjects.len()));
    }
    let subject = subjects.first().ok_or("no subject")?;
    let model_name = get_str(subject, "name")?.to_string();
    let root = subject
        .get("digest")
        .and_then(|d| d.get("sha256"))
        .and_then(Value::as_str)
        .ok_or("no subject `digest.sha256`")?;
    let predicate = Value::Object(get_obj(&v, "predicate")?.clone());
    let ser = Value::Object(get_obj(&predicate, "serialization")?.clone());
    let method = get_str(&ser, "method")?;
    if method != "files" {
        return Err(format!(
            "serialization method {method:?}: sling checks \"files\" signatures only (the only kind `model_signing verify key` checks)"
        ));
    }
    let hash_type = get_str(&ser, "hash_type")?;
    if hash_type != "sha256" {
        return Err(format!("hash type {hash_type:?}: sling checks sha256 signatures only"));
    }
    if ser.get("allow_symlinks").is_none() {
        return Err("no `serialization.allow_symlinks`".into());
    }
    let ignore_paths = match ser.get("ignore_paths") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("`ignore_paths` holds a non-string")?,
        Some(_) => return Err("`ignore_paths` is not a list".into()),
    };
    let list = predicate.get("resources").and_then(Value::as_array).ok_or("no `predicate.resources` list")?;
    let mut resources = Vec::with_capacity(list.len());
    let mut seen = HashSet::new();
    for (i, r) in list.iter().enumerate() {
        let name = get_str(r, "name").map_err(|e| format!("resource {i}: {e}"))?.to_string();
        let algorithm = get_str(r, "algorithm").map_err(|e| format!("resource {name:?}: {e}"))?.to_string();
        let hexd = get_str(r, "digest").map_err(|e| format!("resource {name:?}: {e}"))?;
        let digest = unhex(hexd).ok_or_else(|| format!("resource {name:?}: digest {hexd:?} is not hex"))?;
        let key = rel_key(&name);
        if !seen.insert((key.is_none(), key.clone().unwrap_or_else(|| vec![name.clone()]))) {
            return Err(format!("resource {name:?} is listed twice"));
        }
        resources.push(SignedResource { name, key, algorithm, digest });
    }
    Ok(Statement { model_name, root: root.to_string(), ignore_paths, resources })
}

/// How a model-relative name is shown: the artifact's own name for a single-file artifact.
fn shown(name: &str, artifact: &Path) -> String {
    if name == "." {
        artifact.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| ".".into())
    } else {
        name.to_string()
    }
}

/// Checks `artifact` (a directory or a single file) against a model_signing key-based signature:
/// the bundle shape, the key hint, the ECDSA P-256 signature over the DSSE PAE of the payload, the
/// statement (v1.0, files/sha256, root digest consistent with the resources), and then every file:
/// sha256 of each signed file, no missing file, no extra file. Ignored: the git paths at the root, the
/// signature file when inside the model, and the statement's `ignore_paths`.
///
/// `Err` when the check cannot be made (unreadable or unsupported key, malformed bundle or statement);
/// otherwise the report, whose `problems` say why it failed.
pub fn verify(artifact: &Path, signature: &Path, public_key: &Path) -> Result<SigVerifyReport, SigningError> {
    let key = load_public_key(public_key)?;
    let bytes =
        std::fs::read(signature).map_err(|source| SigningError::Read { path: signature.to_path_buf(), source })?;
    let env = parse_bundle(&bytes).map_err(|reason| SigningError::Bundle { path: signature.to_path_buf(), reason })?;
    // The model must exist before anything is said about it.
    std::fs::symlink_metadata(artifact)
        .map_err(|source| SigningError::Read { path: artifact.to_path_buf(), source })?;
    let mut report = SigVerifyReport {
        signature: signature.to_path_buf(),
        model_name: None,
        root_digest: None,
        files_checked: 0,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    fn fail(
        mut r: SigVerifyReport,
        kind: SigProblemKind,
        file: Option<String>,
        message: String,
    ) -> Result<SigVerifyReport, SigningError> {
        r.problems.push(SigProblem { kind, file, message });
        Ok(r)
    }
    let hint = key_hint(&key);
    match &env.hint {
        Some(h) if *h != hint => {
            return fail(
                report,
                SigProblemKind::KeyMismatch,
                None,
                format!(
                    "key mismatch: the signature was made with another key (its key hint {h}, this public key's {hint})"
                ),
            )
        }
        Some(_) => {}
        None => report.warnings.push("the signature has no public key hint (older model_signing format)".into()),
    }
    let verifying = VerifyingKey::from(&key);
    let good = Signature::from_der(&env.sig).map(|s| verifying.verify(&pae(&env.payload), &s).is_ok());
    match good {
        Ok(true) => {}
        Ok(false) => {
            return fail(
                report,
                SigProblemKind::BadSignature,
                None,
                "bad signature: the ECDSA signature does not verify with this public key over the signed payload"
                    .into(),
            )
        }
        Err(_) => {
            return fail(
                report,
                SigProblemKind::BadSignature,
                None,
                "bad signature: `signatures[0].sig` is not a DER-encoded ECDSA P-256 signature".into(),
            )
        }
    }
    let statement_err = |reason: String| SigningError::Statement { path: signature.to_path_buf(), reason };
    if env.payload_type != PAYLOAD_TYPE {
        return Err(statement_err(format!("payload type {:?}, expected {PAYLOAD_TYPE:?}", env.payload_type)));
    }
    let st = parse_statement(&env.payload).map_err(statement_err)?;
    report.model_name = Some(st.model_name.clone());
    report.root_digest = Some(st.root.clone());
    let mut root = Sha256::new();
    for r in &st.resources {
        root.update(&r.digest);
    }
    let got_root = hex(&root.finalize());
    if got_root != st.root {
        return fail(
            report,
            SigProblemKind::RootDigest,
            None,
            format!("inconsistent signature: subject digest {} but the listed files hash to {got_root}", st.root),
        );
    }

    let mut ignore_paths: Vec<String> = GIT_PATHS.iter().map(|s| s.to_string()).collect();
    if let Some(rel) = signature_inside(artifact, signature) {
        ignore_paths.push(rel);
    }
    ignore_paths.extend(st.ignore_paths.iter().cloned());
    let w = walk(artifact, &Ignore::new(&ignore_paths))?;

    let local: HashMap<&Key, &Found> = w.files.iter().map(|f| (&f.key, f)).collect();
    let odd: HashSet<String> = w.odd.iter().map(|(n, _, _)| n.clone()).collect();
    let signed: HashSet<&Key> = st.resources.iter().filter_map(|r| r.key.as_ref()).collect();
    let mut problems = Vec::new();
    let mut to_hash = Vec::new();
    for r in &st.resources {
        match r.key.as_ref().and_then(|k| local.get(k)) {
            Some(f) => to_hash.push((r, *f)),
            None if r.key.as_ref().is_some_and(|k| odd.contains(&key_name(k))) => {}
            None => problems.push(SigProblem {
                kind: SigProblemKind::MissingFile,
                file: Some(r.name.clone()),
                message: format!("{}: missing (signed, not in the model)", shown(&r.name, artifact)),
            }),
        }
    }
    let hashed: Vec<Result<Option<SigProblem>, SigningError>> = to_hash
        .par_iter()
        .map(|(r, f)| {
            let d = sha256_file(&f.path)?;
            if r.algorithm == "sha256" && r.digest == d {
                return Ok(None);
            }
            let name = shown(&r.name, artifact);
            let message = if r.algorithm != "sha256" {
                format!("{name}: signed with algorithm {:?}, the file's sha256 is {}", r.algorithm, hex(&d))
            } else {
                format!("{name}: sha256 {} differs from the signed {}", hex(&d), hex(&r.digest))
            };
            Ok(Some(SigProblem { kind: SigProblemKind::FileHash, file: Some(r.name.clone()), message }))
        })
        .collect();
    for h in hashed {
        if let Some(p) = h? {
            problems.push(p);
        }
    }
    report.files_checked = to_hash.len();
    let mut extra: Vec<&Found> = w.files.iter().filter(|f| !signed.contains(&f.key)).collect();
    sort_by_key(&mut extra, |f| &f.key);
    for f in extra {
        let name = key_name(&f.key);
        problems.push(SigProblem {
            kind: SigProblemKind::ExtraFile,
            message: format!("{}: extra file (in the model, not signed)", shown(&name, artifact)),
            file: Some(name),
        });
    }
    let mut odd_list = w.odd.clone();
    odd_list.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, _, why) in odd_list {
        problems.push(SigProblem {
            kind: SigProblemKind::NotRegularFile,
            message: format!("{}: {}", shown(&name, artifact), why.reason()),
            file: Some(name),
        });
    }
    // Stable order: by file name, then kind.
    problems.sort_by(|a, b| a.file.cmp(&b.file));
    report.problems = problems;
    Ok(report)
}

#[cfg(test)]
mod tests;
