//! In-memory weights: tiny random models for tests, and the bridge for
//! writing a model out as a Hugging Face folder or a GGUF file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::names::tensor_shapes;
use crate::{
    Activation, Architecture, LayerType, ModelConfig, ModelError, Result, RopeConfig, RopeScaling,
    Weight, WeightSource,
};

/// Named dense tensors held in memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryWeights {
    /// Tensors by Hugging Face name.
    pub tensors: HashMap<String, Tensor>,
}

impl WeightSource for MemoryWeights {
    fn path(&self) -> &Path {
        Path::new("<memory>")
    }

    fn file_name(&self, hf_name: &str) -> String {
        hf_name.to_string()
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.tensors.contains_key(hf_name)
    }

    fn load(&self, hf_name: &str, _keep_quantized: bool) -> Result<Weight> {
        self.tensors
            .get(hf_name)
            .cloned()
            .map(Weight::Dense)
            .ok_or_else(|| ModelError::MissingTensor {
                path: PathBuf::from("<memory>"),
                tensor: hf_name.to_string(),
            })
    }

    fn storage_types(&self) -> BTreeMap<String, usize> {
        BTreeMap::from([("F32".to_string(), self.tensors.len())])
    }
}

/// A small config for unit tests: 2 layers, GQA 4/2, width 64.
pub fn tiny_config(vocab_size: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        attention_bias: false,
        qk_norm: false,
        hidden_act: Activation::Silu,
        sliding_window: None,
        layer_types: vec![LayerType::Full; 2],
        local_rope: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
    }
}

/// [`tiny_config`] in the shape of `arch`: Qwen3 with QK-norm; Gemma 3
/// with its norms, GeGLU, a local layer (window 3, its own RoPE base) then
/// a global one, and soft-capped logits.
pub fn tiny_config_for(arch: Architecture, vocab_size: usize) -> ModelConfig {
    let base = ModelConfig {
        architecture: arch,
        ..tiny_config(vocab_size)
    };
    match arch {
        Architecture::Qwen3 => ModelConfig {
            qk_norm: true,
            ..base
        },
        Architecture::Gemma3 => ModelConfig {
            qk_norm: true,
            hidden_act: Activation::GeluTanh,
            rope_theta: 1_000_000.0,
            local_rope: Some(RopeConfig {
                theta: 10_000.0,
                scaling: RopeScaling::None,
            }),
            sliding_window: Some(3),
            layer_types: vec![LayerType::Sliding, LayerType::Full],
            query_pre_attn_scalar: Some(16.0),
            final_logit_softcapping: Some(5.0),
            ..base
        },
        _ => base,
    }
}

/// Model shapes for benchmarks on random weights: Llama 3.2 1B and 3B
/// (dimensions, heads, vocabulary, tied embeddings and RoPE base from
/// their `config.json`; plain RoPE without Llama 3's frequency scaling,
/// which costs nothing at these lengths), and `tiny` ([`tiny_config`] with
/// 512 tokens) to try the tools on.
pub const SHAPES: [&str; 3] = ["llama-3.2-1b", "llama-3.2-3b", "tiny"];

/// The config of a shape in [`SHAPES`], or `None`.
pub fn shape_config(name: &str) -> Option<ModelConfig> {
    let (hidden, layers, heads, head_dim) = match name {
        "llama-3.2-1b" => (2048, 16, 32, 64),
        "llama-3.2-3b" => (3072, 28, 24, 128),
        "tiny" => return Some(tiny_config(512)),
        _ => return None,
    };
    Some(ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 128_256,
        hidden_size: hidden,
        intermediate_size: 8192,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: 8,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        qk_norm: false,
        hidden_act: Activation::Silu,
        sliding_window: None,
        layer_types: vec![LayerType::Full; 2],
        local_rope: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
    })
}

/// Random weights for `cfg`, deterministic in `seed` (norm weights near 1,
/// projections uniform with half-width 0.07).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<MemoryWeights> {
    random_weights_with(cfg, seed, 0.14)
}

/// As [`random_weights`], with projections uniform over `±width / 2`
/// (`width = 0.02 * 12f32.sqrt()` gives the standard deviation 0.02 that
/// transformers initializes with, which keeps deep models' activations
/// finite).
pub fn random_weights_with(cfg: &ModelConfig, seed: u64, width: f32) -> Result<MemoryWeights> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*: enough for test weights, stable across platforms.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut tensors = HashMap::new();
    for (name, shape) in tensor_shapes(cfg) {
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let scale = if name.ends_with(".bias") { 0.1 } else { width };
        let data: Vec<f32> = (0..n)
            .map(|_| {
                if is_norm {
                    1.0 + 0.2 * next()
                } else {
                    scale * next()
                }
            })
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(MemoryWeights { tensors })
}

/// Reads every tensor of `src` (as f32) into memory.
pub fn collect_weights(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<MemoryWeights> {
    let mut tensors = HashMap::new();
    for (name, shape) in tensor_shapes(cfg) {
        let w = src
            .load_checked(&name, &shape, false)?
            .to_dense(&Device::Cpu)?;
        tensors.insert(name, w.to_dtype(DType::F32)?);
    }
    Ok(MemoryWeights { tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_have_the_published_parameter_counts() {
        // Llama 3.2 1B and 3B, as transformers counts them (tied embeddings once).
        let count = |n| shape_config(n).unwrap().parameter_count();
        assert_eq!(count("llama-3.2-1b"), 1_235_814_400);
        assert_eq!(count("llama-3.2-3b"), 3_212_749_824);
        assert!(shape_config("llama-3.2-8b").is_none());
        for name in SHAPES {
            assert!(shape_config(name).is_some(), "{name}");
        }
    }
}
