//! The interface every model implements ([`CausalLm`]) and the inputs of
//! its calls: load options, a forward batch, and a ragged cached batch for
//! incremental decoding.

use std::sync::Arc;

use candle_core::Tensor;
use skillet_kernels::FrozenHead;

use crate::adapter::{Adapter, Adapters, ModuleInfo};
use crate::cache::KvCache;
use crate::linear::{Activations, Precision};
use crate::{ModelConfig, Result};

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
    /// Quantize the decoder layers' dense projection weights at load
    /// (QLoRA on a dense base); the LM head, embeddings and norms stay as
    /// they are. A weight already in GGML blocks is refused, as is a
    /// quantized base with `trainable`.
    pub quantize: Option<QuantizeBase>,
}

/// A format dense projection weights are quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizeBase {
    /// NF4 as bitsandbytes makes it ([`crate::Nf4`]), with or without
    /// double quantization of the absmax values.
    Nf4 {
        /// bitsandbytes' `bnb_4bit_use_double_quant`.
        double_quant: bool,
    },
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

/// A dense LM head as the fused loss takes it: the weight (a trained one
/// as its variable) and the precision of its products.
#[derive(Debug, Clone)]
pub struct DenseHead {
    /// `[V, C]`.
    pub weight: Tensor,
    /// f32, or bf16 operands with f32 accumulation (a trained head in
    /// mixed precision; its master copy stays f32).
    pub precision: Precision,
}

impl DenseHead {
    /// The head as [`skillet_kernels::linear_token_nll`] takes it.
    pub fn lm_head(&self) -> skillet_kernels::LmHead<'_> {
        match self.precision {
            Precision::F32 => skillet_kernels::LmHead::Weight(&self.weight),
            Precision::Bf16 => skillet_kernels::LmHead::WeightBf16(&self.weight),
        }
    }
}

/// A causal language model: token ids in, logits for every position out.
pub trait CausalLm: Send + Sync {
    /// The validated hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// Final (normed) hidden states `[B, T, C]` for every input position.
    fn forward_hidden(&self, input: &ForwardInput) -> Result<Tensor>;
    /// The output projection of hidden states (`[B, T, C]` or `[N, C]`)
    /// to vocabulary logits, with `adapters` over the leading rows.
    fn head(&self, hidden: &Tensor, adapters: &Adapters) -> Result<Tensor>;
    /// The dense `[V, C]` head weight where the head is exactly `x Wᵀ`
    /// under `adapters` (so the loss may fuse it); a trainable weight is
    /// returned as its variable, with the precision of its products.
    fn head_weight(&self, adapters: &Adapters) -> Option<DenseHead>;
    /// The LM head as a frozen weight for the fused loss, its products in
    /// the precision of training forwards ([`Model::set_precision`]), when
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
    /// The `[out, in]` weight of module `module` in f32 (dequantized
    /// where stored in blocks; detached from any variable).
    fn module_weight(&self, module: usize) -> Result<Tensor>;
    /// Gradients that checkpointed layers computed during the last
    /// `backward`, as (variable, gradient) pairs, emptied by the call.
    fn take_checkpoint_grads(&self) -> Vec<(Tensor, Tensor)> {
        Vec::new()
    }
}
