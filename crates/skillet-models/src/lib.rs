//! Decoder-only language models on candle, every architecture behind one
//! interface: configs, weight sources (GGUF, safetensors, memory), each
//! architecture's tensor-name table, pluggable linear layers, the model and
//! its KV cache, and writers for Hugging Face folders and GGUF files.
#![warn(missing_docs)]

mod adapted;
mod adapter;
mod cache;
mod causal_lm;
mod checkpoint;
mod config;
mod config_read;
mod decoder;
mod error;
pub mod export;
mod gemma3;
mod layers;
mod linear;
mod llama;
mod load;
mod memory;
mod names;
mod nf4;
mod projection;
mod quant_plan;
mod rng;
mod rope;
mod source;
mod team_decode;
mod weights;

pub use adapted::Adapted;
pub use adapter::{Adapter, Adapters, BaseOutput, LAYER_MODULES, ModuleInfo, module_names};
pub use cache::KvCache;
pub use causal_lm::{
    CachedBatch, CachedChunk, CausalLm, DenseHead, ForwardInput, LoadOptions, QuantizeBase,
};
pub use config::{Activation, Architecture, LayerType, ModelConfig, RopeConfig, RopeScaling};
pub use config_read::HfConfig;
pub use decoder::Model;
pub use error::{ModelError, Result};
pub use linear::{Activations, BaseLinear, Linear, Precision};
pub use memory::{
    MemoryWeights, SHAPES, collect_weights, random_weights, random_weights_with, shape_config,
    tiny_config, tiny_config_for,
};
pub use names::{gguf_name, is_norm, layer_of, tensor_shapes};
pub use nf4::{DOUBLE_QUANT_BLOCK, DoubleQuant, Nf4, double_quantize, dynamic_code};
pub use quant_plan::FileType;
pub use rng::Rng;
pub use rope::Rope;
pub use skillet_kernels::LoraFactors;
pub use source::ModelSource;
pub use weights::{GgufWeights, SafetensorsWeights, Weight, WeightSource};
