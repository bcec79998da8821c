//! Writing a model out: a Hugging Face folder (config.json + safetensors)
//! or a GGUF file in any supported storage type, with llama.cpp's Q/K row
//! order. Tokenizer files are the tokenizer crate's job.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};
use skillet_gguf::{GgmlType, GgufWriter, Value};

use crate::names::{gguf_name, is_norm, tensor_shapes};
use crate::{LayerType, MemoryWeights, ModelConfig, ModelError, Result, RopeScaling};

fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The weight of a sequence-classification head with one label (a reward
/// model's `score`, hidden → 1).
pub const SCORE_HEAD: &str = "score.weight";

/// The special token ids a written config names.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenIds {
    /// Beginning of text.
    pub bos: Option<u32>,
    /// End of text.
    pub eos: Option<u32>,
    /// What batches are padded with (a sequence classifier reads it to
    /// find each row's last token).
    pub pad: Option<u32>,
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors`
/// (f32) into `dir`, creating it. Where `weights` holds a [`SCORE_HEAD`],
/// it is written too and the config names the architecture's
/// `…ForSequenceClassification` with one label (a reward model, as
/// transformers' `AutoModelForSequenceClassification` loads it).
pub fn write_hf_weights(
    cfg: &ModelConfig,
    weights: &MemoryWeights,
    dir: &Path,
    ids: TokenIds,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (bos, eos) = (ids.bos, ids.eos);
    let head = weights.tensors.get(SCORE_HEAD);
    let mut json = cfg.to_hf_json(eos, bos);
    if let Some(pad) = ids.pad {
        json["pad_token_id"] = serde_json::json!(pad);
    }
    if head.is_some() {
        let class = cfg
            .architecture
            .hf_class()
            .replace("ForCausalLM", "ForSequenceClassification");
        json["architectures"] = serde_json::json!([class]);
        json["num_labels"] = serde_json::json!(1);
    }
    let config = serde_json::to_string_pretty(&json).expect("json");
    std::fs::write(dir.join("config.json"), config + "\n").map_err(io(dir))?;
    let gen_cfg = serde_json::json!({"bos_token_id": bos, "eos_token_id": eos});
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen_cfg).expect("json") + "\n",
    )
    .map_err(io(dir))?;
    let tensors: HashMap<String, Tensor> = tensor_shapes(cfg)
        .into_iter()
        .map(|(name, _)| {
            let t = weights
                .tensors
                .get(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: dir.to_path_buf(),
                    tensor: name.clone(),
                })?;
            Ok((name, t.to_dtype(DType::F32)?.contiguous()?))
        })
        .collect::<Result<_>>()?;
    let mut tensors = tensors;
    if let Some(h) = head {
        tensors.insert(SCORE_HEAD.into(), h.to_dtype(DType::F32)?.contiguous()?);
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| ModelError::Config {
        path: path.clone(),
        message: format!("cannot write safetensors: {e}"),
    })?;
    Ok(())
}

/// llama.cpp's Q/K row permutation (the inverse of what the loader undoes).
fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let head_dim = rows / heads;
    let rest: usize = dims[1..].iter().product();
    let t = t
        .reshape((heads, 2, head_dim / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(t.reshape(dims)?)
}

/// The GGUF bytes of `t` stored as `ty` (plain floats are "blocks" of one).
fn tensor_bytes(t: &Tensor, ty: GgmlType, name: &str, path: &Path) -> Result<Vec<u8>> {
    let bad = |e: candle_core::Error| ModelError::BadTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        message: e.to_string(),
    };
    let q = QTensor::quantize(t, crate::weights::candle_type(ty)).map_err(bad)?;
    Ok(q.data().map_err(bad)?.into_owned())
}

/// Writes `weights` as a GGUF file. `storage(name)` picks each tensor's
/// type by its HF name (norms and biases are always F32). `extra` metadata
/// (tokenizer, template) is added as given.
pub fn write_gguf(
    cfg: &ModelConfig,
    weights: &MemoryWeights,
    path: &Path,
    storage: &dyn Fn(&str) -> GgmlType,
    extra: Vec<(String, Value)>,
) -> Result<()> {
    let arch = cfg.architecture.name();
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.metadata("general.architecture", Value::String(arch.into()));
    w.metadata(&k("vocab_size"), Value::U32(cfg.vocab_size as u32));
    w.metadata(
        &k("context_length"),
        Value::U32(cfg.max_position_embeddings as u32),
    );
    w.metadata(&k("embedding_length"), Value::U32(cfg.hidden_size as u32));
    w.metadata(
        &k("feed_forward_length"),
        Value::U32(cfg.intermediate_size as u32),
    );
    w.metadata(&k("block_count"), Value::U32(cfg.num_hidden_layers as u32));
    w.metadata(
        &k("attention.head_count"),
        Value::U32(cfg.num_attention_heads as u32),
    );
    w.metadata(
        &k("attention.head_count_kv"),
        Value::U32(cfg.num_key_value_heads as u32),
    );
    w.metadata(&k("attention.key_length"), Value::U32(cfg.head_dim as u32));
    w.metadata(
        &k("attention.value_length"),
        Value::U32(cfg.head_dim as u32),
    );
    w.metadata(&k("rope.dimension_count"), Value::U32(cfg.head_dim as u32));
    w.metadata(&k("rope.freq_base"), Value::F32(cfg.rope_theta as f32));
    w.metadata(
        &k("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    );
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        w.metadata(&k("rope.scaling.type"), Value::String("linear".into()));
        w.metadata(&k("rope.scaling.factor"), Value::F32(factor as f32));
    }
    if let Some(win) = cfg.sliding_window {
        w.metadata(&k("attention.sliding_window"), Value::U32(win as u32));
        // Which layers slide, where not all do (Gemma 3).
        if cfg.layer_types.contains(&LayerType::Full) {
            let sliding = cfg
                .layer_types
                .iter()
                .map(|t| Value::Bool(*t == LayerType::Sliding));
            w.metadata(
                &k("attention.sliding_window_pattern"),
                Value::Array(sliding.collect()),
            );
        }
    }
    if let Some(local) = cfg.local_rope {
        w.metadata(&k("rope.freq_base_swa"), Value::F32(local.theta as f32));
    }
    if let Some(cap) = cfg.final_logit_softcapping {
        w.metadata(&k("final_logit_softcapping"), Value::F32(cap as f32));
    }
    for (key, value) in extra {
        w.metadata(&key, value);
    }
    let permute = cfg.architecture.gguf_permutes_qk();
    let add_one = cfg.architecture.norm_adds_one();
    for (name, shape) in tensor_shapes(cfg) {
        let t = weights
            .tensors
            .get(&name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
            })?;
        let t = match () {
            _ if permute && name.contains("self_attn.q_proj.") => {
                permute_rows(t, cfg.num_attention_heads)?
            }
            _ if permute && name.contains("self_attn.k_proj.") => {
                permute_rows(t, cfg.num_key_value_heads)?
            }
            // Gemma's GGUF norms hold `1 + w`.
            _ if add_one && is_norm(&name) => (t + 1.0)?,
            _ => t.clone(),
        };
        let ty = if shape.len() == 1 {
            GgmlType::F32
        } else {
            storage(&name)
        };
        let bytes = tensor_bytes(&t, ty, &name, path)?;
        w.tensor(&gguf_name(cfg.architecture, &name), &shape, ty, bytes);
    }
    w.write(path)?;
    Ok(())
}

/// The factors of one adapted module for [`write_gguf_lora`].
#[derive(Debug, Clone)]
pub struct LoraTensors {
    /// Hugging Face module name without `.weight` (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
}

/// Writes a LoRA adapter in llama.cpp's adapter GGUF format (what its
/// `convert_lora_to_gguf.py` writes and `--lora` loads): `general.type =
/// adapter`, `adapter.type = lora`, and per module `<gguf name>.lora_a`
/// (`[r, in]`) and `.lora_b` (`[out, r]`) in f32. llama.cpp scales by
/// `alpha / r`, so `scale` (PEFT's alpha/r, or alpha/√r with rsLoRA) is
/// written as `alpha = scale · r`. Where the architecture's GGUF permutes
/// the rows of Q and K, `B`'s rows are permuted the same way, so `B·A`
/// lines up with the permuted base weight.
pub fn write_gguf_lora(
    cfg: &ModelConfig,
    modules: &[LoraTensors],
    scale: f64,
    path: &Path,
) -> Result<()> {
    let mut w = GgufWriter::new();
    w.metadata(
        "general.architecture",
        Value::String(cfg.architecture.name().into()),
    );
    w.metadata("general.type", Value::String("adapter".into()));
    w.metadata("adapter.type", Value::String("lora".into()));
    let rank = modules.first().map_or(1, |m| m.a.dims()[0]);
    w.metadata(
        "adapter.lora.alpha",
        Value::F32((scale * rank as f64) as f32),
    );
    let permute = cfg.architecture.gguf_permutes_qk();
    for m in modules {
        let name = gguf_name(cfg.architecture, &format!("{}.weight", m.module));
        let b = match () {
            _ if permute && m.module.ends_with("self_attn.q_proj") => {
                permute_rows(&m.b, cfg.num_attention_heads)?
            }
            _ if permute && m.module.ends_with("self_attn.k_proj") => {
                permute_rows(&m.b, cfg.num_key_value_heads)?
            }
            _ => m.b.clone(),
        };
        for (suffix, t) in [("lora_a", &m.a), ("lora_b", &b)] {
            let t = t.to_dtype(DType::F32)?.contiguous()?;
            let full = format!("{name}.{suffix}");
            let bytes = tensor_bytes(&t, GgmlType::F32, &full, path)?;
            w.tensor(&full, t.dims(), GgmlType::F32, bytes);
        }
    }
    w.write(path)?;
    Ok(())
}
