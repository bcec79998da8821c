//! LoRA adapters (Hu et al. 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski
//! 2023, arXiv 2312.03732; DoRA: Liu et al. 2024, arXiv 2402.09353) following Hugging Face PEFT's `LoraLayer`:
//! layers that wrap any base [`skillet_models::Linear`], selection of target
//! modules, the PEFT on-disk format both ways, merging into the base, and
//! reward models (LoRA plus a scalar `score` head).
#![warn(missing_docs)]

mod combine;
mod config;
mod error;
mod linalg;
mod lora;
mod peft;
mod reward;
mod stack;

pub use combine::{Combine, combine};
pub use config::{LoraSettings, PeftAdapterConfig, Targets};
pub use error::AdapterError;
pub use lora::{LoraAdapter, LoraParams, Magnitudes, merged_weight};
pub use peft::{
    PeftFile, load_peft, peft_tensor_name, read_lora_peft, read_peft, save_peft, write_peft,
    write_peft_file,
};
pub use reward::{RewardAdapter, SCORE_WEIGHT, fresh_score_head};
pub use stack::Stacked;

/// LoRA weights by module name: `(A [r, in], B [out, r])`.
pub type LoraWeights =
    std::collections::HashMap<String, (candle_core::Tensor, candle_core::Tensor)>;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, AdapterError>;
