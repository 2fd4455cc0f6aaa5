//! `config.json` of a Hugging Face checkpoint, read the way the reference converter reads it
//! (`conversion/base.py TextModel.__init__`, `find_hparam`): `text_config` merged into the root,
//! and the rope parameters normalised from either spelling — transformers 4 (`rope_theta`,
//! `rope_scaling`) or transformers 5 (`rope_parameters`).

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json is not a JSON object")]
    NotAnObject,
    #[error("config.json has no \"architectures\" entry")]
    NoArchitecture,
    #[error("config.json: missing required key {0}")]
    Missing(String),
    #[error("config.json: key {key} has an unexpected value {value}")]
    BadValue { key: String, value: String },
}

/// Parsed `config.json`.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    root: Map<String, Value>,
    rope: Map<String, Value>,
}

impl ModelConfig {
    pub fn from_value(v: Value) -> Result<ModelConfig, ConfigError> {
        let Value::Object(mut root) = v else { return Err(ConfigError::NotAnObject) };
        if let Some(Value::Object(text)) = root.get("text_config").cloned() {
            for (k, v) in text {
                root.insert(k, v);
            }
        }
        let mut rope = match root.get("rope_parameters").or_else(|| root.get("rope_scaling")) {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        if !rope.contains_key("full_attention") && !rope.contains_key("sliding_attention") {
            let theta =
                ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"]
                    .iter()
                    .find_map(|k| root.get(*k).filter(|v| !v.is_null()).cloned());
            if let (false, Some(t)) = (rope.contains_key("rope_theta"), theta) {
                rope.insert("rope_theta".into(), t);
            }
            if !rope.contains_key("rope_type") {
                if let Some(t) = rope.get("type").cloned() {
                    rope.insert("rope_type".into(), t);
                }
            }
            if !rope.contains_key("original_max_position_embeddings") {
                if let Some(v) = root.get("original_max_position_embeddings").cloned() {
                    rope.insert("original_max_position_embeddings".into(), v);
                }
            }
        }
        let cfg = ModelConfig { root, rope };
        cfg.check_dimensions()?;
        Ok(cfg)
    }

    /// The model's dimensions, where present, are whole numbers in a sane range, and agree with each other: a
    /// hostile or broken `config.json` (zero heads, a negative or gigantic width, more experts per token than
    /// experts) is an input error here, before any plan divides by it or allocates from it. Keys absent or `null`
    /// are left to the architecture's own rules.
    fn check_dimensions(&self) -> Result<(), ConfigError> {
        /// Larger than any released model's dimension (vocabularies reach ~260k, widths ~30k, experts 384).
        const MAX: u64 = 1 << 24;
        let bad =
            |key: &str, v: &Value, why: &str| ConfigError::BadValue { key: key.into(), value: format!("{v} ({why})") };
        let dim = |key: &str, min: u64| -> Result<Option<u64>, ConfigError> {
            match self.root.get(key).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if (min..=MAX).contains(&n) => Ok(Some(n)),
                    _ => Err(bad(key, v, &format!("must be a whole number from {min} to {MAX}"))),
                },
            }
        };
        for key in ["hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "head_dim"] {
            dim(key, 1)?;
        }
        let heads = dim("num_attention_heads", 1)?;
        let kv = dim("num_key_value_heads", 1)?;
        if let (Some(h), Some(k)) = (heads, kv) {
            if h % k != 0 {
                let v = &self.root["num_key_value_heads"];
                return Err(bad("num_key_value_heads", v, &format!("must divide num_attention_heads = {h}")));
            }
        }
        // Dense configs may carry 0 experts; an MoE routes each token to 1..=experts of them.
        let mut experts = None;
        for key in ["num_local_experts", "num_experts", "n_routed_experts"] {
            experts = experts.or(dim(key, 0)?);
        }
        for key in ["num_experts_per_tok", "num_experts_per_token"] {
            let Some(k) = dim(key, 0)? else { continue };
            if let Some(e) = experts.filter(|&e| e > 0) {
                if k == 0 || k > e {
                    return Err(bad(key, &self.root[key], &format!("must be from 1 to the {e} experts")));
                }
            }
        }
        Ok(())
    }

    pub fn from_slice(bytes: &[u8]) -> Result<ModelConfig, serde_json::Error> {
        let v: Value = serde_json::from_slice(bytes)?;
        ModelConfig::from_value(v).map_err(serde::de::Error::custom)
    }

    /// The first entry of `architectures`.
    pub fn architecture(&self) -> Result<&str, ConfigError> {
        self.root
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or(ConfigError::NoArchitecture)
    }

    /// The raw value of `key`, if present and not null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.root.get(key).filter(|v| !v.is_null())
    }

    /// The value of the first of `keys` present, unless it is null — exactly `find_hparam`, which
    /// stops at the first key present even when its value is null.
    pub fn find(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find(|k| self.root.contains_key(**k)).and_then(|k| self.get(k))
    }

    pub fn find_u64(&self, keys: &[&str]) -> Result<Option<u64>, ConfigError> {
        match self.find(keys) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| ConfigError::BadValue { key: keys.join("|"), value: v.to_string() })
            }
        }
    }

    /// Like [`find_u64`](Self::find_u64) but required.
    pub fn req_u64(&self, keys: &[&str]) -> Result<u64, ConfigError> {
        self.find_u64(keys)?.ok_or_else(|| ConfigError::Missing(keys.join("|")))
    }

    pub fn find_f64(&self, keys: &[&str]) -> Result<Option<f64>, ConfigError> {
        match self.find(keys) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| ConfigError::BadValue { key: keys.join("|"), value: v.to_string() })
            }
        }
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    /// Normalised rope parameters (`rope_parameters` or `rope_scaling`, with `rope_theta`,
    /// `rope_type` and `original_max_position_embeddings` mirrored in, as `TextModel.__init__`).
    pub fn rope(&self) -> &Map<String, Value> {
        &self.rope
    }

    /// The root object (after `text_config` merging).
    pub fn root(&self) -> &Map<String, Value> {
        &self.root
    }

    /// Overrides a key (the converter does this, e.g. DeepSeek's `num_key_value_heads = 1`).
    pub fn set(&mut self, key: &str, v: Value) {
        self.root.insert(key.to_string(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_both_rope_spellings() {
        let t4 = ModelConfig::from_value(json!({"architectures": ["X"], "rope_theta": 5e5,
            "rope_scaling": {"type": "yarn", "factor": 4.0}}))
        .unwrap();
        assert_eq!(t4.rope()["rope_theta"], json!(5e5));
        assert_eq!(t4.rope()["rope_type"], json!("yarn"));
        let t5 = ModelConfig::from_value(json!({"architectures": ["X"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "head_dim": null}))
        .unwrap();
        assert_eq!(t5.rope()["rope_theta"], json!(1e6));
        assert!(t5.get("head_dim").is_none());
        assert_eq!(t5.architecture().unwrap(), "X");
    }

    #[test]
    fn find_takes_the_first_present_key() {
        let c = ModelConfig::from_value(json!({"num_experts": 8, "num_local_experts": null})).unwrap();
        assert_eq!(c.find_u64(&["num_experts", "num_local_experts"]).unwrap(), Some(8));
        assert_eq!(c.find_u64(&["num_local_experts", "num_experts"]).unwrap(), None);
        assert!(c.architecture().is_err());
        assert!(c.req_u64(&["nope"]).is_err());
        assert!(ModelConfig::from_value(json!([1])).is_err());
    }
}
