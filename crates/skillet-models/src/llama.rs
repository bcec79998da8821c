//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM), one
//! implementation for every weight source. Follows transformers'
//! `modeling_llama.py`: pre-norm blocks of RMSNorm → GQA attention with
//! RoPE → RMSNorm → SwiGLU MLP, final RMSNorm and LM head.
//!
//! Notation: B batch, T new tokens, S keys (cached + new), H query heads,
//! K key/value heads, G = H / K, D head width, C model width, V vocabulary.
//! Norms, RoPE, attention and the SwiGLU gate are the fused ops of
//! `skillet-kernels` (each with its closed-form backward); the composed
//! candle versions stay selectable as the reference they are tested against.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use skillet_kernels::{AttentionMask, RopeLayout, RopeTable};

use crate::cache::KvCache;
use crate::checkpoint::{self, Checkpointing};
use crate::linear::{BaseLinear, Linear};
use crate::rope::Rope;
use crate::{LlamaConfig, ModelError, Result, Weight, WeightSource};

/// Options for building a model from a weight source.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Keep GGML-quantized projection weights quantized (dequantized on the
    /// fly in each matmul) instead of dequantizing them once at load. Saves
    /// memory; embeddings and norms are always f32.
    pub keep_quantized: bool,
    /// Run norms, RoPE, attention and the MLP gate as composed candle ops
    /// instead of the fused kernels: slower and hungrier, kept as the
    /// reference for tests.
    pub composed_ops: bool,
    /// Load every weight as a trainable variable (full fine-tuning):
    /// projections, norms and embeddings, the tied head sharing the
    /// embedding's variable. Quantized weights are dequantized.
    pub trainable: bool,
}

/// One forward call's input.
#[derive(Debug, Clone)]
pub struct ForwardInput {
    /// Token ids, `[B, T]` u32.
    pub ids: Tensor,
    /// `[B, T]` row-major, 1 for real tokens and 0 for padding; `None` means
    /// all real. Padded keys are never attended to.
    pub key_mask: Option<Vec<u8>>,
    /// `[B, T]` row-major RoPE positions; `None` means `cache_len + t`.
    pub positions: Option<Vec<u32>>,
    /// `[B, T]` row-major segment ids for packed sequences: tokens attend
    /// only within their segment. Not allowed with a cache.
    pub segments: Option<Vec<u32>>,
}

impl ForwardInput {
    /// Unpadded input: every token real, positions in order.
    pub fn new(ids: Tensor) -> Self {
        Self {
            ids,
            key_mask: None,
            positions: None,
            segments: None,
        }
    }
}

/// A causal language model: token ids in, logits for every position out.
pub trait CausalLm: Send + Sync {
    /// The validated hyper-parameters.
    fn config(&self) -> &LlamaConfig;
    /// Final (normed) hidden states `[B, T, C]` for every input position.
    /// With a cache, the new tokens attend to the cached ones and are
    /// appended to the cache.
    fn forward_hidden(&self, input: &ForwardInput, cache: Option<&mut KvCache>) -> Result<Tensor>;
    /// The output projection from hidden states to vocabulary logits.
    fn lm_head(&self) -> &dyn Linear;
    /// Logits `[B, T, V]` for every input position (see `forward_hidden`).
    fn forward(&self, input: &ForwardInput, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.lm_head().forward(&self.forward_hidden(input, cache)?)
    }
    /// Gradients that checkpointed layers computed during the last
    /// `backward`, as (variable, gradient) pairs, emptied by the call.
    fn take_checkpoint_grads(&self) -> Vec<(Tensor, Tensor)> {
        Vec::new()
    }
    /// An empty cache for `batch` sequences.
    fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.config().num_hidden_layers, batch)
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `x / sqrt(mean(x²) + eps) * weight`, computed in f32.
    fn forward(&self, x: &Tensor, composed: bool) -> Result<Tensor> {
        Ok(if composed {
            skillet_kernels::rms_norm_composed(x, &self.weight, self.eps)?
        } else {
            skillet_kernels::rms_norm(x, &self.weight, self.eps)?
        })
    }
}

/// Per-call inputs every layer shares.
pub(crate) struct LayerContext {
    rope: RopeTable,
    mask: AttentionMask,
    composed: bool,
}

