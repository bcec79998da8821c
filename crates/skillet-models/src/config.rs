//! The architecture-neutral model configuration: the validated
//! [`ModelConfig`] every architecture reads its dimensions, RoPE, norms and
//! vocabulary from, and what it writes back into `config.json`. Reading
//! `config.json` and GGUF metadata is `config_read.rs`.

use std::path::Path;

use serde_json::json;

use crate::{ModelError, Result};

/// The architectures Skillet runs. Llama, Mistral, Qwen2 and Qwen3 share
/// one decoder (`llama.rs`) and differ in small switches (attention bias,
/// sliding window, QK-norm); Gemma 3 has its own (`gemma3.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, and anything else `LlamaForCausalLM`.
    Llama,
    /// Mistral (optional sliding-window attention).
    Mistral,
    /// Qwen2 / Qwen2.5 (bias on q/k/v projections).
    Qwen2,
    /// Qwen3 (RMSNorm on each query and key head, no bias).
    Qwen3,
    /// Gemma 3's text model: GeGLU, (1 + w) norms around both sublayers,
    /// QK-norm, scaled embeddings, interleaved local and global attention.
    Gemma3,
}

impl Architecture {
    /// Names accepted, for error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, gemma3 (gemma3_text)";

    /// From `model_type` (config.json) or `general.architecture` (GGUF).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "gemma3" | "gemma3_text" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The lowercase name GGUF files use (`general.architecture`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }

    /// The `model_type` of config.json.
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Self::Gemma3 => "gemma3_text",
            other => other.name(),
        }
    }

    /// The transformers class name written into exported config.json files.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Whether llama.cpp's converter permuted the Q/K rows of this
    /// architecture's GGUF files for its interleaved RoPE.
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }

    /// Whether the norms compute `x̂ · (1 + w)` (Gemma's convention; GGUF
    /// files of such models store `1 + w`).
    pub fn norm_adds_one(self) -> bool {
        self == Self::Gemma3
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (`silu`).
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// From `hidden_act` / `hidden_activation`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    /// The name transformers uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// RoPE frequency scaling. Types not listed are rejected at load time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Division factor.
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling of the frequency bands.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency band factor.
        low_freq_factor: f64,
        /// High-frequency band factor.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// transformers' `rope_parameters` / `rope_scaling` object, with
    /// `rope_theta` inside.
    pub(crate) fn to_json(self, theta: f64) -> serde_json::Value {
        match self {
            RopeScaling::None => json!({"rope_type": "default", "rope_theta": theta}),
            RopeScaling::Linear { factor } => {
                json!({"rope_type": "linear", "factor": factor, "rope_theta": theta})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "rope_theta": theta,
            }),
        }
    }
}

/// RoPE of one kind of layer: base and scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// The base (`rope_theta`).
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// How a decoder layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Every earlier position.
    Full,
    /// Only the last [`ModelConfig::sliding_window`] positions, with the
    /// local RoPE where the model has one.
    Sliding,
}

impl LayerType {
    /// The name in config.json's `layer_types`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full_attention",
            Self::Sliding => "sliding_attention",
        }
    }
}

/// Validated hyper-parameters of a decoder-only model, the same view for
/// every architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which architecture.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base (of full-attention layers).
    pub rope_theta: f64,
    /// RoPE scaling (of full-attention layers).
    pub rope_scaling: RopeScaling,
    /// The RoPE of sliding-window layers where it differs (Gemma 3's
    /// `rope_local_base_freq`).
    pub local_rope: Option<RopeConfig>,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// RMSNorm on each query and key head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// The MLP's gate activation.
    pub hidden_act: Activation,
    /// Sliding-window attention span of [`LayerType::Sliding`] layers.
    pub sliding_window: Option<usize>,
    /// How each layer attends, one entry per layer.
    pub layer_types: Vec<LayerType>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`
    /// (Gemma); `None` means `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Logits become `c · tanh(logits / c)` (Gemma 2's soft-capping).
    pub final_logit_softcapping: Option<f64>,
}

impl ModelConfig {
    /// Checks the divisibility rules every later shape relies on.
    pub fn validate(self, path: &Path) -> Result<Self> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(err(format!("{name} must be positive")));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            )));
        }
        let positive = [
            Some(self.rope_theta),
            Some(self.rms_norm_eps),
            self.local_rope.map(|r| r.theta),
            self.query_pre_attn_scalar,
            self.final_logit_softcapping,
        ];
        if positive.iter().flatten().any(|v| v.is_nan() || *v <= 0.0) {
            return Err(err(
                "rope_theta, rms_norm_eps, query_pre_attn_scalar and the soft-capping must be positive"
                    .into(),
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(err(format!(
                "layer_types has {} entries for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            )));
        }
        if self.sliding_window.is_none() && self.layer_types.contains(&LayerType::Sliding) {
            return Err(err(
                "sliding_attention layers need a positive sliding_window".into(),
            ));
        }
        Ok(self)
    }

    /// Parameters of the model (embedding counted once when tied).
    pub fn parameter_count(&self) -> usize {
        crate::names::tensor_shapes(self)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// The attention window of layer `layer`, if it has one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerType::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// The RoPE of layer `layer`.
    pub fn layer_rope(&self, layer: usize) -> RopeConfig {
        self.layer_rope_of(
            self.layer_types
                .get(layer)
                .copied()
                .unwrap_or(LayerType::Full),
        )
    }

    /// The scale of attention scores.
    pub fn attention_scale(&self) -> f32 {
        let d = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
        (1.0 / d.sqrt()) as f32
    }

    /// Every layer of one type: `n` layers, sliding where `window` is set.
    pub fn uniform_layers(n: usize, window: Option<usize>) -> Vec<LayerType> {
        let kind = match window {
            Some(_) => LayerType::Sliding,
            None => LayerType::Full,
        };
        vec![kind; n]
    }

    /// The config.json a Hugging Face folder of this model would carry.
    pub fn to_hf_json(
        &self,
        eos_token_id: Option<u32>,
        bos_token_id: Option<u32>,
    ) -> serde_json::Value {
        let rope_scaling = match self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            s => s.to_json(self.rope_theta),
        };
        let mut out = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.hf_model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act.name(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "torch_dtype": "float32",
        });
        if self.architecture == Architecture::Gemma3 {
            // transformers 5's shape: RoPE per layer type, the activation
            // under its Gemma name.
            let local = self.layer_rope_of(LayerType::Sliding);
            let full = self.layer_rope_of(LayerType::Full);
            let o = out.as_object_mut().expect("an object");
            o.remove("rope_theta");
            o.remove("rope_scaling");
            o.remove("hidden_act");
            o.insert("hidden_activation".into(), json!(self.hidden_act.name()));
            o.insert(
                "rope_parameters".into(),
                json!({
                    "sliding_attention": local.scaling.to_json(local.theta),
                    "full_attention": full.scaling.to_json(full.theta),
                }),
            );
            o.insert(
                "query_pre_attn_scalar".into(),
                json!(self.query_pre_attn_scalar),
            );
            o.insert(
                "final_logit_softcapping".into(),
                json!(self.final_logit_softcapping),
            );
            let types: Vec<&str> = self.layer_types.iter().map(|t| t.name()).collect();
            o.insert("layer_types".into(), json!(types));
        }
        out
    }

    fn layer_rope_of(&self, kind: LayerType) -> RopeConfig {
        match (kind, self.local_rope) {
            (LayerType::Sliding, Some(local)) => local,
            _ => RopeConfig {
                theta: self.rope_theta,
                scaling: self.rope_scaling,
            },
        }
    }
}
