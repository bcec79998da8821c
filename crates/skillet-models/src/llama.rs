//! The Llama-family decoder layer (Llama, SmolLM, Mistral, Qwen2, Qwen3),
//! following transformers' `modeling_llama.py`: RMSNorm → GQA attention
//! with RoPE → residual, RMSNorm → SwiGLU MLP → residual. Qwen2 adds bias
//! to q/k/v, Qwen3 an RMSNorm on each query and key head (`modeling_qwen3.py`),
//! Mistral a sliding window; the rest is shared.

use candle_core::Tensor;

use crate::layers::{self, Attention, AttentionKind, Block, Kv, LayerContext, Mlp, RmsNorm};
use crate::linear::Linear;
use crate::load::Loader;
use crate::names::{Dim, LayerTensor, When};
use crate::{LAYER_MODULES, Result};

/// The tensors of one layer: Hugging Face name, llama.cpp's name, shape.
pub(crate) const TENSORS: &[LayerTensor] = &[
    LayerTensor::new("input_layernorm.weight", "attn_norm.weight", &[Dim::Hidden]),
    LayerTensor::new(
        "self_attn.q_proj.weight",
        "attn_q.weight",
        &[Dim::Q, Dim::Hidden],
    ),
    LayerTensor::new(
        "self_attn.k_proj.weight",
        "attn_k.weight",
        &[Dim::Kv, Dim::Hidden],
    ),
    LayerTensor::new(
        "self_attn.v_proj.weight",
        "attn_v.weight",
        &[Dim::Kv, Dim::Hidden],
    ),
    LayerTensor::new("self_attn.q_proj.bias", "attn_q.bias", &[Dim::Q]).when(When::AttentionBias),
    LayerTensor::new("self_attn.k_proj.bias", "attn_k.bias", &[Dim::Kv]).when(When::AttentionBias),
    LayerTensor::new("self_attn.v_proj.bias", "attn_v.bias", &[Dim::Kv]).when(When::AttentionBias),
    LayerTensor::new(
        "self_attn.q_norm.weight",
        "attn_q_norm.weight",
        &[Dim::Head],
    )
    .when(When::QkNorm),
    LayerTensor::new(
        "self_attn.k_norm.weight",
        "attn_k_norm.weight",
        &[Dim::Head],
    )
    .when(When::QkNorm),
    LayerTensor::new(
        "self_attn.o_proj.weight",
        "attn_output.weight",
        &[Dim::Hidden, Dim::Q],
    ),
    LayerTensor::new(
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
        &[Dim::Hidden],
    ),
    LayerTensor::new(
        "mlp.gate_proj.weight",
        "ffn_gate.weight",
        &[Dim::Ffn, Dim::Hidden],
    ),
    LayerTensor::new(
        "mlp.up_proj.weight",
        "ffn_up.weight",
        &[Dim::Ffn, Dim::Hidden],
    ),
    LayerTensor::new(
        "mlp.down_proj.weight",
        "ffn_down.weight",
        &[Dim::Hidden, Dim::Ffn],
    ),
];

#[derive(Debug)]
pub(crate) struct LlamaLayer {
    /// Position in the stack (its modules are numbered from `7 · index`).
    index: usize,
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl LlamaLayer {
    pub(crate) fn load(l: &Loader, index: usize, kind: AttentionKind) -> Result<Self> {
        let cfg = l.cfg;
        let p = format!("model.layers.{index}");
        let qk_norm = |n: &str| -> Result<Option<RmsNorm>> {
            cfg.qk_norm
                .then(|| l.norm(&format!("{p}.self_attn.{n}.weight")))
                .transpose()
        };
        Ok(Self {
            index,
            input_layernorm: l.norm(&format!("{p}.input_layernorm.weight"))?,
            self_attn: Attention {
                q_proj: l.linear(&format!("{p}.self_attn.q_proj"))?,
                k_proj: l.linear(&format!("{p}.self_attn.k_proj"))?,
                v_proj: l.linear(&format!("{p}.self_attn.v_proj"))?,
                o_proj: l.linear(&format!("{p}.self_attn.o_proj"))?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                kind,
            },
            post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm.weight"))?,
            mlp: Mlp {
                gate_proj: l.linear(&format!("{p}.mlp.gate_proj"))?,
                up_proj: l.linear(&format!("{p}.mlp.up_proj"))?,
                down_proj: l.linear(&format!("{p}.mlp.down_proj"))?,
                act: cfg.hidden_act,
            },
        })
    }
}

impl Block for LlamaLayer {
    fn forward(&self, x: &Tensor, ctx: &LayerContext, kv: Kv) -> Result<Tensor> {
        let base = self.index * LAYER_MODULES.len();
        let normed = self.input_layernorm.forward(x, ctx.composed)?;
        let x = (x + self.self_attn.forward(&normed, ctx, base, kv)?)?;
        let normed = self.post_attention_layernorm.forward(&x, ctx.composed)?;
        self.mlp.forward_add(&normed, &x, ctx, base)
    }

    fn linears(&self) -> [&dyn Linear; 7] {
        layers::linears(&self.self_attn, &self.mlp)
    }

    fn linears_mut(&mut self) -> [&mut Box<dyn Linear>; 7] {
        layers::linears_mut(&mut self.self_attn, &mut self.mlp)
    }
}
