//! Autoregressive generation: sampling (greedy, temperature, top-k, top-p,
//! repetition, frequency and presence penalties, seeded), incremental
//! detokenization with stop strings, and a continuous-batching engine over
//! a slotted KV cache that decodes many sequences, each with its own
//! adapter, in one forward call.
#![warn(missing_docs)]

mod engine;
mod generate;
mod sampler;
mod stream;

pub use engine::{Engine, EngineConfig, Event, Request, SeqId, Sink, TokenLogprob, generate_all};
pub use generate::{FinishReason, GenerateError, GenerateOptions, Generation, generate};
pub use sampler::{Sampler, SamplingParams, argmax};
pub use skillet_models::Rng;
pub use stream::TextStream;
