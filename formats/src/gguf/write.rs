//! Placeholder: streaming GGUF writer.
pub struct GgufWriter;
pub struct TensorDesc;
pub enum SplitPolicy { None }
