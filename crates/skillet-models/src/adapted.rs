//! A model seen through one adapter: every call that names no adapter of
//! its own uses this one, so code written for any `CausalLm` (evaluation,
//! generation, the training loss) runs a base model plus adapter without
//! knowing it. The model itself is only borrowed, never changed.

use std::sync::Arc;

use candle_core::Tensor;
use skillet_kernels::FrozenHead;

use crate::adapter::{Adapter, Adapters, ModuleInfo};
use crate::{CachedBatch, CausalLm, DenseHead, ForwardInput, KvCache, ModelConfig, Result};

/// `model` with `adapter` on every row (dropout seeded when training),
/// or the model alone.
pub struct Adapted<'a> {
    model: &'a dyn CausalLm,
    adapter: Option<Arc<dyn Adapter>>,
    adapters: Adapters,
}

impl<'a> Adapted<'a> {
    /// `model` with `adapter` (if any) applied to every call.
    pub fn new(model: &'a dyn CausalLm, adapter: Option<Arc<dyn Adapter>>) -> Self {
        Self {
            model,
            adapters: adapter.clone().map_or_else(Adapters::none, Adapters::all),
            adapter,
        }
    }

    /// The same, with the adapter's dropout on and its masks drawn from `seed`.
    pub fn with_dropout(mut self, seed: u64) -> Self {
        self.adapters = self.adapters.with_dropout(seed);
        self
    }

    fn or_mine<'b>(&'b self, adapters: &'b Adapters) -> &'b Adapters {
        if adapters.is_empty() {
            &self.adapters
        } else {
            adapters
        }
    }
}

impl CausalLm for Adapted<'_> {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn forward_hidden(&self, input: &ForwardInput) -> Result<Tensor> {
        if !input.adapters.is_empty() {
            return self.model.forward_hidden(input);
        }
        let mut input = input.clone();
        input.adapters = self.adapters.clone();
        self.model.forward_hidden(&input)
    }

    fn head(&self, hidden: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        self.model.head(hidden, self.or_mine(adapters))
    }

    fn head_weight(&self, adapters: &Adapters) -> Option<DenseHead> {
        self.model.head_weight(self.or_mine(adapters))
    }

    fn head_frozen(&self, adapters: &Adapters) -> Result<Option<FrozenHead>> {
        self.model.head_frozen(self.or_mine(adapters))
    }

    fn forward_cached(&self, batch: &CachedBatch, cache: &mut KvCache) -> Result<Tensor> {
        let Some(adapter) = &self.adapter else {
            return self.model.forward_cached(batch, cache);
        };
        if !batch.adapters.is_empty() || batch.chunks.iter().any(|c| c.adapter.is_some()) {
            return self.model.forward_cached(batch, cache);
        }
        let mut batch = batch.clone();
        batch.adapters = vec![adapter.clone()];
        batch.chunks.iter_mut().for_each(|c| c.adapter = Some(0));
        self.model.forward_cached(&batch, cache)
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        self.model.modules()
    }

    fn module_weight(&self, module: usize) -> Result<Tensor> {
        self.model.module_weight(module)
    }

    fn take_checkpoint_grads(&self) -> Vec<(Tensor, Tensor)> {
        self.model.take_checkpoint_grads()
    }
}
