//! Reward modelling with TRL's definitions (`RewardTrainer`, trl 1.16): a
//! sequence's reward is the `score` head applied to the final hidden state
//! of its last real token (the true end of the sequence, found from its
//! length, so an end-of-turn token that doubles as padding is never
//! skipped). Per pair, the Bradley–Terry loss
//! `−log σ(r_chosen − r_rejected − margin)`, plus
//! `c · (r_chosen + r_rejected)²` with `center_rewards_coefficient` `c`,
//! averaged over the step's pairs. As for DPO, the loss of each pair's two
//! scalars is finished on the host in f64 and its gradient flows back
//! through the rewards into the head and the adapter.

use candle_core::{D, DType, Device, Tensor};
use skillet_data::TokenizedPair;
use skillet_models::CausalLm;

use crate::dpo::{PairBatch, pair_batch};
use crate::objective::{Metrics, MicroLoss, Objective};
use crate::{Result, TrainBatch, TrainError};

/// The reward model's settings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RewardSettings {
    /// Weight of the penalty pulling rewards toward zero mean.
    pub center_rewards_coefficient: Option<f64>,
}

/// The reward-model objective over training and held-out pairs.
pub struct Reward<'a> {
    /// Loss settings.
    pub settings: RewardSettings,
    /// The `score` head `[1, hidden]` (the trained variable's tensor).
    pub score: Tensor,
    /// Training pairs.
    pub train: &'a [TokenizedPair],
    /// Held-out pairs.
    pub valid: &'a [TokenizedPair],
    /// Padding token id.
    pub pad_id: u32,
    /// Pairs per evaluation batch.
    pub eval_batch: usize,
}

/// The reward of each row of `rows` (`[rows]`, f32, differentiable):
/// `score` applied to the final hidden state at the row's last real token.
pub fn sequence_rewards(model: &dyn CausalLm, rows: &TrainBatch, score: &Tensor) -> Result<Tensor> {
    let last: Vec<u32> = (0..rows.batch)
        .map(|b| {
            let mask = &rows.key_mask[b * rows.seq..(b + 1) * rows.seq];
            let len = mask.iter().rposition(|&m| m != 0).map_or(0, |i| i + 1);
            if len == 0 {
                return Err(TrainError::Invalid(format!("row {b} of a batch is empty")));
            }
            Ok((b * rows.seq + len - 1) as u32)
        })
        .collect::<Result<_>>()?;
    let hidden = model.forward_hidden(&rows.input()?)?; // [B,T,C]
    let c = hidden.dim(D::Minus1)?;
    let picked = hidden
        .reshape((rows.batch * rows.seq, c))?
        .index_select(&Tensor::new(last.as_slice(), &Device::Cpu)?, 0)?
        .to_dtype(DType::F32)?; // [B,C]
    Ok(picked.matmul(&score.t()?)?.squeeze(1)?)
}

/// Rewards of token sequences under `model` and `score`, `batch` at a
/// time, without gradients.
pub fn score_sequences(
    model: &dyn CausalLm,
    score: &Tensor,
    sequences: &[Vec<u32>],
    batch: usize,
    pad_id: u32,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch.max(1)) {
        let rows = right_padded(chunk, pad_id);
        out.extend(
            sequence_rewards(model, &rows, score)?
                .detach()
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// `sequences` as one right-padded batch without labels.
fn right_padded(sequences: &[Vec<u32>], pad_id: u32) -> TrainBatch {
    let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let n = sequences.len() * seq;
    let (mut ids, mut key_mask) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for s in sequences {
        ids.extend(
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, seq - s.len())),
        );
        key_mask
            .extend(std::iter::repeat_n(1u8, s.len()).chain(std::iter::repeat_n(0, seq - s.len())));
    }
    TrainBatch {
        batch: sequences.len(),
        seq,
        ids,
        key_mask,
        positions: None,
        segments: None,
        labels: vec![crate::IGNORE; n],
    }
}

fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// One pair's loss and its derivatives with respect to the chosen and
/// rejected rewards.
pub fn reward_pair_loss(
    s: &RewardSettings,
    chosen: f64,
    rejected: f64,
    margin: f64,
) -> (f64, f64, f64) {
    let d = chosen - rejected - margin;
    let pull = -log_sigmoid(-d).exp(); // d(−log σ(d))/dd = −σ(−d)
    let mut loss = -log_sigmoid(d);
    let (mut dc, mut dr) = (pull, -pull);
    if let Some(c) = s.center_rewards_coefficient {
        let sum = chosen + rejected;
        loss += c * sum * sum;
        dc += 2.0 * c * sum;
        dr += 2.0 * c * sum;
    }
    (loss, dc, dr)
}

