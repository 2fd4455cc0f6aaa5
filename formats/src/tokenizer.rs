//! Tokenizer metadata for GGUF (owned by the tokenizer work; placeholder).