#[derive(Debug)]
struct Attention {
    q_proj: Box<dyn Linear>,
    k_proj: Box<dyn Linear>,
    v_proj: Box<dyn Linear>,
    o_proj: Box<dyn Linear>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, k, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((b, t, h, d))?; // [B,T,H,D]
        let kk = self.k_proj.forward(x)?.reshape((b, t, k, d))?; // [B,T,K,D]
        let v = self.v_proj.forward(x)?.reshape((b, t, k, d))?; // [B,T,K,D]
        let rope = if ctx.composed {
            skillet_kernels::rope_composed
        } else {
            skillet_kernels::rope
        };
        let q = rope(&q, &ctx.rope, RopeLayout::Half)?;
        let kk = rope(&kk, &ctx.rope, RopeLayout::Half)?;
        let (kk, v) = match cache {
            Some(slot) => {
                let (kk, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &kk], 1)?, Tensor::cat(&[&pv, &v], 1)?),
                    None => (kk, v),
                };
                *slot = Some((kk.clone(), v.clone()));
                (kk, v)
            }
            None => (kk, v),
        }; // [B,S,K,D]
        let scale = 1.0 / (d as f32).sqrt();
        let attend = if ctx.composed {
            skillet_kernels::attention_composed
        } else {
            skillet_kernels::attention
        };
        let out = attend(&q, &kk, &v, &ctx.mask, scale)?; // [B,T,H,D]
        self.o_proj.forward(&out.reshape((b, t, h * d))?)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Box<dyn Linear>,
    up_proj: Box<dyn Linear>,
    down_proj: Box<dyn Linear>,
}

impl Mlp {
    fn forward(&self, x: &Tensor, composed: bool) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        let act = if composed {
            skillet_kernels::swiglu_composed(&gate, &up)?
        } else {
            skillet_kernels::swiglu(&gate, &up)?
        };
        self.down_proj.forward(&act)
    }
}

#[derive(Debug)]
pub(crate) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(x, ctx.composed)?;
        let x = (x + self.self_attn.forward(&normed, ctx, cache)?)?;
        let normed = self.post_attention_layernorm.forward(&x, ctx.composed)?;
        Ok((&x + self.mlp.forward(&normed, ctx.composed)?)?)
    }
}

/// A Llama-family model.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Arc<DecoderLayer>>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
    rope: Rope,
    composed: bool,
    params: Vec<(String, Var)>,
    checkpointing: Option<Arc<Checkpointing>>,
}

