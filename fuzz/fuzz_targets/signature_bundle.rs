//! A model-signing signature bundle (`model.sig`, a Sigstore bundle v0.3 with a DSSE envelope): `signing::verify`
//! of a small artifact against a fixed public key. Whatever the bundle holds (mangled JSON, base64, payload,
//! statement, digests, paths), verification must answer — verified, problems, or an error — never panic or
//! allocate without bound; and a bundle that verifies must describe exactly the artifact's files (a forged or
//! edited statement can only verify if it still lists the right sha256 for every file). The input is the bundle
//! itself, or edits of a genuine one (`common::edit`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sling_provenance::signing;

#[path = "common.rs"]
mod common;

/// A throwaway P-256 key pair made for this target (openssl ecparam -name prime256v1), never used elsewhere.
const PRIVATE: &[u8] = b"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgITb5jeN2l3tcZLdM
/uo7ELwmbT6Q72cMXHjcaLgA0X2hRANCAARmwoacRoiNxdbh9LjdZRocmB4SL35V
kzdH755eo9tQrSm/HbUIyjVizbCxSCb2sjz5qfEo5xgpS38bcnTrXZWj
-----END PRIVATE KEY-----
";
const PUBLIC: &[u8] = b"-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEZsKGnEaIjcXW4fS43WUaHJgeEi9+
VZM3R++eXqPbUK0pvx21CMo1Ys2wsUgm9rI8+anxKOcYKUt/G3J0612Vow==
-----END PUBLIC KEY-----
";

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("signature_bundle");
    let art = d.join("art");
    let public = d.join("k.pub");
    if !art.exists() {
        std::fs::create_dir_all(art.join("sub")).unwrap();
        common::put(&art, "model.gguf", b"GGUF\x03\x00\x00\x00weights");
        common::put(&art.join("sub"), "notes.txt", b"hello\n");
        common::put(&d, "k.pem", PRIVATE);
        std::fs::write(&public, PUBLIC).unwrap();
        signing::sign(&art, &d.join("k.pem"), &d.join("valid.sig")).expect("signing the fixed artifact");
    }
    let valid = std::fs::read(d.join("valid.sig")).unwrap();
    let sig = common::put(&d, "model.sig", &common::edit(&valid, data));
    if let Ok(report) = signing::verify(&art, &sig, &public) {
        if report.verified() {
            // Only the genuine statement verifies: the signature covers the payload, so an accepted bundle's
            // statement is the one `sign` wrote for these files.
            let genuine = signing::verify(&art, &d.join("valid.sig"), &public).expect("the valid bundle");
            assert!(genuine.verified());
        }
    }
});
