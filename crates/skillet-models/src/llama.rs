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
use skillet_kernels::{AttentionMask, CachedSeq, FrozenHead, QuantMatrix, RopeLayout, RopeTable};

use crate::adapter::{Adapter, Adapters, LAYER_MODULES, ModuleInfo, module_names};
use crate::cache::KvCache;
use crate::checkpoint::{self, Checkpointing};
use crate::linear::{Activations, BaseLinear, Linear, Precision, repack};
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
    /// Hold the decoder layers' dense frozen projection weights in bf16
    /// (half the bytes of f32), for training in [`Precision::Bf16`], whose
    /// products round them to bf16 anyway
    /// ([`Precision::holds_base_in_bf16`] says where it pays): every
    /// product of such a layer is then in bf16 (evaluation too), whatever
    /// precision is set. Each weight is rounded as it is loaded, so the
    /// f32 copies never exist together. Quantized weights kept in their
    /// blocks, embeddings, norms and the LM head are unaffected; ignored
    /// with `trainable`.
    pub frozen_bf16: bool,
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
    /// only within their segment.
    pub segments: Option<Vec<u32>>,
    /// The adapters of this call and the rows each applies to.
    pub adapters: Adapters,
}

impl ForwardInput {
    /// Unpadded input: every token real, positions in order.
    pub fn new(ids: Tensor) -> Self {
        Self {
            ids,
            key_mask: None,
            positions: None,
            segments: None,
            adapters: Adapters::none(),
        }
    }
}

/// New tokens of one sequence in a cached (incremental) call.
#[derive(Debug, Clone)]
pub struct CachedChunk {
    /// The cache slot of the sequence; the tokens go after what it holds.
    pub slot: usize,
    /// Token ids (a prompt chunk, or one sampled token).
    pub tokens: Vec<u32>,
    /// Index into [`CachedBatch::adapters`], or the base model.
    pub adapter: Option<usize>,
}

/// A ragged batch for incremental decoding: each sequence brings its own
/// number of new tokens, in its own cache slot, with its own adapter.
#[derive(Debug, Clone, Default)]
pub struct CachedBatch {
    /// One entry per sequence (each slot at most once).
    pub chunks: Vec<CachedChunk>,
    /// The adapters the chunks name.
    pub adapters: Vec<Arc<dyn Adapter>>,
    /// How quantized weights take their inputs.
    pub activations: Activations,
}

