//! What every front end of Skillet shares (the command line, the server,
//! a jobs worker): opening a model with its tokenizer, chat template and
//! adapters; rendering chat prompts; checking sampling options; loading
//! data sets; running a training run; scoring with a reward model; writing Hugging Face folders. The
//! binaries only parse arguments and print.
#![warn(missing_docs)]

mod adapters;
mod bundle;
mod dataset;
mod error;
mod export;
mod export_gguf;
mod pairs;
mod random_model;
mod reward;
mod rewards;
mod rl;
mod sampling;
mod train;

pub use adapters::{AdapterSpec, load_adapters};
pub use bundle::Bundle;
pub use dataset::Dataset;
pub use error::{Result, RuntimeError};
pub use export::{Merged, is_quantized, merged_weights, write_hf_folder};
pub use export_gguf::{tokenizer_metadata, write_gguf_adapter, write_gguf_model};
pub use pairs::{PairData, ReferenceLogps};
pub use random_model::write_random_model;
pub use reward::{PairReward, PairScores, RewardModel, RewardStats, score_pairs, scored_tokens};
pub use rewards::{RewardFn, ToScore};
pub use rl::{PromptSet, PromptSource, quantized_sampler};
pub use sampling::SamplingOptions;
pub use train::{TrainOutcome, TrainProgress, TrainSummary, run_training};
