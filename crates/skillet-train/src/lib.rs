//! Training: padded or packed batches, the causal-LM loss over labelled
//! tokens, AdamW with PyTorch's semantics, learning-rate schedules and
//! gradient clipping.
#![warn(missing_docs)]

mod batch;
mod error;
mod loss;
mod optim;
mod schedule;

pub use batch::{IGNORE, TrainBatch};
pub use error::TrainError;
pub use loss::{LossParts, causal_lm_loss};
pub use optim::{AdamW, AdamWConfig, clip_grad_norm, grad_norm};
pub use schedule::{Schedule, ScheduleKind};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
