//! Checkpoint tensor names, written once per architecture: each
//! architecture's file holds a table of its decoder layer's tensors (the
//! Hugging Face name, llama.cpp's GGUF name, the shape in config terms),
//! and loading, random and in-memory weights, parameter counts and every
//! export read that table.

use crate::{Architecture, ModelConfig};

/// A dimension of a tensor, in config terms.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dim {
    /// `vocab_size`.
    Vocab,
    /// `hidden_size`.
    Hidden,
    /// `intermediate_size`.
    Ffn,
    /// Query width: heads × head width.
    Q,
    /// Key/value width: KV heads × head width.
    Kv,
    /// One head's width.
    Head,
}

/// When a layer tensor exists.
#[derive(Debug, Clone, Copy)]
pub(crate) enum When {
    /// In every model of the architecture.
    Always,
    /// With `attention_bias`.
    AttentionBias,
    /// With `qk_norm`.
    QkNorm,
}

/// One tensor of a decoder layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerTensor {
    /// The name after `model.layers.N.`.
    pub hf: &'static str,
    /// llama.cpp's name after `blk.N.`.
    pub gguf: &'static str,
    /// Its shape.
    pub shape: &'static [Dim],
    /// Whether this model has it.
    pub when: When,
}

impl LayerTensor {
    pub(crate) const fn new(hf: &'static str, gguf: &'static str, shape: &'static [Dim]) -> Self {
        Self {
            hf,
            gguf,
            shape,
            when: When::Always,
        }
    }

    pub(crate) const fn when(self, when: When) -> Self {
        Self { when, ..self }
    }
}

/// The tensors outside the layers: Hugging Face name, GGUF name, shape.
const GLOBAL: [(&str, &str, &[Dim]); 3] = [
    (
        "model.embed_tokens.weight",
        "token_embd.weight",
        &[Dim::Vocab, Dim::Hidden],
    ),
    ("model.norm.weight", "output_norm.weight", &[Dim::Hidden]),
    (
        "lm_head.weight",
        "output.weight",
        &[Dim::Vocab, Dim::Hidden],
    ),
];

/// The decoder layer table of `arch`, in checkpoint order.
pub(crate) fn layer_table(arch: Architecture) -> impl Iterator<Item = &'static LayerTensor> {
    let parts: &[&[LayerTensor]] = match arch {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3 => {
            crate::llama::TENSORS
        }
        Architecture::Gemma3 => crate::gemma3::TENSORS,
    };
    parts.iter().flat_map(|p| p.iter())
}

fn size(cfg: &ModelConfig, d: Dim) -> usize {
    match d {
        Dim::Vocab => cfg.vocab_size,
        Dim::Hidden => cfg.hidden_size,
        Dim::Ffn => cfg.intermediate_size,
        Dim::Q => cfg.num_attention_heads * cfg.head_dim,
        Dim::Kv => cfg.num_key_value_heads * cfg.head_dim,
        Dim::Head => cfg.head_dim,
    }
}

fn present(cfg: &ModelConfig, when: When) -> bool {
    match when {
        When::Always => true,
        When::AttentionBias => cfg.attention_bias,
        When::QkNorm => cfg.qk_norm,
    }
}

/// Hugging Face names and shapes of every tensor of `cfg`'s model, in
/// checkpoint order (the LM head only when untied).
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let shape = |dims: &[Dim]| dims.iter().map(|&d| size(cfg, d)).collect::<Vec<_>>();
    let [embed, norm, head] = GLOBAL;
    let mut out = vec![(embed.0.to_string(), shape(embed.2))];
    for i in 0..cfg.num_hidden_layers {
        for t in layer_table(cfg.architecture) {
            if present(cfg, t.when) {
                out.push((format!("model.layers.{i}.{}", t.hf), shape(t.shape)));
            }
        }
    }
    out.push((norm.0.to_string(), shape(norm.2)));
    if !cfg.tie_word_embeddings {
        out.push((head.0.to_string(), shape(head.2)));
    }
    out
}

/// Maps a Hugging Face tensor name to llama.cpp's GGUF name for `arch`
/// (names outside the table are kept).
pub fn gguf_name(arch: Architecture, hf_name: &str) -> String {
    if let Some((_, g, _)) = GLOBAL.iter().find(|(h, _, _)| *h == hf_name) {
        return (*g).to_string();
    }
    let Some((layer, tail)) = hf_name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return hf_name.to_string();
    };
    match layer_table(arch).find(|t| t.hf == tail) {
        Some(t) => format!("blk.{layer}.{}", t.gguf),
        None => hf_name.to_string(),
    }
}

/// The decoder layer a Hugging Face tensor or module name belongs to
/// (`model.layers.3.mlp.up_proj.weight` → 3), if any.
pub fn layer_of(hf_name: &str) -> Option<usize> {
    hf_name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(i, _)| i.parse().ok())
}

/// Whether `hf_name` is a norm weight (kept in f32 by every export; for
/// Gemma, stored as `1 + w` in GGUF).
pub fn is_norm(hf_name: &str) -> bool {
    hf_name.ends_with("norm.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp_per_architecture() {
        let l = Architecture::Llama;
        assert_eq!(
            gguf_name(l, "model.embed_tokens.weight"),
            "token_embd.weight"
        );
        assert_eq!(gguf_name(l, "lm_head.weight"), "output.weight");
        assert_eq!(
            gguf_name(l, "model.layers.12.self_attn.q_proj.weight"),
            "blk.12.attn_q.weight"
        );
        assert_eq!(
            gguf_name(l, "model.layers.3.self_attn.k_proj.bias"),
            "blk.3.attn_k.bias"
        );
        assert_eq!(
            gguf_name(l, "model.layers.0.post_attention_layernorm.weight"),
            "blk.0.ffn_norm.weight"
        );
        // Gemma 3 has a norm after attention of its own; its pre-MLP norm
        // takes llama.cpp's `ffn_norm` name.
        let g = Architecture::Gemma3;
        assert_eq!(
            gguf_name(g, "model.layers.0.post_attention_layernorm.weight"),
            "blk.0.post_attention_norm.weight"
        );
        assert_eq!(
            gguf_name(g, "model.layers.0.pre_feedforward_layernorm.weight"),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(
            gguf_name(
                Architecture::Qwen3,
                "model.layers.1.self_attn.k_norm.weight"
            ),
            "blk.1.attn_k_norm.weight"
        );
        assert_eq!(gguf_name(l, "something.else"), "something.else");
    }

    #[test]
    fn every_table_name_is_unique() {
        for arch in [Architecture::Llama, Architecture::Gemma3] {
            let t: Vec<_> = layer_table(arch).collect();
            for (i, a) in t.iter().enumerate() {
                for b in &t[i + 1..] {
                    assert!(a.hf != b.hf && a.gguf != b.gguf, "{arch:?}: {}", a.hf);
                }
            }
        }
    }
}
