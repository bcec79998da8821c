//! The parts decoder layers are built from, shared by every architecture:
//! the per-call context, RMSNorm, grouped-query attention with RoPE (and
//! optional QK-norm, window and scale), and the gated MLP; and the
//! [`Block`] trait a decoder layer implements.
//!
//! Notation: B batch, T new tokens, H query heads, K key/value heads,
//! D head width, C model width.

use candle_core::Tensor;
use skillet_kernels::{AttentionMask, CachedSeq, QuantMatrix, RopeLayout, RopeTable};

use crate::adapter::Adapters;
use crate::cache::KvCache;
use crate::linear::{Activations, Linear, Precision};
use crate::load::Loader;
use crate::names::{Dim, LayerTensor, When};
pub(crate) use crate::projection::Normed;
use crate::team_decode::DecodeLayer;
use crate::{Activation, ModelError, Result};

/// The attention's tensors in a layer's name table (after its input norm):
/// Hugging Face name, llama.cpp's name, shape.
pub(crate) const ATTENTION_TENSORS: &[LayerTensor] = &[
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
];

/// The gated MLP's tensors in a layer's name table.
pub(crate) const MLP_TENSORS: &[LayerTensor] = &[
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

/// Per-call inputs every layer shares.
pub(crate) struct LayerContext {
    /// One cos/sin table per RoPE of the model (see [`AttentionKind::rope`]).
    pub ropes: Vec<RopeTable>,
    /// The masks of a batch without cache, full then windowed (a cached
    /// batch masks per sequence).
    pub masks: Vec<AttentionMask>,
    pub composed: bool,
    pub adapters: Adapters,
    /// An incremental call: every row is computed on its own (see
    /// `Linear::forward_rowwise`), its quantized products with these inputs.
    pub rowwise: Option<Activations>,
    /// The precision of frozen weights' products otherwise.
    pub precision: Precision,
}

/// One sequence of a cached batch: its slot, the positions cached before
/// this call, and its new tokens (consecutive in the batch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub slot: usize,
    pub start: usize,
    pub len: usize,
}

/// Where a layer's keys and values come from.
pub(crate) enum Kv<'a> {
    /// This call's tokens alone.
    Fresh,
    /// A ragged batch over cache slots.
    Cached {
        cache: &'a mut KvCache,
        layer: usize,
        spans: &'a [Span],
    },
}

/// A decoder layer of some architecture.
pub(crate) trait Block: Send + Sync + std::fmt::Debug {
    /// The layer's output for input `x` (`[B, T, C]`).
    fn forward(&self, x: &Tensor, ctx: &LayerContext, kv: Kv) -> Result<Tensor>;
    /// Its adaptable linear layers, in `LAYER_MODULES` order.
    fn linears(&self) -> [&dyn Linear; 7];
    /// The same, as replaceable slots.
    fn linears_mut(&mut self) -> [&mut Box<dyn Linear>; 7];
    /// The layer's parts for a decode step run by a team of threads
    /// (`team_decode.rs`), where it is made of what that path runs.
    fn decode_layer(&self) -> Option<DecodeLayer<'_>> {
        None
    }
}

/// RMSNorm (`x / sqrt(mean(x²) + eps) · w`, in f32). Gemma's norms scale
/// by `1 + w`: a frozen weight has the one added at load, a trainable one
/// (whose variable holds the checkpoint's `w`) in every forward.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub add_one: bool,
}

impl RmsNorm {
    /// The weight as the norm multiplies by it (Gemma's with its one
    /// added).
    pub fn values(&self) -> Result<Vec<f32>> {
        let w = match self.add_one {
            true => (&self.weight + 1.0)?,
            false => self.weight.clone(),
        };
        Ok(w.to_vec1::<f32>()?)
    }

    /// The norm as a fused op applies it to its input.
    pub(crate) fn inside(&self) -> Result<skillet_kernels::InputNorm> {
        Ok(skillet_kernels::InputNorm::new(self.values()?, self.eps))
    }

    pub fn forward(&self, x: &Tensor, composed: bool) -> Result<Tensor> {
        let w = match self.add_one {
            true => (&self.weight + 1.0)?,
            false => self.weight.clone(),
        };
        Ok(if composed {
            skillet_kernels::rms_norm_composed(x, &w, self.eps)?
        } else {
            skillet_kernels::rms_norm(x, &w, self.eps)?
        })
    }
}

