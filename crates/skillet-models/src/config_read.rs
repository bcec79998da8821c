//! Reading a [`ModelConfig`]: the serde mirror of `config.json` (both the
//! transformers 4 keys and transformers 5's `rope_parameters`) and the
//! `<arch>.*` metadata of a GGUF file.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use skillet_gguf::{GgufFile, Value as GgufValue};

use crate::config::{Activation, LayerType, RopeConfig};
use crate::{Architecture, ModelConfig, ModelError, Result, RopeScaling};

/// Gemma 3's local RoPE base where a file does not say (transformers'
/// default `rope_local_base_freq`, and what llama.cpp assumes).
const GEMMA3_LOCAL_THETA: f64 = 10_000.0;
/// Gemma 3: every sixth layer attends globally, the others locally.
const GEMMA3_PATTERN: usize = 6;

/// Gemma 3's interleaving: layer `i` is global when `(i + 1) % pattern == 0`.
fn pattern_layers(n: usize, pattern: usize) -> Vec<LayerType> {
    (0..n)
        .map(|i| match pattern {
            0 | 1 => LayerType::Full,
            p if (i + 1) % p == 0 => LayerType::Full,
            _ => LayerType::Sliding,
        })
        .collect()
}

impl ModelConfig {
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
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let arch_name = file.get_str("general.architecture")?;
        let architecture =
            Architecture::from_name(arch_name).ok_or_else(|| ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                architecture: arch_name.to_string(),
                supported: Architecture::SUPPORTED,
            })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let has = |k: &str| file.get(&key(k)).is_some();
        let usize_of = |k: &str| -> Result<usize> {
            let v = file.get_i64(&key(k))?;
            usize::try_from(v).map_err(|_| err(format!("{} = {v} is negative", key(k))))
        };
        let f64_if = |k: &str| -> Result<Option<f64>> {
            has(k)
                .then(|| file.get_f64(&key(k)))
                .transpose()
                .map_err(Into::into)
        };
        let hidden_size = usize_of("embedding_length")?;
        let num_attention_heads = usize_of("attention.head_count")?;
        let num_key_value_heads = match has("attention.head_count_kv") {
            true => usize_of("attention.head_count_kv")?,
            false => num_attention_heads,
        };
        let head_dim = match has("attention.key_length") {
            true => usize_of("attention.key_length")?,
            false => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        };
        let vocab_size = match has("vocab_size") {
            true => usize_of("vocab_size")?,
            false => match file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(tokens) => tokens.len(),
                None => file
                    .tensor("token_embd.weight")
                    .map(|t| t.shape[0])
                    .unwrap_or(0),
            },
        };
        let rope_scaling = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: file.get_f64(&key("rope.scaling.factor"))?,
            },
            Some(other) => {
                return Err(err(format!(
                    "unsupported rope scaling type '{other}' (supported: none, linear)"
                )));
            }
        };
        if f64_if("attn_logit_softcapping")?.is_some_and(|c| c > 0.0) {
            return Err(err(
                "attention logit soft-capping (Gemma 2) is not supported".into(),
            ));
        }
        let num_hidden_layers = usize_of("block_count")?;
        let sliding_window = match has("attention.sliding_window") {
            true => Some(usize_of("attention.sliding_window")?).filter(|&w| w > 0),
            false => None,
        };
        let gemma = architecture == Architecture::Gemma3;
        let layer_types = match file.get(&key("attention.sliding_window_pattern")) {
            Some(GgufValue::Array(flags)) => flags
                .iter()
                .map(|f| match f {
                    GgufValue::Bool(true) => Ok(LayerType::Sliding),
                    GgufValue::Bool(false) => Ok(LayerType::Full),
                    _ => Err(err("sliding_window_pattern holds a non-boolean".into())),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => pattern_layers(
                num_hidden_layers,
                usize_of("attention.sliding_window_pattern")?,
            ),
            None if gemma => pattern_layers(num_hidden_layers, GEMMA3_PATTERN),
            None => ModelConfig::uniform_layers(num_hidden_layers, sliding_window),
        };
        ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: f64_if("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            local_rope: gemma.then_some(RopeConfig {
                theta: f64_if("rope.freq_base_swa")?.unwrap_or(GEMMA3_LOCAL_THETA),
                scaling: RopeScaling::None,
            }),
            max_position_embeddings: usize_of("context_length")?,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            attention_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            qk_norm: file.tensor("blk.0.attn_q_norm.weight").is_some(),
            hidden_act: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            sliding_window,
            layer_types,
            // llama.cpp scales Gemma 3 by the head width (its 27B, whose
            // query_pre_attn_scalar is hidden / heads, aside).
            query_pre_attn_scalar: gemma.then_some(head_dim as f64),
            final_logit_softcapping: f64_if("final_logit_softcapping")?.filter(|&c| c > 0.0),
        }
        .validate(path)
    }
}

