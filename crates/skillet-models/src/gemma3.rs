//! Gemma 3's decoder layer (text model), following transformers'
//! `modeling_gemma3.py`: a norm before and after each sublayer, all of
//! them `x̂ · (1 + w)`; QK-norm; a GeGLU MLP (tanh GELU); attention scaled
//! by `query_pre_attn_scalar^-1/2`; five local (sliding-window, local
//! RoPE base) layers to each global one. The embedding's scaling by
//! √hidden and the final soft-capping are the decoder's (`decoder.rs`).

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

/// The tensors of one layer, in checkpoint order. The norm after
/// attention has a name of its own in GGUF; the one before the MLP takes
/// llama.cpp's `ffn_norm`.
pub(crate) const TENSORS: &[&[LayerTensor]] = &[
    &[LayerTensor::new(
        "input_layernorm.weight",
        "attn_norm.weight",
        &[Dim::Hidden],
    )],
    ATTENTION_TENSORS,
    &[
        LayerTensor::new(
            "post_attention_layernorm.weight",
            "post_attention_norm.weight",
            &[Dim::Hidden],
        ),
        LayerTensor::new(
            "pre_feedforward_layernorm.weight",
            "ffn_norm.weight",
            &[Dim::Hidden],
        ),
    ],
    MLP_TENSORS,
    &[LayerTensor::new(
        "post_feedforward_layernorm.weight",
        "post_ffw_norm.weight",
        &[Dim::Hidden],
    )],
];

#[derive(Debug)]
pub(crate) struct Gemma3Layer {
    /// Position in the stack (its modules are numbered from `7 · index`).
    index: usize,
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
}

impl Gemma3Layer {
    pub(crate) fn load(l: &Loader, index: usize, kind: AttentionKind) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let norm = |n: &str| l.norm(&format!("{p}.{n}.weight"));
        Ok(Self {
            index,
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(l, &p, kind)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::load(l, &p)?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
        })
    }
}

impl Block for Gemma3Layer {
    fn forward(&self, x: &Tensor, ctx: &LayerContext, kv: Kv) -> Result<Tensor> {
        let base = self.index * LAYER_MODULES.len();
        let c = ctx.composed;
        let h = Normed {
            rows: x,
            norm: &self.input_layernorm,
        };
        let h = self.self_attn.forward(h, ctx, base, kv)?;
        let x = (x + self.post_attention_layernorm.forward(&h, c)?)?;
        let h = Normed {
            rows: &x,
            norm: &self.pre_feedforward_layernorm,
        };
        let h = self.mlp.forward(h, ctx, base)?;
        Ok((x + self.post_feedforward_layernorm.forward(&h, c)?)?)
    }

    fn linears(&self) -> [&dyn Linear; 7] {
        layers::linears(&self.self_attn, &self.mlp)
    }

    fn linears_mut(&mut self) -> [&mut Box<dyn Linear>; 7] {
        layers::linears_mut(&mut self.self_attn, &mut self.mlp)
    }

    fn decode_layer(&self) -> Option<DecodeLayer<'_>> {
        DecodeLayer::new(
            [&self.input_layernorm, &self.pre_feedforward_layernorm],
            &self.self_attn,
            &self.mlp,
            Some([
                &self.post_attention_layernorm,
                &self.post_feedforward_layernorm,
            ]),
        )
    }
}
