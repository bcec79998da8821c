//! The Llama-family decoder layer (Llama, SmolLM, Mistral, Qwen2, Qwen3),
//! following transformers' `modeling_llama.py`: RMSNorm → GQA attention
//! with RoPE → residual, RMSNorm → SwiGLU MLP → residual. Qwen2 adds bias
//! to q/k/v, Qwen3 an RMSNorm on each query and key head (`modeling_qwen3.py`),
//! Mistral a sliding window; the rest is shared.

use candle_core::Tensor;

use crate::layers::{
    self, ATTENTION_TENSORS, Attention, AttentionKind, Block, Kv, LayerContext, MLP_TENSORS, Mlp,
    Normed, RmsNorm,
};
use crate::linear::Linear;
use crate::load::Loader;
use crate::names::{Dim, LayerTensor};
use crate::team_decode::DecodeLayer;
use crate::{LAYER_MODULES, Result};

/// The tensors of one layer, in checkpoint order.
pub(crate) const TENSORS: &[&[LayerTensor]] = &[
    &[LayerTensor::new(
        "input_layernorm.weight",
        "attn_norm.weight",
        &[Dim::Hidden],
    )],
    ATTENTION_TENSORS,
    &[LayerTensor::new(
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
        &[Dim::Hidden],
    )],
    MLP_TENSORS,
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
        let p = format!("model.layers.{index}");
        Ok(Self {
            index,
            input_layernorm: l.norm(&format!("{p}.input_layernorm.weight"))?,
            self_attn: Attention::load(l, &p, kind)?,
            post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm.weight"))?,
            mlp: Mlp::load(l, &p)?,
        })
    }
}

impl Block for LlamaLayer {
    fn forward(&self, x: &Tensor, ctx: &LayerContext, kv: Kv) -> Result<Tensor> {
        let base = self.index * LAYER_MODULES.len();
        let normed = Normed {
            rows: x,
            norm: &self.input_layernorm,
        };
        let x = self.self_attn.forward_add(normed, x, ctx, base, kv)?;
        let normed = Normed {
            rows: &x,
            norm: &self.post_attention_layernorm,
        };
        self.mlp.forward_add(normed, &x, ctx, base)
    }

    fn linears(&self) -> [&dyn Linear; 7] {
        layers::linears(&self.self_attn, &self.mlp)
    }

    fn linears_mut(&mut self) -> [&mut Box<dyn Linear>; 7] {
        layers::linears_mut(&mut self.self_attn, &mut self.mlp)
    }

    fn decode_layer(&self) -> Option<DecodeLayer<'_>> {
        DecodeLayer::new(
            [&self.input_layernorm, &self.post_attention_layernorm],
            &self.self_attn,
            &self.mlp,
            None,
        )
    }
}
