//! placeholder
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {}
pub struct ModelConfig;
