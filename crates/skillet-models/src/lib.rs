//! Llama-family causal language models on candle: configs, weight sources
//! (GGUF, safetensors, memory), pluggable linear layers, the model and its
//! KV cache, and writers for Hugging Face folders and GGUF files.
#![warn(missing_docs)]

mod cache;
mod checkpoint;
mod config;
mod error;
pub mod export;
mod linear;
mod llama;
mod memory;
mod rng;
mod rope;
mod source;
mod weights;

pub use cache::KvCache;
pub use config::{Architecture, HfConfig, LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use linear::{BaseLinear, Linear};
pub use llama::{CausalLm, ForwardInput, Llama, LoadOptions};
pub use memory::{MemoryWeights, collect_weights, random_weights, tensor_shapes, tiny_config};
pub use rng::Rng;
pub use rope::Rope;
pub use source::ModelSource;
pub use weights::{GgufWeights, SafetensorsWeights, Weight, WeightSource, gguf_name};