/// Which RoPE, mask and window a layer's attention uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionKind {
    /// Index into [`LayerContext::ropes`].
    pub rope: usize,
    /// The window; the windowed mask is `LayerContext::masks[1]`.
    pub window: Option<usize>,
    /// The scale of scores.
    pub scale: f32,
}

#[derive(Debug)]
pub(crate) struct Attention {
    pub q_proj: Box<dyn Linear>,
    pub k_proj: Box<dyn Linear>,
    pub v_proj: Box<dyn Linear>,
    pub o_proj: Box<dyn Linear>,
    /// Per-head norms of queries and keys, before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub kind: AttentionKind,
}

impl Attention {
    /// The attention of layer `prefix` (`model.layers.N`), QK-norms where
    /// the config has them.
    pub fn load(l: &Loader, prefix: &str, kind: AttentionKind) -> Result<Self> {
        let cfg = l.cfg;
        let p = format!("{prefix}.self_attn");
        let qk_norm = |n: &str| -> Result<Option<RmsNorm>> {
            cfg.qk_norm
                .then(|| l.norm(&format!("{p}.{n}.weight")))
                .transpose()
        };
        Ok(Self {
            q_proj: l.linear(&format!("{p}.q_proj"))?,
            k_proj: l.linear(&format!("{p}.k_proj"))?,
            v_proj: l.linear(&format!("{p}.v_proj"))?,
            o_proj: l.linear(&format!("{p}.o_proj"))?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            kind,
        })
    }

    /// The q, k, v and o blocks, where all four are quantized blocks
    /// without bias.
    pub fn blocks(&self) -> Option<([&QuantMatrix; 3], &QuantMatrix)> {
        let b = blocks_of;
        Some((
            [b(&*self.q_proj)?, b(&*self.k_proj)?, b(&*self.v_proj)?],
            b(&*self.o_proj)?,
        ))
    }

    /// Modules `base .. base + 4` are q, k, v, o.
    pub fn forward(&self, x: Normed, ctx: &LayerContext, base: usize, kv: Kv) -> Result<Tensor> {
        self.forward_then(x, ctx, base, kv, None)
    }

    /// `residual + forward(x)`, the output projection and the add in one
    /// op where it can be (see [`LayerContext::project_add`]).
    pub fn forward_add(
        &self,
        x: Normed,
        residual: &Tensor,
        ctx: &LayerContext,
        base: usize,
        kv: Kv,
    ) -> Result<Tensor> {
        self.forward_then(x, ctx, base, kv, Some(residual))
    }