/// A causal language model: token ids in, logits for every position out.
pub trait CausalLm: Send + Sync {
    /// The validated hyper-parameters.
    fn config(&self) -> &LlamaConfig;
    /// Final (normed) hidden states `[B, T, C]` for every input position.
    fn forward_hidden(&self, input: &ForwardInput) -> Result<Tensor>;
    /// The output projection of hidden states (`[B, T, C]` or `[N, C]`)
    /// to vocabulary logits, with `adapters` over the leading rows.
    fn head(&self, hidden: &Tensor, adapters: &Adapters) -> Result<Tensor>;
    /// The dense `[V, C]` head weight where the head is exactly `x Wᵀ`
    /// under `adapters` (so the loss may fuse it); a trainable weight is
    /// returned as its variable.
    fn head_weight(&self, adapters: &Adapters) -> Option<Tensor>;
    /// The LM head as a frozen weight for the fused loss, its products in
    /// the precision of training forwards ([`Llama::set_precision`]), when
    /// the head is frozen and not adapted under `adapters` and is not a
    /// dense f32 head (that one is [`CausalLm::head_weight`]).
    fn head_frozen(&self, adapters: &Adapters) -> Result<Option<FrozenHead>> {
        let _ = adapters;
        Ok(None)
    }
    /// Logits `[B, T, V]` for every input position.
    fn forward(&self, input: &ForwardInput) -> Result<Tensor> {
        self.head(&self.forward_hidden(input)?, &input.adapters)
    }
    /// Incremental decoding: appends each chunk's tokens to its cache slot
    /// and returns the logits of each chunk's last token, `[chunks, V]`.
    fn forward_cached(&self, batch: &CachedBatch, cache: &mut KvCache) -> Result<Tensor>;
    /// An empty cache of `slots` sequences of up to `capacity` positions.
    fn new_cache(&self, slots: usize, capacity: usize) -> KvCache {
        let c = self.config();
        KvCache::new(
            c.num_hidden_layers,
            c.num_key_value_heads * c.head_dim,
            slots,
            capacity,
        )
    }
    /// Every adaptable linear layer, in module order (see [`Adapter`]).
    fn modules(&self) -> Vec<ModuleInfo>;
    /// Gradients that checkpointed layers computed during the last
    /// `backward`, as (variable, gradient) pairs, emptied by the call.
    fn take_checkpoint_grads(&self) -> Vec<(Tensor, Tensor)> {
        Vec::new()
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
    /// The mask of a batch without cache (a cached batch masks per sequence).
    mask: Option<AttentionMask>,
    composed: bool,
    adapters: Adapters,
    window: Option<usize>,
    /// An incremental call: every row is computed on its own (see
    /// `Linear::forward_rowwise`), its quantized products with these inputs.
    rowwise: Option<Activations>,
    /// The precision of frozen weights' products otherwise.
    precision: Precision,
}

impl LayerContext {
    /// `lin` over `x`, plus each row's adapter update of `module`.
    fn project(&self, lin: &dyn Linear, module: usize, x: &Tensor) -> Result<Tensor> {
        if self.rowwise.is_none()
            && !self.composed
            && let Some(y) = self.adapters.fused(lin, module, x, self.precision)?
        {
            return Ok(y);
        }
        let y = match self.rowwise {
            Some(activations) => lin.forward_rowwise(x, activations)?,
            None => lin.forward_in(x, self.precision)?,
        };
        self.adapters.add_delta(lin, module, x, y)
    }
}

/// One sequence of a cached batch: its slot, the positions cached before
/// this call, and its new tokens (consecutive in the batch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    slot: usize,
    start: usize,
    len: usize,
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
    fn forward(&self, x: &Tensor, ctx: &LayerContext, base: usize, kv: Kv) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, k, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = ctx
            .project(self.q_proj.as_ref(), base, x)?
            .reshape((b, t, h, d))?; // [B,T,H,D]
        let kk = ctx
            .project(self.k_proj.as_ref(), base + 1, x)?
            .reshape((b, t, k, d))?; // [B,T,K,D]
        let v = ctx
            .project(self.v_proj.as_ref(), base + 2, x)?
            .reshape((b, t, k, d))?; // [B,T,K,D]
        let scale = 1.0 / (d as f32).sqrt();
        // Fused, a fresh batch gets RoPE inside the attention op (no
        // rotated copies kept); otherwise q and k are rotated first.
        let rope_inside = !ctx.composed && matches!((&kv, &ctx.mask), (Kv::Fresh, Some(_)));
        let (q, kk) = match (rope_inside, ctx.composed) {
            (true, _) => (q, kk),
            (false, true) => (
                skillet_kernels::rope_composed(&q, &ctx.rope, RopeLayout::Half)?,
                skillet_kernels::rope_composed(&kk, &ctx.rope, RopeLayout::Half)?,
            ),
            (false, false) => (
                skillet_kernels::rope(&q, &ctx.rope, RopeLayout::Half)?,
                skillet_kernels::rope(&kk, &ctx.rope, RopeLayout::Half)?,
            ),
        };
        let out = match (kv, &ctx.mask) {
            (Kv::Fresh, Some(mask)) if rope_inside => skillet_kernels::attention_rope(
                &q,
                &kk,
                &v,
                mask,
                scale,
                &ctx.rope,
                RopeLayout::Half,
                ctx.precision == Precision::Bf16,
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
                skillet_kernels::cached_attention(&q.squeeze(0)?, k, &seqs, ctx.window, scale)?
            }
            (Kv::Fresh, None) => {
                return Err(ModelError::Input("attention without a mask".into()));
            }
        };
        ctx.project(self.o_proj.as_ref(), base + 3, &out.reshape((b, t, h * d))?)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Box<dyn Linear>,
    up_proj: Box<dyn Linear>,
    down_proj: Box<dyn Linear>,
}

