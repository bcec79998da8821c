//! Errors of training.

/// Everything that can go wrong while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Invalid configuration or input.
    #[error("{0}")]
    Invalid(String),
    /// The loss or a gradient is not finite.
    #[error("{0}")]
    NonFinite(String),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] skillet_models::ModelError),
    /// The adapter failed.
    #[error(transparent)]
    Adapter(#[from] skillet_adapters::AdapterError),
    /// An error inside the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