/// `config.json` as transformers writes it (only the keys we use; unknown
/// keys are ignored, as transformers itself does).
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `gemma3_text`.
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
    pub rms_norm_eps: Option<f64>,
    /// RoPE base (transformers < 5 writes it here).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers < 5).
    pub rope_scaling: Option<Value>,
    /// RoPE settings (transformers >= 5 writes `rope_theta` only here; per
    /// layer type for Gemma 3).
    pub rope_parameters: Option<Value>,
    /// Gemma 3's local RoPE base (transformers < 5).
    pub rope_local_base_freq: Option<f64>,
    /// Context length.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Tied LM head; absent means the architecture's default.
    pub tie_word_embeddings: Option<bool>,
    /// Bias on attention projections.
    pub attention_bias: Option<bool>,
    /// Sliding window (Mistral, Qwen2, Gemma 3).
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3 keep the window off unless this is true.
    pub use_sliding_window: Option<bool>,
    /// Per layer, `full_attention` or `sliding_attention`.
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3's interleaving (older files).
    pub sliding_window_pattern: Option<usize>,
    /// Activation (Llama family).
    pub hidden_act: Option<String>,
    /// Activation (Gemma).
    pub hidden_activation: Option<String>,
    /// Gemma's attention scale denominator.
    pub query_pre_attn_scalar: Option<f64>,
    /// Soft-capping of the final logits.
    pub final_logit_softcapping: Option<f64>,
    /// Soft-capping of attention scores (Gemma 2; refused).
    pub attn_logit_softcapping: Option<f64>,
}

fn default_ctx() -> usize {
    2048
}

/// One RoPE object (`rope_scaling` or a `rope_parameters` entry): its
/// scaling, and its base where it names one.
fn parse_rope(s: &Value, err: &dyn Fn(String) -> ModelError) -> Result<(Option<f64>, RopeScaling)> {
    let theta = s.get("rope_theta").and_then(Value::as_f64);
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| {
        s.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| err(format!("rope scaling '{kind}' needs '{k}'")))
    };
    let scaling = match kind {
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
    };
    Ok((theta, scaling))
}

impl HfConfig {
    /// Resolves into a validated config; `path` is named in errors.
    pub fn resolve(self, path: &Path) -> Result<ModelConfig> {
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
        let gemma = architecture == Architecture::Gemma3;
        let act_name = self.hidden_activation.as_ref().or(self.hidden_act.as_ref());
        let hidden_act = match act_name {
            None if gemma => Activation::GeluTanh,
            None => Activation::Silu,
            Some(a) => Activation::from_name(a).ok_or_else(|| {
                err(format!(
                    "hidden activation '{a}' is not supported (silu, gelu_pytorch_tanh)"
                ))
            })?,
        };
        if self.attn_logit_softcapping.is_some_and(|c| c > 0.0) {
            return Err(err(
                "attention logit soft-capping (Gemma 2) is not supported".into(),
            ));
        }
        // transformers 5 moved RoPE into `rope_parameters` (per layer type
        // for Gemma 3); older files have `rope_theta` + `rope_scaling`.
        let params = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let per_type = params.filter(|p| p.get("full_attention").is_some());
        let (mut global, mut local) = (None, None);
        if let Some(p) = per_type {
            global = p
                .get("full_attention")
                .map(|r| parse_rope(r, &err))
                .transpose()?;
            local = p
                .get("sliding_attention")
                .map(|r| parse_rope(r, &err))
                .transpose()?;
        } else if let Some(s) = self.rope_scaling.as_ref().filter(|s| s.is_object()) {
            let (theta, scaling) = parse_rope(s, &err)?;
            let theta = theta.or(params.and_then(|p| p.get("rope_theta")?.as_f64()));
            global = Some((theta, scaling));
        } else if let Some(p) = params {
            global = Some(parse_rope(p, &err)?);
        }
        let default_theta = if gemma { 1_000_000.0 } else { 10_000.0 };
        let (theta, rope_scaling) = global.unwrap_or((None, RopeScaling::None));
        let rope_theta = theta.or(self.rope_theta).unwrap_or(default_theta);
        let local_rope = gemma.then(|| {
            let (theta, scaling) = local.unwrap_or((None, RopeScaling::None));
            RopeConfig {
                theta: theta
                    .or(self.rope_local_base_freq)
                    .unwrap_or(GEMMA3_LOCAL_THETA),
                scaling,
            }
        });
        let sliding_window = match architecture {
            Architecture::Qwen2 | Architecture::Qwen3 if self.use_sliding_window != Some(true) => {
                None
            }
            Architecture::Gemma3 => Some(self.sliding_window.unwrap_or(4096)),
            _ => self.sliding_window.filter(|&w| w > 0),
        };
        let layers = self.num_hidden_layers;
        let layer_types = match &self.layer_types {
            Some(types) if sliding_window.is_some() => types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerType::Full),
                    "sliding_attention" => Ok(LayerType::Sliding),
                    other => Err(err(format!("unknown layer type '{other}'"))),
                })
                .collect::<Result<Vec<_>>>()?,
            _ if gemma => pattern_layers(
                layers,
                self.sliding_window_pattern.unwrap_or(GEMMA3_PATTERN),
            ),
            _ => ModelConfig::uniform_layers(layers, sliding_window),
        };
        let heads = self.num_attention_heads;
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size.checked_div(heads).unwrap_or(0));
        ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            local_rope,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            attention_bias: self
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            hidden_act,
            sliding_window,
            layer_types,
            query_pre_attn_scalar: gemma.then(|| self.query_pre_attn_scalar.unwrap_or(256.0)),
            final_logit_softcapping: self.final_logit_softcapping.filter(|&c| c > 0.0),
        }
        .validate(path)
    }
}
