//! Model configuration: the serde mirror of `config.json`, the GGUF metadata
//! reader, and the validated [`LlamaConfig`] both resolve into.

use std::path::Path;

use serde::Deserialize;
use skillet_gguf::GgufFile;

use crate::{ModelError, Result};

/// The Llama-family variants Skillet runs with one implementation. They differ
/// only in small switches (attention bias, sliding window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, and anything else `LlamaForCausalLM`.
    Llama,
    /// Mistral (optional sliding-window attention).
    Mistral,
    /// Qwen2 / Qwen2.5 (bias on q/k/v projections).
    Qwen2,
}

impl Architecture {
    /// Names accepted, for error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2";

    /// From `model_type` (config.json) or `general.architecture` (GGUF).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The lowercase name used by both config.json and GGUF.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    /// The transformers class name written into exported config.json files.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
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

/// Validated hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which variant.
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
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// Sliding-window attention span, when the model uses one.
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
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
        if [self.rope_theta, self.rms_norm_eps]
            .iter()
            .any(|v| v.is_nan() || *v <= 0.0)
        {
            return Err(err("rope_theta and rms_norm_eps must be positive".into()));
        }
        Ok(self)
    }

    /// Parameters of the model (embedding counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// Reads `config.json` of a Hugging Face folder.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            message: format!("invalid config.json: {e}"),
        })?;
        raw.resolve(path)
    }

    /// Reads the `<arch>.*` metadata keys of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path();
        let arch_name = file.get_str("general.architecture")?;
        let architecture =
            Architecture::from_name(arch_name).ok_or_else(|| ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                architecture: arch_name.to_string(),
                supported: Architecture::SUPPORTED,
            })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<usize> {
            let v = file.get_i64(&key(k))?;
            usize::try_from(v).map_err(|_| ModelError::Config {
                path: path.to_path_buf(),
                message: format!("{} = {v} is negative", key(k)),
            })
        };
        let hidden_size = usize_of("embedding_length")?;
        let num_attention_heads = usize_of("attention.head_count")?;
        let num_key_value_heads = match file.get(&key("attention.head_count_kv")) {
            Some(_) => usize_of("attention.head_count_kv")?,
            None => num_attention_heads,
        };
        let head_dim = match file.get(&key("attention.key_length")) {
            Some(_) => usize_of("attention.key_length")?,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let vocab_size = match file.get(&key("vocab_size")) {
            Some(_) => usize_of("vocab_size")?,
            None => match file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(tokens) => tokens.len(),
                None => file
                    .tensor("token_embd.weight")
                    .map(|t| t.shape[0])
                    .unwrap_or(0),
            },
        };
        let rope_theta = match file.get(&key("rope.freq_base")) {
            Some(_) => file.get_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        let rope_scaling = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: file.get_f64(&key("rope.scaling.factor"))?,
            },
            Some(other) => {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "unsupported rope scaling type '{other}' (supported: none, linear)"
                    ),
                });
            }
        };
        let sliding_window = match file.get(&key("attention.sliding_window")) {
            Some(_) => Some(usize_of("attention.sliding_window")?).filter(|&w| w > 0),
            None => None,
        };
        LlamaConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_of("context_length")?,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            attention_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            sliding_window,
        }
        .validate(path)
    }

    /// The config.json a Hugging Face folder of this model would carry.
    pub fn to_hf_json(
        &self,
        eos_token_id: Option<u32>,
        bos_token_id: Option<u32>,
    ) -> serde_json::Value {
        let rope_scaling = match self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        };
        serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
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
        })
    }
}

/// `config.json` as transformers writes it (only the keys we use; unknown
/// keys are ignored, as transformers itself does).
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2`, ...
    pub model_type: Option<String>,
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads; absent means equal to query heads.
    pub num_key_value_heads: Option<usize>,
    /// Head width; absent means hidden / heads.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers < 5 writes it here).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers < 5).
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE settings (transformers >= 5 writes `rope_theta` only here).
    pub rope_parameters: Option<serde_json::Value>,
    /// Context length.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Tied LM head; absent means false (the Llama/Mistral/Qwen2 default).
    pub tie_word_embeddings: Option<bool>,
    /// Bias on attention projections.
    pub attention_bias: Option<bool>,
    /// Sliding window (Mistral, Qwen2).
    pub sliding_window: Option<usize>,
    /// Qwen2 keeps the window off unless this is true.
    pub use_sliding_window: Option<bool>,
    /// Activation; only silu is implemented.
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_ctx() -> usize {
    2048
}

impl HfConfig {
    /// Resolves into a validated config; `path` is named in errors.
    pub fn resolve(self, path: &Path) -> Result<LlamaConfig> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let name = self.model_type.clone().unwrap_or_else(|| {
            let class = self.architectures.first().cloned().unwrap_or_default();
            class.trim_end_matches("ForCausalLM").to_lowercase()
        });
        let architecture =
            Architecture::from_name(&name).ok_or_else(|| ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                architecture: name.clone(),
                supported: Architecture::SUPPORTED,
            })?;
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(err(format!(
                "hidden_act '{act}' is not supported (only silu)"
            )));
        }
        // transformers 5 moved rope settings into `rope_parameters`; older
        // files have `rope_theta` + `rope_scaling` at the top level.
        let params = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        let scaling = match (params, &self.rope_scaling) {
            (_, Some(s)) if s.is_object() => Some(s),
            (Some(p), _) => Some(p),
            _ => None,
        };
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let num = |k: &str| {
                    s.get(k)
                        .and_then(serde_json::Value::as_f64)
                        .ok_or_else(|| err(format!("rope scaling '{kind}' needs '{k}'")))
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: num("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(err(format!(
                            "unsupported rope scaling type '{other}' (supported: default, linear, llama3)"
                        )));
                    }
                }
            }
        };
        let sliding_window = match architecture {
            Architecture::Qwen2 if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window.filter(|&w| w > 0),
        };
        let heads = self.num_attention_heads;
        LlamaConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size.checked_div(heads).unwrap_or(0)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            sliding_window,
        }
        .validate(path)
    }
}