    /// The attention, its output projection and, where given, the
    /// residual added.
    fn forward_then(
        &self,
        x: Normed,
        ctx: &LayerContext,
        base: usize,
        kv: Kv,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let project = |out: &Tensor| ctx.project_add(self.o_proj.as_ref(), base + 3, out, residual);
        let (b, t, _) = x.rows.dims3()?;
        let (h, k, d) = (self.heads, self.kv_heads, self.head_dim);
        let lins = [
            self.q_proj.as_ref(),
            self.k_proj.as_ref(),
            self.v_proj.as_ref(),
        ];
        let modules = [base, base + 1, base + 2];
        let rope = &ctx.ropes[self.kind.rope];
        let scale = self.kind.scale;
        let mask = ctx.masks.get(usize::from(self.kind.window.is_some()));
        let bf16 = ctx.precision == Precision::Bf16;
        // Fused, a fresh batch gets RoPE inside the attention op (no
        // rotated copies kept); otherwise q and k are rotated first.
        let rope_inside = !ctx.composed && matches!((&kv, mask), (Kv::Fresh, Some(_)));
        // With no per-head norms, the op takes the projections' rows and
        // gives the output projection its rows: no reshape nodes, each of
        // which backward would pay a gradient copy.
        if let (true, None, None, Some(mask)) = (rope_inside, &self.q_norm, &self.k_norm, mask) {
            // Where a projection is adapted and all take the norm inside,
            // the attention makes its own q, k and v: it keeps them for
            // backward (in bf16 on the tiles) instead of the graph in f32,
            // and `h` gets one gradient.
            if let Some((projections, norm)) = ctx.adapted_normed(lins, modules, x)? {
                let out = skillet_kernels::projected_attention(
                    x.rows,
                    &norm,
                    &projections,
                    d,
                    mask,
                    scale,
                    (rope, RopeLayout::Half),
                    bf16,
                )?;
                return project(&out);
            }
            let [q, kk, v] = ctx.project_each(lins, modules, x)?;
            let rows = [&q, &kk, &v];
            let out = skillet_kernels::attention_rope_rows(
                rows,
                d,
                mask,
                scale,
                rope,
                RopeLayout::Half,
                bf16,
            )?;
            return project(&out);
        }
        let [q, kk, v] = ctx.project_each(lins, modules, x)?;
        let mut q = q.reshape((b, t, h, d))?; // [B,T,H,D]
        let mut kk = kk.reshape((b, t, k, d))?; // [B,T,K,D]
        let v = v.reshape((b, t, k, d))?; // [B,T,K,D]
        if let Some(norm) = &self.q_norm {
            q = norm.forward(&q, ctx.composed)?;
        }
        if let Some(norm) = &self.k_norm {
            kk = norm.forward(&kk, ctx.composed)?;
        }
        let (q, kk) = match (rope_inside, ctx.composed) {
            (true, _) => (q, kk),
            (false, true) => (
                skillet_kernels::rope_composed(&q, rope, RopeLayout::Half)?,
                skillet_kernels::rope_composed(&kk, rope, RopeLayout::Half)?,
            ),
            (false, false) => (
                skillet_kernels::rope(&q, rope, RopeLayout::Half)?,
                skillet_kernels::rope(&kk, rope, RopeLayout::Half)?,
            ),
        };
        let out = match (kv, mask) {
            (Kv::Fresh, Some(mask)) if rope_inside => skillet_kernels::attention_rope(
                &q,
                &kk,
                &v,
                mask,
                scale,
                rope,
                RopeLayout::Half,
                bf16,
            )?,
            (Kv::Fresh, Some(mask)) => {
                skillet_kernels::attention_composed(&q, &kk, &v, mask, scale)?
            }
            (
                Kv::Cached {
                    cache,
                    layer,
                    spans,
                },
                _,
            ) => {
                // One row of all sequences' new tokens: [1,N,·,D].
                let kr = kk.flatten_all()?.to_vec1::<f32>()?;
                let vr = v.flatten_all()?.to_vec1::<f32>()?;
                let w = k * d;
                let mut row = 0;
                for s in spans {
                    let r = row * w..(row + s.len) * w;
                    cache.write(layer, s.slot, s.start, &kr[r.clone()], &vr[r]);
                    row += s.len;
                }
                let seqs: Vec<CachedSeq> = spans
                    .iter()
                    .map(|s| {
                        let (k, v) = cache.layer(layer, s.slot);
                        CachedSeq {
                            k,
                            v,
                            start: s.start,
                            len: s.len,
                        }
                    })
                    .collect();
                skillet_kernels::cached_attention(
                    &q.squeeze(0)?,
                    k,
                    &seqs,
                    self.kind.window,
                    scale,
                )?
            }
            (Kv::Fresh, None) => {
                return Err(ModelError::Input("attention without a mask".into()));
            }
        };
        project(&out.reshape((b, t, h * d))?)
    }
}

/// The gated MLP: `down(act(gate(x)) ∘ up(x))`.
#[derive(Debug)]
pub(crate) struct Mlp {
    pub gate_proj: Box<dyn Linear>,
    pub up_proj: Box<dyn Linear>,
    pub down_proj: Box<dyn Linear>,
    pub act: Activation,
}

impl Mlp {
    /// The MLP of layer `prefix` (`model.layers.N`).
    pub fn load(l: &Loader, prefix: &str) -> Result<Self> {
        Ok(Self {
            gate_proj: l.linear(&format!("{prefix}.mlp.gate_proj"))?,
            up_proj: l.linear(&format!("{prefix}.mlp.up_proj"))?,
            down_proj: l.linear(&format!("{prefix}.mlp.down_proj"))?,
            act: l.cfg.hidden_act,
        })
    }

    /// The gate, up and down blocks, where all three are quantized blocks
    /// without bias.
    pub fn blocks(&self) -> Option<([&QuantMatrix; 2], &QuantMatrix)> {
        let b = blocks_of;
        Some((
            [b(&*self.gate_proj)?, b(&*self.up_proj)?],
            b(&*self.down_proj)?,
        ))
    }

