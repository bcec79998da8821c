//! Errors of the runtime: each crate's own, plus files and requests.

use std::path::PathBuf;

/// Everything a front end can be told went wrong.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A request or setting is invalid (the message says which and why).
    #[error("{0}")]
    Invalid(String),
    /// One named parameter of a request is invalid.
    #[error("{param}: {message}")]
    Param {
        /// The parameter (OpenAI's name).
        param: String,
        /// What is wrong with it.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Model loading or compute.
    #[error(transparent)]
    Model(#[from] skillet_models::ModelError),
    /// Tokenizer or chat template.
    #[error(transparent)]
    Tokenizer(#[from] skillet_tokenizer::TokenizerError),
    /// An adapter.
    #[error(transparent)]
    Adapter(#[from] skillet_adapters::AdapterError),
    /// Training data.
    #[error(transparent)]
    Data(#[from] skillet_data::DataError),
    /// Training.
    #[error(transparent)]
    Train(#[from] skillet_train::TrainError),
    /// Evaluation.
    #[error(transparent)]
    Eval(#[from] skillet_eval::EvalError),
    /// Generation.
    #[error(transparent)]
    Generate(#[from] skillet_generate::GenerateError),
    /// Tensor failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// JSON (de)serialization of a file Skillet wrote.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl RuntimeError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, RuntimeError>;
