//! Llama-family causal language models on candle: configs, weight sources
//! (GGUF, safetensors, memory), pluggable linear layers, the model and its
//! KV cache, and writers for Hugging Face folders and GGUF files.
#![warn(missing_docs)]

mod adapted;
mod adapter;
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

pub use adapted::Adapted;
pub use adapter::{Adapter, Adapters, LAYER_MODULES, ModuleInfo, module_names};
pub use cache::KvCache;
pub use config::{Architecture, HfConfig, LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use linear::{Activations, BaseLinear, Linear, Precision};
pub use llama::{CachedBatch, CachedChunk, CausalLm, ForwardInput, Llama, LoadOptions};
pub use memory::{
    MemoryWeights, SHAPES, collect_weights, random_weights, random_weights_with, shape_config,
    tensor_shapes, tiny_config,
};
pub use rng::Rng;
pub use rope::Rope;
pub use skillet_kernels::LoraFactors;
pub use source::ModelSource;
pub use weights::{GgufWeights, SafetensorsWeights, Weight, WeightSource, gguf_name};