impl Mlp {
    /// `residual + mlp(x)`.
    fn forward(
        &self,
        x: &Tensor,
        residual: &Tensor,
        ctx: &LayerContext,
        base: usize,
    ) -> Result<Tensor> {
        let gate = ctx.project(self.gate_proj.as_ref(), base + 4, x)?;
        let up = ctx.project(self.up_proj.as_ref(), base + 5, x)?;
        let down = base + 6;
        // A frozen, unadapted down projection: gate, product and residual
        // add in one op that keeps no gated product for backward.
        if !ctx.composed
            && ctx.rowwise.is_none()
            && !ctx.adapters.adapts(down)
            && let Some(frozen) = self.down_proj.frozen(ctx.precision)?
        {
            return Ok(skillet_kernels::swiglu_down(&gate, &up, residual, &frozen)?);
        }
        let act = if ctx.composed {
            skillet_kernels::swiglu_composed(&gate, &up)?
        } else {
            skillet_kernels::swiglu(&gate, &up)?
        };
        Ok((residual + ctx.project(self.down_proj.as_ref(), down, &act)?)?)
    }
}

#[derive(Debug)]
pub(crate) struct DecoderLayer {
    /// Position in the stack (its modules are numbered from `7 · index`).
    index: usize,
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    pub(crate) fn forward(&self, x: &Tensor, ctx: &LayerContext, kv: Kv) -> Result<Tensor> {
        let base = self.index * LAYER_MODULES.len();
        let normed = self.input_layernorm.forward(x, ctx.composed)?;
        let x = (x + self.self_attn.forward(&normed, ctx, base, kv)?)?;
        let normed = self.post_attention_layernorm.forward(&x, ctx.composed)?;
        self.mlp.forward(&normed, &x, ctx, base)
    }
}

/// The token embedding: dense (a variable in full fine-tuning), or frozen
/// Q4_1 / Q8_0 blocks whose rows are dequantized as they are looked up.
#[derive(Debug)]
enum Embedding {
    Dense(Tensor),
    Blocks(Arc<QuantMatrix>),
}

impl Embedding {
    /// The rows of `ids` (`[N]`): `[N, C]`.
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(t) => t.index_select(ids, 0)?,
            Embedding::Blocks(q) => {
                let ids = ids.to_vec1::<u32>()?;
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= q.rows()) {
                    return Err(ModelError::Input(format!(
                        "token id {bad} is outside the vocabulary ({})",
                        q.rows()
                    )));
                }
                Tensor::from_vec(q.dequantize_rows(&ids), (ids.len(), q.cols()), &Device::Cpu)?
            }
        })
    }
}

