//! Tokenizers (built from `tokenizer.json` or from GGUF metadata) and chat
//! templates (rendered with minijinja the way transformers renders them).
//! One [`Tokenizer`] and one [`ChatTemplate`] serve training and serving.
#![warn(missing_docs)]

mod error;
mod gguf;
mod gguf_out;
mod hf;
mod spm;
mod strftime;
mod template;
mod tokenizer;

pub use error::TokenizerError;
pub use gguf::gguf_tokenizer_json;
pub use gguf_out::gguf_tokenizer_metadata;
pub use hf::GenerationConfig;
pub use template::{ChatTemplate, GEMMA_TEMPLATE, Message};
pub use tokenizer::{Offsets, SpecialToken, SpecialTokens, Tokenizer};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TokenizerError>;
