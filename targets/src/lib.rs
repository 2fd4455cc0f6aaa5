//! Output targets as plug-ins of the pipeline (`sling_pipeline::Target`): vLLM/SGLang (compressed-tensors) and
//! MLX. Each plans the artifact's weights from the checkpoint, encodes row chunks of them, and makes its own
//! files (`config.json`); the pipeline does the rest. The targets never depend on each other.

use sling_pipeline::PlanError;

pub mod mlx;
pub mod read;
pub mod recipe;
pub mod vllm;

/// A target named with `--to` (other than `gguf:…`, which `sling_target_gguf::quantize` handles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum To {
    Vllm(vllm::Scheme),
    Mlx(mlx::Bits),
    /// `mlx:auto`: bits and group sizes chosen per weight under a size budget ([`mlx::auto`]).
    MlxAuto,
    /// `vllm:auto`: integer widths and group sizes chosen per vLLM layer under a size budget ([`vllm::auto`]).
    VllmAuto,
}

/// The targets `--to` takes, for messages.
pub const TARGETS: &str = "gguf:PRESET, vllm:SCHEME (w4a16, w4a16-asym, w8a16, fp8-dynamic, fp8-block, nvfp4, mxfp4), vllm:auto, mlx:BITS (2, 3, 4, 5, 6, 8), mlx:auto";

impl To {
    /// Parses `vllm:SCHEME` or `mlx:BITS`; `Ok(None)` for `gguf:…`.
    pub fn parse(s: &str) -> Result<Option<To>, TargetError> {
        let unknown = || TargetError::UnknownTarget(s.to_string());
        let (kind, rest) = s.split_once(':').ok_or_else(unknown)?;
        match kind.to_ascii_lowercase().as_str() {
            "gguf" => Ok(None),
            "vllm" if rest.eq_ignore_ascii_case("auto") => Ok(Some(To::VllmAuto)),
            "vllm" => vllm::Scheme::parse(rest).map(|x| Some(To::Vllm(x))).ok_or_else(|| TargetError::UnknownScheme {
                target: "vllm".into(),
                scheme: rest.into(),
                known: format!("{}, auto", vllm::SCHEMES.join(", ")),
            }),
            "mlx" if rest.eq_ignore_ascii_case("auto") => Ok(Some(To::MlxAuto)),
            "mlx" => mlx::Bits::parse(rest).map(|x| Some(To::Mlx(x))).ok_or_else(|| TargetError::UnknownScheme {
                target: "mlx".into(),
                scheme: rest.into(),
                known: "2, 3, 4, 5, 6, 8, auto".into(),
            }),
            _ => Err(unknown()),
        }
    }

    /// `vllm:w4a16`, `mlx:4`.
    pub fn label(&self) -> String {
        match self {
            To::Vllm(s) => format!("vllm:{}", s.name()),
            To::Mlx(b) => format!("mlx:{}", b.0),
            To::MlxAuto => "mlx:auto".into(),
            To::VllmAuto => "vllm:auto".into(),
        }
    }
}

/// Why a target cannot plan an artifact.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown target {0:?}; sling writes {TARGETS}")]
    UnknownTarget(String),
    #[error("unknown {target} scheme {scheme:?}; {target} schemes: {known}")]
    UnknownScheme { target: String, scheme: String, known: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{tensor}: {why} (--strict)")]
    Strict { tensor: String, why: String },
    #[error("{scheme}: nothing to quantize: {why}")]
    NothingToQuantize { scheme: String, why: String },
    #[error("{0}")]
    Unsupported(String),
    /// The runtime this target writes for does not run the architecture in any format the target writes.
    #[error("{runtime} does not run {model} checkpoints in {format}: {why}")]
    NotServed { runtime: &'static str, model: &'static str, format: &'static str, why: &'static str },
}

/// A weight a size-targeted allocation could not read to measure.
pub(crate) fn read_error<E>(w: &sling_pipeline::Weight<E>, e: impl std::fmt::Display) -> TargetError {
    TargetError::Unsupported(format!("{}: cannot read the weight to measure it: {e}", w.name))
}

/// JSON as Python's `json.dump(…, indent=N)` writes it (`ensure_ascii`, `repr` floats): keys sorted at every
/// level (`sort_all`: compressed-tensors' `sort_keys=True`) or only at the top (mlx-lm's `save_config`).
pub fn json_sorted(v: &serde_json::Value, indent: usize, sort_all: bool) -> String {
    use sling_formats::pyjson::{dumps, SortKeys};
    dumps(v, indent, if sort_all { SortKeys::All } else { SortKeys::Top })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_targets() {
        assert_eq!(To::parse("gguf:Q4_K_M").unwrap(), None);
        assert_eq!(To::parse("vllm:w4a16").unwrap(), Some(To::Vllm(vllm::Scheme::W4A16 { symmetric: true })));
        assert_eq!(To::parse("mlx:4").unwrap(), Some(To::Mlx(mlx::Bits(4))));
        assert_eq!(To::parse("mlx:auto").unwrap(), Some(To::MlxAuto));
        assert_eq!(To::parse("vllm:auto").unwrap(), Some(To::VllmAuto));
        assert!(matches!(To::parse("onnx:int8"), Err(TargetError::UnknownTarget(_))));
        assert!(matches!(To::parse("vllm:w3a16"), Err(TargetError::UnknownScheme { .. })));
        assert!(matches!(To::parse("mlx:7"), Err(TargetError::UnknownScheme { .. })));
        assert!(matches!(To::parse("Q4_K_M"), Err(TargetError::UnknownTarget(_))));
    }

    #[test]
    fn json_like_python() {
        let v = serde_json::json!({"b": {"z": 1, "a": [1, {"y": 2, "x": "é"}]}, "a": {}, "c": []});
        assert_eq!(
            json_sorted(&v, 2, true),
            "{\n  \"a\": {},\n  \"b\": {\n    \"a\": [\n      1,\n      {\n        \"x\": \"\\u00e9\",\n        \"y\": 2\n      }\n    ],\n    \"z\": 1\n  },\n  \"c\": []\n}"
        );
        let top = json_sorted(&serde_json::json!({"b": {"z": 1, "a": 2}, "a": 1e-6}), 4, false);
        assert_eq!(top, "{\n    \"a\": 1e-06,\n    \"b\": {\n        \"z\": 1,\n        \"a\": 2\n    }\n}");
    }
}
