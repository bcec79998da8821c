//! A batch for training or evaluation: `[B, T]` token ids with padding
//! mask, optional packing (positions and segments), and labels.

use candle_core::{Device, Tensor};
use skillet_models::{Adapters, ForwardInput};

use crate::{Result, TrainError};

/// Label of a position that carries no loss (transformers' -100).
pub const IGNORE: i64 = -100;

/// `B` rows of `T` tokens, row-major. `labels[i]` is the token expected at
/// position `i` (or [`IGNORE`]); the model predicts it from position
/// `i - 1`, as transformers' causal-LM loss shifts labels.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBatch {
    /// Rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub key_mask: Vec<u8>,
    /// RoPE positions (packing restarts them per example).
    pub positions: Option<Vec<u32>>,
    /// Segment ids (packing): attention stays within a segment.
    pub segments: Option<Vec<u32>>,
    /// Targets, [`IGNORE`] where there is no loss.
    pub labels: Vec<i64>,
}

impl TrainBatch {
    /// Checks lengths.
    pub fn validate(&self) -> Result<()> {
        let n = self.batch * self.seq;
        let ok = self.ids.len() == n
            && self.key_mask.len() == n
            && self.labels.len() == n
            && self.positions.as_ref().is_none_or(|p| p.len() == n)
            && self.segments.as_ref().is_none_or(|s| s.len() == n);
        if ok {
            Ok(())
        } else {
            Err(TrainError::Invalid(format!(
                "batch arrays do not all have {n} entries"
            )))
        }
    }

    /// The model input.
    pub fn input(&self) -> Result<ForwardInput> {
        self.validate()?;
        Ok(ForwardInput {
            ids: Tensor::from_vec(self.ids.clone(), (self.batch, self.seq), &Device::Cpu)?,
            key_mask: Some(self.key_mask.clone()),
            positions: self.positions.clone(),
            segments: self.segments.clone(),
            adapters: Adapters::none(),
        })
    }

    /// `(row-major hidden index, target)` of every position that predicts a
    /// labelled token: position `i - 1` predicts `labels[i]`, within one
    /// row and one segment.
    pub fn targets(&self) -> Vec<(usize, u32)> {
        self.target_iter().collect()
    }

    /// Number of real (unpadded) positions.
    pub fn real_tokens(&self) -> usize {
        self.key_mask.iter().filter(|&&m| m != 0).count()
    }

    /// Number of labelled tokens (what the loss is normalized by).
    pub fn target_count(&self) -> usize {
        self.target_iter().count()
    }

    fn target_iter(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (0..self.batch)
            .flat_map(move |b| (1..self.seq).map(move |i| b * self.seq + i))
            .filter_map(move |at| {
                let label = self.labels[at];
                let same_segment = self.segments.as_ref().is_none_or(|s| s[at] == s[at - 1]);
                (label != IGNORE && self.key_mask[at] != 0 && same_segment)
                    .then_some((at - 1, label as u32))
            })
    }
}
