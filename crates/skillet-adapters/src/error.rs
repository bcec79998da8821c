//! Errors of adapter configuration, application and files.

use std::path::PathBuf;

/// Everything that can go wrong with an adapter.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// Invalid LoRA settings.
    #[error("LoRA settings: {0}")]
    Settings(String),
    /// The targets matched no module of the model.
    #[error(
        "target_modules {targets} matched no linear layer of the model (its layers are named like {example})"
    )]
    NoTargets {
        /// The targets as given.
        targets: String,
        /// One module name of the model.
        example: String,
    },
    /// An adapter file is unreadable or inconsistent with the model.
    #[error("{path}: {message}")]
    File {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] skillet_models::ModelError),
    /// An error inside the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
