//! Held-out loss, perplexity and token accuracy over labelled tokens.

use serde::Serialize;
use skillet_data::TokenizedExample;
use skillet_models::CausalLm;

use crate::{Result, causal_lm_loss_value, collate};

/// Loss statistics of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalStats {
    /// Mean next-token cross-entropy over labelled tokens.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Fraction of labelled tokens the argmax predicts.
    pub accuracy: f64,
    /// Labelled tokens counted.
    pub tokens: usize,
}

/// Evaluates `model` on `examples` in batches of `batch_size` (no gradients kept).
pub fn evaluate(
    model: &dyn CausalLm,
    examples: &[TokenizedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalStats> {
    let (mut sum, mut tokens, mut correct) = (0f64, 0usize, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let parts = causal_lm_loss_value(model, &collate(&refs, pad_id))?;
        sum += parts
            .sum
            .detach()
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        tokens += parts.tokens;
        correct += parts.correct;
    }
    let loss = if tokens == 0 {
        0.0
    } else {
        sum / tokens as f64
    };
    Ok(EvalStats {
        loss,
        perplexity: loss.exp(),
        accuracy: if tokens == 0 {
            0.0
        } else {
            correct as f64 / tokens as f64
        },
        tokens,
    })
}
