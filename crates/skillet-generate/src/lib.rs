//! Autoregressive generation: sampling (greedy, temperature, top-k, top-p,
//! repetition penalty, seeded) and a KV-cached decode loop that streams
//! text and stops on EOS, stop strings or a token budget.
#![warn(missing_docs)]

mod generate;
mod sampler;

pub use generate::{FinishReason, GenerateError, GenerateOptions, Generation, generate};
pub use sampler::{Sampler, SamplingParams, argmax};
pub use skillet_models::Rng;
