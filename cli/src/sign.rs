//! `sling sign`: an OpenSSF model-signing signature (key-based, ECDSA P-256) over an artifact.

use std::path::PathBuf;

use anyhow::{Context, Result};
use sling_provenance::signing::{sign, DEFAULT_SIGNATURE};

pub const AFTER_HELP: &str = "Examples (they run as written from the repository root, on its fixtures):
  openssl ecparam -name prime256v1 -genkey -noout -out key.pem
  openssl ec -in key.pem -pubout -out pub.pem
  sling quantize fixtures/models/qwen3moe --to mlx:4 -o out
  sling sign out/ --key key.pem                          # writes model.sig here, like model_signing
  sling sign out/ --key key.pem --signature out.sig --json
  sling convert fixtures/models/qwen3moe --to gguf --type q8_0 --tokenizer-pre gpt-2 -o qwen3-q8_0.gguf
  sling sign qwen3-q8_0.gguf --key key.pem --signature qwen3-q8_0.sig

Check it with `sling verify --signature model.sig --public-key pub.pem out/`, or with model_signing (PyPI \
model-signing 1.x): `model_signing verify key out/ --signature model.sig --public_key pub.pem`. \
`sling verify --signature` also checks signatures made by `model_signing sign key`.

The signature is the one `model_signing sign key --private_key key.pem ARTIFACT` writes: a Sigstore bundle v0.3 \
holding a DSSE envelope of an in-toto statement that lists the sha256 of every file (sorted by path) and a root \
digest over them, signed with ECDSA P-256/SHA-256 (deterministic, RFC 6979); the verification material is the \
public key's sha256 hint (no certificate, no transparency log). Signed: every regular file under ARTIFACT, hidden \
files included, except .git, .gitattributes, .github and .gitignore at its root and the signature file itself when \
it is written inside ARTIFACT. Symbolic links and special files are refused. A single file is signed as one \
resource named \".\", as model_signing does. Keys: unencrypted PEM, PKCS#8 or SEC1 (\"EC PRIVATE KEY\"). \
Format: docs/signing.md.

Exit codes: 0 signed; 2 could not sign (unreadable or unsupported key, symlink in the artifact, unwritable \
signature path).";

#[derive(clap::Args)]
pub struct Args {
    /// The artifact: a model directory (e.g. the output directory of `sling convert`) or a single
    /// file (e.g. model.gguf).
    artifact: PathBuf,
    /// ECDSA P-256 private key, PEM (PKCS#8 "PRIVATE KEY" or SEC1 "EC PRIVATE KEY"), unencrypted.
    #[arg(long, visible_alias = "private-key", value_name = "KEY.pem")]
    key: PathBuf,
    /// Where to write the signature. The default is model_signing's: model.sig in the current
    /// directory (ignored when it lies inside the artifact).
    #[arg(long, value_name = "OUT.sig", default_value = DEFAULT_SIGNATURE)]
    signature: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    let out =
        sign(&a.artifact, &a.key, &a.signature).with_context(|| format!("cannot sign {}", a.artifact.display()))?;
    if a.json {
        let v = serde_json::json!({
            "status": "signed",
            "artifact": a.artifact,
            "signature": out.signature,
            "model_name": out.model_name,
            "root_digest": out.root_digest,
            "key_hint": out.key_hint,
            "ignore_paths": out.ignore_paths,
            "files": out.files,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !quiet {
        eprintln!(
            "signed {} ({} file{}, root sha256 {}): wrote {}",
            a.artifact.display(),
            out.files.len(),
            if out.files.len() == 1 { "" } else { "s" },
            out.root_digest,
            out.signature.display()
        );
    }
    Ok(())
}
