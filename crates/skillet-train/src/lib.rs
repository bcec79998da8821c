//! Training: padded or packed batches, the causal-LM loss over labelled
//! tokens, AdamW with PyTorch's semantics, learning-rate schedules and
//! gradient clipping.
#![warn(missing_docs)]

mod batch;
mod checkpoint;
mod collate;
mod config;
mod error;
mod eval;
mod loss;
mod optim;
mod schedule;
mod trainer;

pub use batch::{IGNORE, TrainBatch};
pub use checkpoint::{
    TrainState, checkpoint_dir, latest_checkpoint, load_checkpoint_state, save_checkpoint,
};
pub use collate::{collate, collate_packed};
pub use config::{DataConfig, EvalConfig, LoraConfig, PrecisionSetting, RunConfig, TrainConfig};
pub use error::TrainError;
pub use eval::{EvalStats, evaluate};
pub use loss::{LossParts, backward, causal_lm_loss, causal_lm_loss_value, causal_lm_loss_with};
pub use optim::{AdamW, AdamWConfig, clip_grad_norm, collect_grads, grad_norm};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{Event, LoopSettings, Trainer, epoch_batches, read_metrics, steps_per_epoch};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
