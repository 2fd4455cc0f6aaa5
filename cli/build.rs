//! Embeds the git commit sling is built from as `SLING_GIT_COMMIT` (recorded in provenance
//! manifests): `$SLING_GIT_COMMIT` if set (for builds from a tarball of a known commit), else
//! `git rev-parse HEAD`, else `"unknown"` (no git, or not a checkout).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=SLING_GIT_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()));
    let from_env = std::env::var("SLING_GIT_COMMIT").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let commit = from_env.or_else(|| {
        let head =
            git(&dir, &["rev-parse", "HEAD"]).filter(|s| s.len() >= 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))?;
        // Rebuild when HEAD moves (checkout, commit): watch HEAD, the refs and packed-refs of both
        // the worktree's git dir and the common one. Only existing paths, so that a missing one does
        // not rerun this script on every build.
        for gd in [git(&dir, &["rev-parse", "--absolute-git-dir"]), git(&dir, &["rev-parse", "--git-common-dir"])]
            .into_iter()
            .flatten()
        {
            let gd = if Path::new(&gd).is_absolute() { PathBuf::from(gd) } else { dir.join(gd) };
            for p in [gd.join("HEAD"), gd.join("packed-refs"), gd.join("refs").join("heads")] {
                if p.exists() {
                    println!("cargo:rerun-if-changed={}", p.display());
                }
            }
        }
        Some(head)
    });
    println!("cargo:rustc-env=SLING_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".to_string()));
}
