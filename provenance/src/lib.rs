//! Provenance of an artifact, whatever its target: the manifest (`OUT.sling.json`, `DIR/sling.json`) and its
//! verification, the model card (`README.md`), and OpenSSF model-signing signatures.
//!
//! Re-deriving an artifact's tensors from its source is the target's business: [`manifest::verify_with`] takes
//! it as a [`manifest::Rederiver`] the caller supplies (the CLI passes GGUF's and vLLM/MLX's), so this crate
//! never depends on a target.

pub mod card;
pub mod manifest;
pub mod signing;
