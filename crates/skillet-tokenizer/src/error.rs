//! Errors of tokenizer and chat-template loading and use.

use std::path::PathBuf;

/// Everything that can go wrong building or using a tokenizer or template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A tokenizer or config file is malformed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// GGUF metadata is missing or unusable for a tokenizer.
    #[error(transparent)]
    Gguf(#[from] skillet_gguf::GgufError),
    /// The model has no tokenizer we can build.
    #[error("{path}: {message}")]
    Unsupported {
        /// The file concerned.
        path: PathBuf,
        /// What is unsupported.
        message: String,
    },
    /// Encoding or decoding failed inside the tokenizers library.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// The model has no chat template.
    #[error("{path}: the model has no chat template")]
    NoChatTemplate {
        /// The model path.
        path: PathBuf,
    },
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
}
