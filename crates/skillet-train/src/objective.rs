//! What a training method optimizes, behind one interface the trainer's
//! `step()` drives: SFT's next-token loss, DPO's preference loss, and the
//! methods to come. An objective makes its own micro-batches, says what the
//! step's loss is averaged over (labelled tokens, pairs), and returns each
//! micro-batch's loss summed over those units, with a graph to
//! differentiate and the metrics it logs under its own names.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use skillet_models::{Adapter, CausalLm};

use crate::Result;

/// Named metrics (TRL's names where TRL logs the same quantity).
pub type Metrics = BTreeMap<String, f64>;

/// One micro-batch's loss, summed over its units.
#[derive(Debug)]
pub struct MicroLoss {
    /// A scalar whose gradient is the gradient of `value` (it may differ
    /// from `value` itself where the loss is finished on the host).
    pub graph: Tensor,
    /// The loss summed over the micro-batch's units.
    pub value: f64,
    /// Metrics summed over the units (the trainer divides by the step's).
    pub metrics: Metrics,
    /// Metrics summed over trained tokens (the trainer divides by the
    /// step's tokens), where units are not tokens (GRPO's per-token KL and
    /// clip ratios under a per-sequence loss).
    pub token_metrics: Metrics,
}

/// A training objective.
pub trait Objective {
    /// A micro-batch as the objective consumes it.
    type Batch;

    /// Training items (examples, pairs, prompts).
    fn len(&self) -> usize;

    /// Whether there is nothing to train on.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Micro-batches of `batch_size` items over the items in `order`.
    fn batches(&self, order: &[usize], batch_size: usize) -> Vec<Self::Batch>;

    /// What a step's loss is averaged over, in this micro-batch.
    fn units(&self, batch: &Self::Batch) -> usize;

    /// Tokens this micro-batch trains on (for throughput).
    fn tokens(&self, batch: &Self::Batch) -> usize;

    /// Makes a step's micro-batches ready to train on, with the policy as
    /// it is now (`model` with `adapter`), and the metrics of doing so:
    /// GRPO samples its completions and scores them here. `None` (the
    /// default): the batches are used as they are.
    fn prepare(
        &self,
        _model: &dyn CausalLm,
        _adapter: Option<Arc<dyn Adapter>>,
        _group: &[Self::Batch],
        _step: u64,
    ) -> Result<Option<(Vec<Self::Batch>, Metrics)>> {
        Ok(None)
    }

    /// Optimizer steps taken on each prepared group (GRPO's
    /// `num_iterations`; 1 elsewhere).
    fn iterations(&self) -> u64 {
        1
    }

    /// The micro-batch's loss under `model`, summed over its units.
    fn loss(&self, model: &dyn CausalLm, batch: &Self::Batch) -> Result<MicroLoss>;

    /// Held-out metrics of `model`, without gradients (`loss` among them).
    fn validate(&self, model: &dyn CausalLm) -> Result<Metrics>;

    /// Whether there is held-out data.
    fn has_validation(&self) -> bool;
}
