//! Supervised fine-tuning: next-token cross-entropy over labelled tokens,
//! averaged over the labelled tokens of the whole step (transformers'
//! gradient-accumulation rule), on padded or packed micro-batches.

use skillet_data::{TokenizedExample, pack};
use skillet_models::CausalLm;

use crate::objective::{Metrics, MicroLoss, Objective};
use crate::{Result, TrainBatch, causal_lm_loss, collate, collate_packed, evaluate};

/// SFT over tokenized examples.
pub struct Sft<'a> {
    /// Training examples.
    pub train: &'a [TokenizedExample],
    /// Held-out examples.
    pub valid: &'a [TokenizedExample],
    /// Pack examples into rows of this many tokens.
    pub packing: Option<usize>,
    /// Padding token id.
    pub pad_id: u32,
    /// Examples per evaluation batch.
    pub eval_batch: usize,
}

impl Objective for Sft<'_> {
    type Batch = TrainBatch;

    fn len(&self) -> usize {
        self.train.len()
    }

    fn batches(&self, order: &[usize], batch_size: usize) -> Vec<TrainBatch> {
        let examples: Vec<&TokenizedExample> = order.iter().map(|&i| &self.train[i]).collect();
        match self.packing {
            Some(max_len) => {
                let packed = pack(&examples, max_len);
                packed
                    .chunks(batch_size.max(1))
                    .map(|c| collate_packed(&c.iter().collect::<Vec<_>>(), self.pad_id))
                    .collect()
            }
            None => examples
                .chunks(batch_size.max(1))
                .map(|c| collate(c, self.pad_id))
                .collect(),
        }
    }

    fn units(&self, batch: &TrainBatch) -> usize {
        batch.target_count()
    }

    fn tokens(&self, batch: &TrainBatch) -> usize {
        batch.target_count()
    }

    fn loss(&self, model: &dyn CausalLm, batch: &TrainBatch) -> Result<MicroLoss> {
        let parts = causal_lm_loss(model, batch)?;
        let value = parts.sum.to_scalar::<f32>()? as f64;
        Ok(MicroLoss {
            graph: parts.sum,
            value,
            metrics: Metrics::new(),
            token_metrics: Metrics::new(),
        })
    }

    fn validate(&self, model: &dyn CausalLm) -> Result<Metrics> {
        let s = evaluate(model, self.valid, self.eval_batch, self.pad_id)?;
        Ok(Metrics::from([
            ("loss".to_string(), s.loss),
            ("perplexity".to_string(), s.perplexity),
            ("accuracy".to_string(), s.accuracy),
            ("tokens".to_string(), s.tokens as f64),
        ]))
    }

    fn has_validation(&self) -> bool {
        !self.valid.is_empty()
    }
}
