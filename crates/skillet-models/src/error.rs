//! Errors raised while loading or running a model.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Everything that can go wrong loading or running a model. Each variant
/// carries the facts a user needs to fix it: file, tensor, shapes.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The path is neither a `.gguf` file nor a folder with `config.json`.
    #[error("{path}: not a model: expected a .gguf file or a Hugging Face folder with config.json")]
    NotAModel {
        /// The path given.
        path: PathBuf,
    },
    /// The GGUF container is broken.
    #[error(transparent)]
    Gguf(#[from] skillet_gguf::GgufError),
    /// A config file is malformed or inconsistent.
    #[error("{path}: {message}")]
    Config {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The architecture is not one Skillet implements.
    #[error("{path}: unsupported architecture '{architecture}' (supported: {supported})")]
    UnknownArchitecture {
        /// The file concerned.
        path: PathBuf,
        /// The architecture named in the file.
        architecture: String,
        /// The supported ones, comma separated.
        supported: &'static str,
    },
    /// A tensor the architecture needs is absent.
    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor {
        /// The file that should hold it.
        path: PathBuf,
        /// The tensor's name in that file.
        tensor: String,
    },
    /// A tensor has a different shape than the config implies.
    #[error("{path}: tensor '{tensor}' has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor's name in that file.
        tensor: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found.
        actual: Vec<usize>,
    },
    /// A tensor's storage type cannot be used.
    #[error("{path}: tensor '{tensor}': {message}")]
    BadTensor {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor's name in that file.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// Invalid arguments to a model call (shapes, lengths).
    #[error("invalid input: {0}")]
    Input(String),
    /// An error inside the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
