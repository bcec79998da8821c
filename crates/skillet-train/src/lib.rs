//! Training: one loop and one `step()` for every objective (SFT's
//! causal-LM loss over labelled tokens, DPO's preference loss, a reward
//! model's Bradley–Terry loss, GRPO's clipped policy gradient), padded or
//! packed batches, AdamW with PyTorch's semantics, learning-rate schedules
//! and gradient clipping.
#![warn(missing_docs)]

mod batch;
mod checkpoint;
mod collate;
mod config;
mod dpo;
mod error;
mod eval;
mod freeze;
mod grpo;
mod logps;
mod loss;
mod objective;
mod optim;
mod reward;
mod schedule;
mod sft;
mod trainable;
mod trainer;

pub use batch::{IGNORE, TrainBatch};
pub use checkpoint::{
    TrainState, checkpoint_dir, latest_checkpoint, load_checkpoint_state, save_checkpoint,
};
pub use collate::{collate, collate_packed};
pub use config::{
    DataConfig, DpoConfig, EvalConfig, GrpoConfig, LoraConfig, MethodConfig, PrecisionSetting,
    QuantizeBase, RewardConfig, RewardSpec, RunConfig, SamplingActivations, TrainConfig, Tuning,
};
pub use dpo::{
    Dpo, DpoLoss, DpoSettings, PairBatch, PairSet, RefLogps, dpo_pair_loss, pair_batch, pair_logps,
};
pub use error::TrainError;
pub use eval::{EvalStats, evaluate};
pub use freeze::Freeze;
pub use grpo::{
    Grpo, GrpoBatch, GrpoLoss, GrpoSettings, RolloutBatch, RolloutSource, Sampled, ScaleRewards,
    advantages, grpo_loss, grpo_token_loss, rollout_rows, shared_prompt_rows,
};
pub use logps::{sequence_logps, token_logps};
pub use loss::{LossParts, backward, causal_lm_loss, causal_lm_loss_value, causal_lm_loss_with};
pub use objective::{Metrics, MicroLoss, Objective};
pub use optim::{AdamW, AdamWConfig, clip_grad_norm, collect_grads, grad_norm};
pub use reward::{Reward, RewardSettings, reward_pair_loss, score_sequences, sequence_rewards};
pub use schedule::{Schedule, ScheduleKind};
pub use sft::Sft;
pub use trainable::{FullWeights, Trainable};
pub use trainer::{
    Event, LoopSettings, StepStats, Trainer, epoch_batches, epoch_order, read_metrics,
    steps_per_epoch,
};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