    /// `residual + mlp(x)`; modules `base + 4 .. base + 7` are gate, up,
    /// down.
    pub fn forward_add(
        &self,
        x: Normed,
        residual: &Tensor,
        ctx: &LayerContext,
        base: usize,
    ) -> Result<Tensor> {
        let down = base + 6;
        // A frozen, unadapted down projection after SwiGLU: gate, product
        // and residual add in one op that keeps no gated product for
        // backward; with frozen gate and up projections over the residual
        // stream itself, the whole block in one op (`h` then gets one
        // gradient, not three).
        if self.act == Activation::Silu
            && !ctx.composed
            && ctx.rowwise.is_none()
            && !ctx.adapters.adapts(down)
            && let Some(frozen) = self.down_proj.frozen(ctx.precision)?
        {
            let lins = [self.gate_proj.as_ref(), self.up_proj.as_ref()];
            if x.rows.id() == residual.id()
                && let Some(([gate, up], norm)) =
                    ctx.frozen_normed(lins, [base + 4, base + 5], x)?
            {
                let mlp = skillet_kernels::FrozenMlp {
                    gate,
                    up,
                    down: frozen,
                };
                return Ok(skillet_kernels::frozen_mlp_add(x.rows, &norm, &mlp)?);
            }
            let [gate, up] = self.gate_up(x, ctx, base)?;
            return Ok(skillet_kernels::swiglu_down(&gate, &up, residual, &frozen)?);
        }
        let [gate, up] = self.gate_up(x, ctx, base)?;
        self.down(&gate, &up, ctx, down, Some(residual))
    }

    /// The gate and up projections (modules `base + 4`, `base + 5`).
    fn gate_up(&self, x: Normed, ctx: &LayerContext, base: usize) -> Result<[Tensor; 2]> {
        let lins = [self.gate_proj.as_ref(), self.up_proj.as_ref()];
        ctx.project_each(lins, [base + 4, base + 5], x)
    }

    /// `mlp(x)` alone (a norm follows it in Gemma).
    pub fn forward(&self, x: Normed, ctx: &LayerContext, base: usize) -> Result<Tensor> {
        let [gate, up] = self.gate_up(x, ctx, base)?;
        self.down(&gate, &up, ctx, base + 6, None)
    }

    /// The activation, the down projection and, where given, the residual
    /// added (in one op with the projection where it can be, see
    /// [`LayerContext::project_add`]).
    fn down(
        &self,
        gate: &Tensor,
        up: &Tensor,
        ctx: &LayerContext,
        module: usize,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let act = match (self.act, ctx.composed) {
            (Activation::Silu, true) => skillet_kernels::swiglu_composed(gate, up)?,
            (Activation::Silu, false) => skillet_kernels::swiglu(gate, up)?,
            // candle's `gelu` is the tanh form, with its backward.
            (Activation::GeluTanh, _) => (gate.gelu()? * up)?,
        };
        ctx.project_add(self.down_proj.as_ref(), module, &act, residual)
    }
}

/// A layer's quantized blocks, where it is one without bias.
fn blocks_of(l: &dyn Linear) -> Option<&QuantMatrix> {
    l.quant_blocks().map(|w| w.as_ref())
}

/// The linear layers of an attention and an MLP, in `LAYER_MODULES` order.
pub(crate) fn linears<'a>(a: &'a Attention, m: &'a Mlp) -> [&'a dyn Linear; 7] {
    [
        a.q_proj.as_ref(),
        a.k_proj.as_ref(),
        a.v_proj.as_ref(),
        a.o_proj.as_ref(),
        m.gate_proj.as_ref(),
        m.up_proj.as_ref(),
        m.down_proj.as_ref(),
    ]
}

/// The same, as replaceable slots.
pub(crate) fn linears_mut<'a>(
    a: &'a mut Attention,
    m: &'a mut Mlp,
) -> [&'a mut Box<dyn Linear>; 7] {
    [
        &mut a.q_proj,
        &mut a.k_proj,
        &mut a.v_proj,
        &mut a.o_proj,
        &mut m.gate_proj,
        &mut m.up_proj,
        &mut m.down_proj,
    ]
}
