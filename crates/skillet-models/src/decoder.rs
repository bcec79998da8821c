//! A decoder-only language model of any supported architecture, one
//! implementation for every weight source: token embedding, a stack of
//! the architecture's decoder layers ([`Block`]), final RMSNorm and LM
//! head. Everything around the layers — input checks, masks, RoPE tables,
//! the KV cache, adapters per row, activation checkpointing, the head — is
//! here once.
//!
//! Notation: B batch, T new tokens, C model width, V vocabulary.
//! Norms, RoPE, attention and the SwiGLU gate are the fused ops of
//! `skillet-kernels` (each with its closed-form backward); the composed
//! candle versions stay selectable as the reference they are tested against.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use skillet_kernels::{AttentionMask, FrozenHead, QuantMatrix};

use crate::adapter::{Adapters, LAYER_MODULES, ModuleInfo, module_names};
use crate::cache::KvCache;
use crate::checkpoint::{self, Checkpointing};
use crate::config::RopeConfig;
use crate::gemma3::Gemma3Layer;
use crate::layers::{AttentionKind, Block, Kv, LayerContext, RmsNorm, Span};
use crate::linear::{Activations, BaseLinear, Linear, Precision, repack};
use crate::llama::LlamaLayer;
use crate::load::Loader;
use crate::rope::Rope;
use crate::team_decode::{self, DecodeInput, DecodeLayer, InputMode, TEAM_ROWS};
use crate::{
    Architecture, CachedBatch, CausalLm, DenseHead, ForwardInput, LoadOptions, ModelConfig,
    ModelError, Result, Weight, WeightSource,
};

/// The token embedding: dense (a variable in full fine-tuning), or frozen
/// blocks Skillet reads (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, repacked at load)
/// whose rows are dequantized as they are looked up.
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

/// A decoder-only language model.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    /// Gemma multiplies embeddings by √hidden (in the weights' dtype).
    embed_scale: Option<f64>,
    layers: Vec<Arc<dyn Block>>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
    /// The distinct RoPEs of the layers (see [`AttentionKind::rope`]).
    ropes: Vec<Rope>,
    composed: bool,
    params: Vec<(String, Var)>,
    frozen: Vec<(String, Tensor)>,
    checkpointing: Option<Arc<Checkpointing>>,
    precision: Precision,
    /// Whether incremental calls may run in one team of threads
    /// (`team_decode.rs`).
    team_decode: bool,
}

impl Model {
    /// Builds the model from `src`, checking every tensor's presence and
    /// shape against the architecture's name table.
    pub fn load(cfg: ModelConfig, src: &dyn WeightSource, opts: LoadOptions) -> Result<Self> {
        Self::load_freezing(cfg, src, opts, &|_| false)
    }