impl Reward<'_> {
    /// Loss, gradient graph and summed metrics of pairs `batch` of `pairs`;
    /// also each pair's (chosen, rejected) rewards.
    fn pairs_loss(
        &self,
        model: &dyn CausalLm,
        pairs: &[TokenizedPair],
        batch: &PairBatch,
    ) -> Result<(MicroLoss, Vec<(f64, f64)>)> {
        let rewards = sequence_rewards(model, &batch.rows, &self.score)?;
        let v = rewards.detach().to_vec1::<f32>()?;
        let p = batch.items.len();
        let mut grad = vec![0f32; 2 * p];
        let (mut value, mut m) = (0f64, [0f64; 3]);
        let mut each = Vec::with_capacity(p);
        for (k, &i) in batch.items.iter().enumerate() {
            let (c, r) = (v[k] as f64, v[p + k] as f64);
            let (loss, dc, dr) = reward_pair_loss(&self.settings, c, r, pairs[i].margin);
            if !loss.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "the reward loss of the pair on line {} is {loss}",
                    pairs[i].line
                )));
            }
            value += loss;
            grad[k] = dc as f32;
            grad[p + k] = dr as f32;
            m[0] += f64::from(u8::from(c > r));
            m[1] += c - r;
            m[2] += (c + r) / 2.0;
            each.push((c, r));
        }
        let names = ["accuracy", "margin", "mean_reward"];
        let grad = Tensor::from_vec(grad, 2 * p, &Device::Cpu)?;
        let loss = MicroLoss {
            graph: (rewards * grad)?.sum_all()?,
            value,
            metrics: names.iter().map(|n| n.to_string()).zip(m).collect(),
            token_metrics: Metrics::new(),
        };
        Ok((loss, each))
    }
}

impl Objective for Reward<'_> {
    type Batch = PairBatch;

    fn len(&self) -> usize {
        self.train.len()
    }

    fn batches(&self, order: &[usize], batch_size: usize) -> Vec<PairBatch> {
        order
            .chunks(batch_size.max(1))
            .map(|items| pair_batch(self.train, items, self.pad_id))
            .collect()
    }

    fn units(&self, batch: &PairBatch) -> usize {
        batch.items.len()
    }

    fn tokens(&self, batch: &PairBatch) -> usize {
        batch.rows.real_tokens()
    }

    fn loss(&self, model: &dyn CausalLm, batch: &PairBatch) -> Result<MicroLoss> {
        Ok(self.pairs_loss(model, self.train, batch)?.0)
    }

    /// TRL's evaluation metrics: loss, accuracy, mean margin, and the
    /// mean, least and greatest reward over both sides.
    fn validate(&self, model: &dyn CausalLm) -> Result<Metrics> {
        let all: Vec<usize> = (0..self.valid.len()).collect();
        let mut sum = Metrics::new();
        let (mut loss, mut lo, mut hi) = (0f64, f64::INFINITY, f64::NEG_INFINITY);
        for items in all.chunks(self.eval_batch.max(1)) {
            let b = pair_batch(self.valid, items, self.pad_id);
            let (part, each) = self.pairs_loss(model, self.valid, &b)?;
            loss += part.value;
            for (k, v) in part.metrics {
                *sum.entry(k).or_default() += v;
            }
            for (c, r) in each {
                lo = lo.min(c.min(r));
                hi = hi.max(c.max(r));
            }
        }
        let n = all.len().max(1) as f64;
        let mut out: Metrics = sum.into_iter().map(|(k, v)| (k, v / n)).collect();
        out.insert("loss".into(), loss / n);
        out.insert("pairs".into(), all.len() as f64);
        if !all.is_empty() {
            out.insert("min_reward".into(), lo);
            out.insert("max_reward".into(), hi);
        }
        Ok(out)
    }

    fn has_validation(&self) -> bool {
        !self.valid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_loss_derivatives_match_finite_differences() {
        for center in [None, Some(0.05)] {
            let s = RewardSettings {
                center_rewards_coefficient: center,
            };
            let (c, r, m) = (0.7, -0.4, 0.3);
            let (_, dc, dr) = reward_pair_loss(&s, c, r, m);
            let h = 1e-6;
            let f = |a: f64, b: f64| reward_pair_loss(&s, a, b, m).0;
            let nc = (f(c + h, r) - f(c - h, r)) / (2.0 * h);
            let nr = (f(c, r + h) - f(c, r - h)) / (2.0 * h);
            assert!((dc - nc).abs() < 1e-7 && (dr - nr).abs() < 1e-7);
        }
        // Equal rewards, no margin: ln 2, chosen pushed up, rejected down.
        let (l, dc, dr) = reward_pair_loss(&RewardSettings::default(), 0.2, 0.2, 0.0);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-15);
        assert!(dc < 0.0 && dr > 0.0);
    }
}