impl Llama {
    /// Builds the model from `src`, checking every tensor's presence and shape.
    pub fn load(cfg: LlamaConfig, src: &dyn WeightSource, opts: LoadOptions) -> Result<Self> {
        let device = Device::Cpu;
        let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qd, kvd) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let params: RefCell<Vec<(String, Var)>> = RefCell::new(Vec::new());
        let make_var = |name: &str, t: Tensor| -> Result<Tensor> {
            if !opts.trainable {
                return Ok(t);
            }
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            params.borrow_mut().push((name.to_string(), var));
            Ok(t)
        };
        let dense = |name: &str, shape: &[usize]| -> Result<Tensor> {
            make_var(
                name,
                src.load_checked(name, shape, false)?.to_dense(&device)?,
            )
        };
        let linear =
            |prefix: &str, out: usize, inp: usize, bias: bool| -> Result<Box<dyn Linear>> {
                let name = format!("{prefix}.weight");
                let mut w =
                    src.load_checked(&name, &[out, inp], opts.keep_quantized && !opts.trainable)?;
                if opts.trainable {
                    w = Weight::Dense(make_var(&name, w.to_dense(&device)?)?);
                }
                let b = if bias {
                    Some(dense(&format!("{prefix}.bias"), &[out])?)
                } else {
                    None
                };
                Ok(Box::new(BaseLinear::new(w, b)))
            };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: dense(name, &[c])?,
                eps: cfg.rms_norm_eps,
            })
        };

        let embed_tokens = dense("model.embed_tokens.weight", &[v, c])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = cfg.attention_bias;
            layers.push(Arc::new(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), qd, c, ab)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"), kvd, c, ab)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"), kvd, c, ab)?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj"), c, qd, false)?,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_key_value_heads,
                    head_dim: cfg.head_dim,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: linear(&format!("{p}.mlp.gate_proj"), f, c, false)?,
                    up_proj: linear(&format!("{p}.mlp.up_proj"), f, c, false)?,
                    down_proj: linear(&format!("{p}.mlp.down_proj"), c, f, false)?,
                },
            }));
        }
        let norm_f = norm("model.norm.weight")?;
        // A checkpoint may say "tied" yet still carry lm_head (transformers
        // writes it for some models); an untied one must carry it.
        let lm_head: Box<dyn Linear> = if src.contains("lm_head.weight") {
            linear("lm_head", v, c, false)?
        } else if cfg.tie_word_embeddings && opts.keep_quantized && !opts.trainable {
            // The head reads the embedding's own blocks (decode speed).
            let w = src.load_checked("model.embed_tokens.weight", &[v, c], true)?;
            Box::new(BaseLinear::new(w, None))
        } else if cfg.tie_word_embeddings {
            Box::new(BaseLinear::new(Weight::Dense(embed_tokens.clone()), None))
        } else {
            return Err(ModelError::MissingTensor {
                path: src.path().to_path_buf(),
                tensor: src.file_name("lm_head.weight"),
            });
        };
        Ok(Self {
            rope: Rope::new(&cfg),
            composed: opts.composed_ops,
            params: params.into_inner(),
            checkpointing: None,
            cfg,
            embed_tokens,
            layers,
            norm: norm_f,
            lm_head,
        })
    }

    /// Calls `f` with the module name (`model.layers.0.self_attn.q_proj`,
    /// `lm_head`) and a mutable slot of every linear layer, so adapters can
    /// wrap or replace them.
    pub fn visit_linears_mut(&mut self, mut f: impl FnMut(&str, &mut Box<dyn Linear>)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            // Only a live autograd graph of a checkpointed forward shares a
            // layer; adapters are applied before any training step.
            let l = Arc::get_mut(l).expect("a layer is shared by a live autograd graph");
            let a = &mut l.self_attn;
            f(&format!("{p}.self_attn.q_proj"), &mut a.q_proj);
            f(&format!("{p}.self_attn.k_proj"), &mut a.k_proj);
            f(&format!("{p}.self_attn.v_proj"), &mut a.v_proj);
            f(&format!("{p}.self_attn.o_proj"), &mut a.o_proj);
            f(&format!("{p}.mlp.gate_proj"), &mut l.mlp.gate_proj);
            f(&format!("{p}.mlp.up_proj"), &mut l.mlp.up_proj);
            f(&format!("{p}.mlp.down_proj"), &mut l.mlp.down_proj);
        }
        f("lm_head", &mut self.lm_head);
    }

    /// Every weight as a named variable (checkpoint names) when loaded with
    /// `LoadOptions::trainable`; empty otherwise. A tied head appears once,
    /// as the embedding.
    pub fn parameters(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Activation checkpointing: with `Some(vars)` (the trainable
    /// variables), each layer keeps only its input for backward and runs
    /// its forward again there, trading about a third more compute for most
    /// of the activation memory. The layers' gradients of `vars` then come
    /// from [`CausalLm::take_checkpoint_grads`] after `backward`. `None`
    /// turns it off.
    pub fn set_activation_checkpointing(&mut self, vars: Option<Vec<Var>>) {
        self.checkpointing = vars.map(|v| Arc::new(Checkpointing::new(v)));
    }

    /// The token embedding matrix `[V, C]`.
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    fn check_input(&self, input: &ForwardInput, cache: Option<&KvCache>) -> Result<(usize, usize)> {
        let (b, t) = input.ids.dims2().map_err(|_| {
            ModelError::Input(format!(
                "ids must be [batch, seq], got {:?}",
                input.ids.dims()
            ))
        })?;
        if t == 0 {
            return Err(ModelError::Input("empty sequence".into()));
        }
        if input.ids.dtype() != DType::U32 {
            return Err(ModelError::Input(format!(
                "ids must be u32, got {:?}",
                input.ids.dtype()
            )));
        }
        for (what, len) in [
            ("key_mask", input.key_mask.as_ref().map(Vec::len)),
            ("positions", input.positions.as_ref().map(Vec::len)),
            ("segments", input.segments.as_ref().map(Vec::len)),
        ] {
            if let Some(len) = len
                && len != b * t
            {
                return Err(ModelError::Input(format!(
                    "{what} has {len} entries, expected {}",
                    b * t
                )));
            }
        }
        if let Some(c) = cache
            && c.batch() != b
        {
            return Err(ModelError::Input(format!(
                "cache is for batch {}, input has {b}",
                c.batch()
            )));
        }
        let max_id = input.ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max_id} is outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        Ok((b, t))
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn lm_head(&self) -> &dyn Linear {
        self.lm_head.as_ref()
    }

    fn take_checkpoint_grads(&self) -> Vec<(Tensor, Tensor)> {
        self.checkpointing
            .as_ref()
            .map(|c| c.take())
            .unwrap_or_default()
    }

    fn forward_hidden(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = self.check_input(input, cache.as_deref())?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let chunk_mask = input.key_mask.clone().unwrap_or_else(|| vec![1; b * t]);
        let positions = match &input.positions {
            Some(p) => p.clone(),
            None => (0..b)
                .flat_map(|_| (0..t).map(|i| (offset + i) as u32))
                .collect(),
        };
        let key_mask = match cache.as_deref_mut() {
            Some(c) => {
                c.extend_mask(&chunk_mask, t);
                c.key_mask.clone()
            }
            None => chunk_mask,
        };
        let mut mask =
            AttentionMask::causal(b, t, offset + t)?.with_window(self.cfg.sliding_window);
        if key_mask.contains(&0) {
            mask = mask.with_key_mask(key_mask)?;
        }
        if let Some(segments) = &input.segments {
            if offset != 0 {
                return Err(ModelError::Input(
                    "segments cannot be used with a cache".into(),
                ));
            }
            mask = mask.with_segments(segments.clone())?;
        }
        let rope = self.rope.table(&positions)?;
        let ctx = Arc::new(LayerContext {
            rope,
            mask,
            composed: self.composed,
        });

        let mut x = self
            .embed_tokens
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?; // [B,T,C]
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = match (&self.checkpointing, slot) {
                (Some(state), None) => checkpoint::forward(layer, &ctx, state, &x)?,
                (_, slot) => layer.forward(&x, &ctx, slot)?,
            };
        }
        self.norm.forward(&x, self.composed) // [B,T,C]
    }
}