    /// [`Model::load`], where with `opts.trainable` the weights whose names
    /// `frozen` picks stay plain tensors: no gradient is taken for them
    /// ([`Model::frozen_parameters`] lists them). A tied head shares its
    /// embedding's fate.
    pub fn load_freezing(
        cfg: ModelConfig,
        src: &dyn WeightSource,
        opts: LoadOptions,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let l = Loader::new(&cfg, src, opts).freezing(frozen);
        let embed_name = "model.embed_tokens.weight";
        // A frozen embedding in blocks Skillet reads stays in them (rows are
        // dequantized as they are looked up), and a tied head reads the
        // same blocks.
        let embed_tokens = match (opts.keep_quantized && !opts.trainable)
            .then(|| l.weight(embed_name, true))
            .transpose()?
        {
            Some(Weight::Quantized(q)) => match repack(&q) {
                Some(blocks) => Embedding::Blocks(Arc::new(blocks)),
                None => Embedding::Dense(q.dequantize(&Device::Cpu)?),
            },
            Some(Weight::Dense(t)) => Embedding::Dense(t),
            None => Embedding::Dense(l.dense(embed_name)?),
        };
        let mut ropes: Vec<RopeConfig> = Vec::new();
        let mut layers: Vec<Arc<dyn Block>> = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let rope = cfg.layer_rope(i);
            let rope = match ropes.iter().position(|r| *r == rope) {
                Some(k) => k,
                None => {
                    ropes.push(rope);
                    ropes.len() - 1
                }
            };
            let kind = AttentionKind {
                rope,
                window: cfg.layer_window(i),
                scale: cfg.attention_scale(),
            };
            layers.push(match cfg.architecture {
                Architecture::Llama
                | Architecture::Mistral
                | Architecture::Qwen2
                | Architecture::Qwen3 => Arc::new(LlamaLayer::load(&l, i, kind)?),
                Architecture::Gemma3 => Arc::new(Gemma3Layer::load(&l, i, kind)?),
            });
        }
        let norm = l.norm("model.norm.weight")?;
        // A checkpoint may say "tied" yet still carry lm_head (transformers
        // writes it for some models); an untied one must carry it.
        // Trained, a tied head is the embedding itself (as transformers
        // ties it on load), whatever copy the checkpoint carries.
        let tie = cfg.tie_word_embeddings && opts.trainable;
        let lm_head: Box<dyn Linear> = if src.contains("lm_head.weight") && !tie {
            l.linear("lm_head")?
        } else if cfg.tie_word_embeddings
            && let Embedding::Blocks(blocks) = &embed_tokens
        {
            Box::new(BaseLinear::from_blocks(blocks.clone(), None))
        } else if cfg.tie_word_embeddings && opts.keep_quantized && !opts.trainable {
            // The head reads the embedding's own blocks (decode speed).
            Box::new(BaseLinear::new(l.weight(embed_name, true)?, None))
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
        let ropes = ropes.iter().map(|r| Rope::new(r, cfg.head_dim)).collect();
        let embed_scale = (cfg.architecture == Architecture::Gemma3)
            .then(|| f64::from((cfg.hidden_size as f32).sqrt()));
        let (params, frozen) = l.into_params();
        Ok(Self {
            ropes,
            embed_scale,
            composed: opts.composed_ops,
            params,
            frozen,
            checkpointing: None,
            precision: Precision::F32,
            team_decode: true,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg,
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
            for slot in l.linears_mut() {
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

    /// The weights a trainable model left frozen ([`Model::load_freezing`]),
    /// by checkpoint name.
    pub fn frozen_parameters(&self) -> &[(String, Tensor)] {
        &self.frozen
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

    /// Whether incremental calls that can run in one team of threads from
    /// the first layer to the logits do (the default), or always layer by
    /// layer (each op handing its work to the thread pool). The numbers
    /// are the same; only the speed differs.
    pub fn set_team_decode(&mut self, on: bool) {
        self.team_decode = on;
    }

    /// An incremental call run by one team of threads, where the model and
    /// the call are made of what that path runs (see `team_decode.rs`):
    /// the logits of the `last` rows, or `None` to go layer by layer.
    pub(crate) fn team_call(
        &self,
        ids: &[u32],
        positions: &[u32],
        spans: &[Span],
        last: &[u32],
        cache: &mut KvCache,
        activations: Activations,
    ) -> Result<Option<Tensor>> {
        let int8 = activations == Activations::Int8;
        if !self.team_decode || self.composed || ids.len() > TEAM_ROWS {
            return Ok(None);
        }
        let Some(layers) = self
            .layers
            .iter()
            .map(|l| l.decode_layer())
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        // Asked for integer inputs, NF4 products take f32 ones and the
        // K-quants round them per 256: a pass whose weights would take
        // different inputs sends the call layer by layer.
        let pass_modes = |l: &DecodeLayer| -> Option<[InputMode; 4]> {
            let [a, b, c, e] = l.passes().map(|ws| InputMode::of_pass(ws, int8));
            Some([a?, b?, c?, e?])
        };
        let Some(modes) = layers.iter().map(pass_modes).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let head = self.lm_head.quant_blocks().map(|w| w.as_ref());
        let head_mode = head.map_or(InputMode::F32, |w| InputMode::of(w, int8));
        let mut x = self.embed_tokens.lookup(&Tensor::new(ids, &Device::Cpu)?)?; // [N,C]
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let ropes = self.rope_tables(positions)?;
        let input = DecodeInput {
            layers,
            x: x.flatten_all()?.to_vec1::<f32>()?,
            ropes: &ropes,
            spans,
            last,
            norm: &self.norm,
            head,
            modes,
            head_mode,
        };
        let out = team_decode::decode(&input, cache, skillet_kernels::team::threads())?;
        for s in spans {
            cache.advance(s.slot, s.len);
        }
        let logits = match out.logits {
            Some(l) => Tensor::from_vec(l, (last.len(), self.cfg.vocab_size), &Device::Cpu)?,
            None => {
                let picked =
                    Tensor::from_vec(out.hidden, (last.len(), self.cfg.hidden_size), &Device::Cpu)?;
                self.lm_head.forward_rowwise(&picked, activations)?
            }
        };
        Ok(Some(self.cap(logits)?))
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

    fn rope_tables(&self, positions: &[u32]) -> Result<Vec<skillet_kernels::RopeTable>> {
        self.ropes.iter().map(|r| r.table(positions)).collect()
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
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
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
            for m in l.linears() {
                f(m);
            }
        }
        f(self.lm_head.as_ref());
    }

    fn lm_head_module(&self) -> usize {
        self.layers.len() * LAYER_MODULES.len()
    }

    /// Gemma 2's final soft-capping where the config has it: `c·tanh(z/c)`.
    fn cap(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.cfg.final_logit_softcapping {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }
}

impl CausalLm for Model {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn head(&self, hidden: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        self.cap(adapters.apply(self.lm_head.as_ref(), self.lm_head_module(), hidden)?)
    }

    fn head_weight(&self, adapters: &Adapters) -> Option<DenseHead> {
        if adapters.adapts(self.lm_head_module()) || self.cfg.final_logit_softcapping.is_some() {
            return None;
        }
        let weight = self.lm_head.dense_weight()?;
        // A frozen head in bf16 is `head_frozen`'s (packed once); a trained
        // one is rounded in each product.
        let precision = if weight.track_op() {
            self.precision
        } else {
            Precision::F32
        };
        Some(DenseHead { weight, precision })
    }

    fn head_frozen(&self, adapters: &Adapters) -> Result<Option<FrozenHead>> {
        if adapters.adapts(self.lm_head_module()) || self.cfg.final_logit_softcapping.is_some() {
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

    fn module_weight(&self, module: usize) -> Result<Tensor> {
        let mut found = None;
        let mut i = 0;
        self.visit_linears(|l| {
            if i == module {
                found = Some(l.weight_f32());
            }
            i += 1;
        });
        found.unwrap_or_else(|| {
            Err(crate::ModelError::Input(format!(
                "module {module} of {i} modules"
            )))
        })
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
        let mut mask = AttentionMask::causal(b, t, t)?;
        if key_mask.contains(&0) {
            mask = mask.with_key_mask(key_mask)?;
        }
        if let Some(segments) = &input.segments {
            mask = mask.with_segments(segments.clone())?;
        }
        // Full layers' mask, then the windowed layers' where there are any.
        let mut masks = vec![mask.clone()];
        if let Some(window) = (0..self.layers.len()).find_map(|i| self.cfg.layer_window(i)) {
            masks.push(mask.with_window(Some(window)));
        }
        let ctx = LayerContext {
            ropes: self.rope_tables(&positions)?,
            masks,
            composed: self.composed,
            adapters: input.adapters.clone(),
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
        let unadapted = rows.iter().all(Option::is_none);
        if unadapted
            && let Some(logits) =
                self.team_call(&ids, &positions, &spans, &last, cache, batch.activations)?
        {
            return Ok(logits);
        }
        let adapters = if unadapted {
            Adapters::none()
        } else {
            Adapters::per_row(batch.adapters.clone(), rows)?
        };
        let n = ids.len();
        let ctx = LayerContext {
            ropes: self.rope_tables(&positions)?,
            masks: Vec::new(),
            composed: self.composed,
            adapters: adapters.clone(),
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
        let logits = adapters.gather(&last, 1).add_delta(
            head,
            self.lm_head_module(),
            &picked,
            head.forward_rowwise(&picked, batch.activations)?,
        )?; // [chunks,V]
        self.cap(logits)
    }
}