/// A Llama-family model.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<Arc<DecoderLayer>>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
    rope: Rope,
    composed: bool,
    params: Vec<(String, Var)>,
    checkpointing: Option<Arc<Checkpointing>>,
    precision: Precision,
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
                let layer = BaseLinear::new(w, b);
                // An untied head stays f32 for its packed bf16 copy: the
                // fused loss multiplies it three times per chunk of rows,
                // where blocks made from bf16 rows would be made each time.
                Ok(Box::new(
                    if opts.frozen_bf16 && !opts.trainable && prefix != "lm_head" {
                        layer.in_bf16()?
                    } else {
                        layer
                    },
                ))
            };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: dense(name, &[c])?,
                eps: cfg.rms_norm_eps,
            })
        };

        // A frozen embedding in Q4_1 / Q8_0 blocks stays in them (rows are
        // dequantized as they are looked up), and a tied head reads the
        // same blocks.
        let embed_tokens = match (opts.keep_quantized && !opts.trainable)
            .then(|| src.load_checked("model.embed_tokens.weight", &[v, c], true))
            .transpose()?
        {
            Some(Weight::Quantized(q)) => match repack(&q) {
                Some(blocks) => Embedding::Blocks(Arc::new(blocks)),
                None => Embedding::Dense(q.dequantize(&device)?),
            },
            Some(Weight::Dense(t)) => Embedding::Dense(t),
            None => Embedding::Dense(dense("model.embed_tokens.weight", &[v, c])?),
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = cfg.attention_bias;
            layers.push(Arc::new(DecoderLayer {
                index: i,
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
        } else if cfg.tie_word_embeddings
            && let Embedding::Blocks(blocks) = &embed_tokens
        {
            Box::new(BaseLinear::from_blocks(blocks.clone()))
        } else if cfg.tie_word_embeddings && opts.keep_quantized && !opts.trainable {
            // The head reads the embedding's own blocks (decode speed).
            let w = src.load_checked("model.embed_tokens.weight", &[v, c], true)?;
            Box::new(BaseLinear::new(w, None))
        } else if cfg.tie_word_embeddings
            && let Embedding::Dense(t) = &embed_tokens
        {
            Box::new(BaseLinear::new(Weight::Dense(t.clone()), None))
        } else {
            return Err(ModelError::MissingTensor {
                path: src.path().to_path_buf(),
                tensor: src.file_name("lm_head.weight"),
            });
        };
        src.release_pages();
        Ok(Self {
            rope: Rope::new(&cfg),
            composed: opts.composed_ops,
            params: params.into_inner(),
            checkpointing: None,
            precision: Precision::F32,
            cfg,
            embed_tokens,
            layers,
            norm: norm_f,
            lm_head,
        })
    }

    /// Calls `f` with the module name (`model.layers.0.self_attn.q_proj`,
    /// `lm_head`) and a mutable slot of every linear layer, in module
    /// order, so a layer can be replaced (a different base, say).
    pub fn visit_linears_mut(&mut self, mut f: impl FnMut(&str, &mut Box<dyn Linear>)) {
        let names = module_names(self.layers.len());
        let mut names = names.iter();
        for l in self.layers.iter_mut() {
            // Only a live autograd graph of a checkpointed forward shares a
            // layer; layers are replaced before any training step.
            let l = Arc::get_mut(l).expect("a layer is shared by a live autograd graph");
            let a = &mut l.self_attn;
            let slots = [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut l.mlp.gate_proj,
                &mut l.mlp.up_proj,
                &mut l.mlp.down_proj,
            ];
            for slot in slots {
                f(names.next().expect("one name per module"), slot);
            }
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

    /// The precision of the frozen weights' products in [`CausalLm::forward`]
    /// calls (training and scoring; incremental calls keep their own): bf16
    /// is PyTorch autocast's mixed precision. F32 unless set.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    fn check_input(&self, input: &ForwardInput) -> Result<(usize, usize)> {
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
        self.check_ids(&input.ids.flatten_all()?.to_vec1::<u32>()?)?;
        Ok((b, t))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().max() {
            Some(&m) if m as usize >= self.cfg.vocab_size => Err(ModelError::Input(format!(
                "token id {m} is outside the vocabulary ({})",
                self.cfg.vocab_size
            ))),
            _ => Ok(()),
        }
    }

    /// Embeddings of `ids` (`[B, T]`), through every decoder layer, then
    /// the final norm: `[B, T, C]`.
    fn run_layers(
        &self,
        ids: &Tensor,
        ctx: LayerContext,
        mut cached: Option<(&mut KvCache, &[Span])>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ctx = Arc::new(ctx);
        let mut x =
            self.embed_tokens
                .lookup(&ids.flatten_all()?)?
                .reshape((b, t, self.cfg.hidden_size))?; // [B,T,C]
        for (i, layer) in self.layers.iter().enumerate() {
            x = match (&self.checkpointing, cached.as_mut()) {
                (_, Some((cache, spans))) => layer.forward(
                    &x,
                    &ctx,
                    Kv::Cached {
                        cache,
                        layer: i,
                        spans,
                    },
                )?,
                (Some(state), None) => checkpoint::forward(layer, &ctx, state, &x)?,
                (None, None) => layer.forward(&x, &ctx, Kv::Fresh)?,
            };
        }
        self.norm.forward(&x, self.composed) // [B,T,C]
    }

    fn visit_linears(&self, mut f: impl FnMut(&dyn Linear)) {
        for l in &self.layers {
            let a = &l.self_attn;
            for m in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                f(m.as_ref());
            }
            for m in [&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj] {
                f(m.as_ref());
            }
        }
        f(self.lm_head.as_ref());
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn head(&self, hidden: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        adapters.apply(self.lm_head.as_ref(), self.lm_head_module(), hidden)
    }

    fn head_weight(&self, adapters: &Adapters) -> Option<Tensor> {
        if adapters.adapts(self.lm_head_module()) {
            return None;
        }
        self.lm_head.dense_weight()
    }

    fn head_frozen(&self, adapters: &Adapters) -> Result<Option<FrozenHead>> {
        if adapters.adapts(self.lm_head_module()) {
            return Ok(None);
        }
        self.lm_head.frozen_head(self.precision)
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        let mut shapes = Vec::new();
        self.visit_linears(|l| shapes.push((l.in_features(), l.out_features())));
        module_names(self.layers.len())
            .into_iter()
            .zip(shapes)
            .map(|(name, (in_features, out_features))| ModuleInfo {
                name,
                in_features,
                out_features,
            })
            .collect()
    }

    fn take_checkpoint_grads(&self) -> Vec<(Tensor, Tensor)> {
        self.checkpointing
            .as_ref()
            .map(|c| c.take())
            .unwrap_or_default()
    }

    fn forward_hidden(&self, input: &ForwardInput) -> Result<Tensor> {
        let (b, t) = self.check_input(input)?;
        let key_mask = input.key_mask.clone().unwrap_or_else(|| vec![1; b * t]);
        let positions = match &input.positions {
            Some(p) => p.clone(),
            None => (0..b).flat_map(|_| 0..t as u32).collect(),
        };
        let mut mask = AttentionMask::causal(b, t, t)?.with_window(self.cfg.sliding_window);
        if key_mask.contains(&0) {
            mask = mask.with_key_mask(key_mask)?;
        }
        if let Some(segments) = &input.segments {
            mask = mask.with_segments(segments.clone())?;
        }
        let ctx = LayerContext {
            rope: self.rope.table(&positions)?,
            mask: Some(mask),
            composed: self.composed,
            adapters: input.adapters.clone(),
            window: self.cfg.sliding_window,
            rowwise: None,
            precision: self.precision,
        };
        self.run_layers(&input.ids, ctx, None)
    }

    fn forward_cached(&self, batch: &CachedBatch, cache: &mut KvCache) -> Result<Tensor> {
        if batch.chunks.is_empty() {
            return Err(ModelError::Input("an empty batch".into()));
        }
        let mut spans: Vec<Span> = Vec::with_capacity(batch.chunks.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut rows = Vec::new();
        let mut last = Vec::with_capacity(batch.chunks.len());
        for c in &batch.chunks {
            if c.tokens.is_empty() {
                return Err(ModelError::Input(format!(
                    "slot {} brings no tokens",
                    c.slot
                )));
            }
            if spans.iter().any(|s| s.slot == c.slot) {
                return Err(ModelError::Input(format!("slot {} appears twice", c.slot)));
            }
            let start = cache.reserve(c.slot, c.tokens.len())?;
            spans.push(Span {
                slot: c.slot,
                start,
                len: c.tokens.len(),
            });
            ids.extend_from_slice(&c.tokens);
            positions.extend((start..start + c.tokens.len()).map(|p| p as u32));
            rows.extend(std::iter::repeat_n(c.adapter, c.tokens.len()));
            last.push(ids.len() as u32 - 1);
        }
        self.check_ids(&ids)?;
        let adapters = if rows.iter().all(Option::is_none) {
            Adapters::none()
        } else {
            Adapters::per_row(batch.adapters.clone(), rows)?
        };
        let n = ids.len();
        let ctx = LayerContext {
            rope: self.rope.table(&positions)?,
            mask: None,
            composed: self.composed,
            adapters: adapters.clone(),
            window: self.cfg.sliding_window,
            rowwise: Some(batch.activations),
            precision: Precision::F32,
        };
        let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu)?;
        let hidden = self.run_layers(&ids, ctx, Some((cache, &spans)))?; // [1,N,C]
        for s in &spans {
            cache.advance(s.slot, s.len);
        }
        let picked = hidden
            .squeeze(0)?
            .index_select(&Tensor::new(last.as_slice(), &Device::Cpu)?, 0)?; // [chunks,C]
        let head = self.lm_head.as_ref();
        adapters.gather(&last, 1).add_delta(
            head,
            self.lm_head_module(),
            &picked,
            head.forward_rowwise(&picked, batch.activations)?,
        ) // [chunks,V]
    }
}

impl Llama {
    fn lm_head_module(&self) -> usize {
        self.layers.len() * LAYER_MODULES.len()
    }
}
