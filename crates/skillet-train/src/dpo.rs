//! Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290)
//! with TRL's definitions (`DPOTrainer`, trl 1.16): sequence
//! log-probabilities summed over completion tokens; the implicit reward of
//! a completion is `β (log π − log π_ref)`; with `Δ` the chosen minus the
//! rejected log-ratio, per pair
//! - `sigmoid`: `−log σ(βΔ)`;
//! - `hinge`: `max(0, 1 − βΔ)` (SLiC);
//! - `ipo`: `(Δ̄ − 1/(2β))²` with each log-ratio divided by its
//!   completion's length (Azar et al. 2023);
//! - `robust`: `(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)` for label
//!   smoothing `ε` (Chowdhury et al. 2024);
//!
//! averaged over the step's pairs. The reference log-probabilities are
//! computed once before training (the base with the adapter off, or the
//! starting adapter frozen) and passed in, so the reference costs neither
//! memory nor time per step. The loss is a function of a few scalars per
//! pair, so it is finished on the host in f64 and its gradient flows back
//! through the policy's log-probabilities alone.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use skillet_data::TokenizedPair;
use skillet_models::CausalLm;

use crate::logps::sequence_logps;
use crate::objective::{Metrics, MicroLoss, Objective};
use crate::{Result, TrainBatch, TrainError, collate};

/// `method.loss_type` for DPO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// `−log σ(βΔ)`.
    #[default]
    Sigmoid,
    /// `max(0, 1 − βΔ)`.
    Hinge,
    /// `(Δ̄ − 1/(2β))²` on length-averaged log-ratios.
    Ipo,
    /// Label-smoothed sigmoid, unbiased for flipped labels.
    Robust,
}

/// DPO's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoSettings {
    /// The loss.
    pub loss: DpoLoss,
    /// Strength of the pull toward the reference (TRL's default 0.1).
    pub beta: f64,
    /// `robust`'s probability that a label is flipped, in `[0, 0.5)`.
    pub label_smoothing: f64,
}

/// Reference log-probabilities of one pair (chosen, rejected).
pub type RefLogps = (f64, f64);

/// Preference pairs with their reference log-probabilities.
pub struct PairSet<'a> {
    /// The pairs.
    pub pairs: &'a [TokenizedPair],
    /// Their reference log-probabilities, in the same order.
    pub reference: &'a [RefLogps],
}

/// A micro-batch of pairs: chosen rows first, then rejected rows.
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// Indices of the pairs.
    pub items: Vec<usize>,
    /// `2 × pairs` rows.
    pub rows: TrainBatch,
}

/// The DPO objective over training and held-out pairs.
pub struct Dpo<'a> {
    /// Loss settings.
    pub settings: DpoSettings,
    /// Training pairs.
    pub train: PairSet<'a>,
    /// Held-out pairs.
    pub valid: PairSet<'a>,
    /// Padding token id.
    pub pad_id: u32,
    /// Pairs per evaluation batch.
    pub eval_batch: usize,
}

/// Pairs `items` as one batch: chosen sides, then rejected sides.
pub fn pair_batch(pairs: &[TokenizedPair], items: &[usize], pad_id: u32) -> PairBatch {
    let sides: Vec<_> = [true, false]
        .iter()
        .flat_map(|&chosen| items.iter().map(move |&i| pairs[i].side(chosen)))
        .collect();
    PairBatch {
        items: items.to_vec(),
        rows: collate(&sides.iter().collect::<Vec<_>>(), pad_id),
    }
}

/// Each pair's summed log-probabilities under `model` (no gradients), for
/// the reference before training.
pub fn pair_logps(
    model: &dyn CausalLm,
    pairs: &[TokenizedPair],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<RefLogps>> {
    let mut out = Vec::with_capacity(pairs.len());
    let all: Vec<usize> = (0..pairs.len()).collect();
    for items in all.chunks(batch_size.max(1)) {
        let b = pair_batch(pairs, items, pad_id);
        let (sums, _) = sequence_logps(model, &b.rows)?;
        let v = sums.detach().to_vec1::<f32>()?;
        let p = items.len();
        out.extend((0..p).map(|i| (v[i] as f64, v[p + i] as f64)));
    }
    Ok(out)
}

fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    log_sigmoid(x).exp()
}

/// One pair's loss and its derivatives with respect to the policy's
/// chosen and rejected log-probabilities.
pub fn dpo_pair_loss(
    s: &DpoSettings,
    policy: (f64, f64),
    reference: RefLogps,
    lens: (usize, usize),
) -> (f64, f64, f64) {
    let (rc, rr) = (policy.0 - reference.0, policy.1 - reference.1);
    let z = s.beta * (rc - rr);
    // (loss, dloss/dz) for the losses of βΔ.
    let of_z = |loss: f64, dz: f64| (loss, dz * s.beta, -dz * s.beta);
    match s.loss {
        DpoLoss::Sigmoid => of_z(-log_sigmoid(z), -sigmoid(-z)),
        DpoLoss::Hinge => {
            let m = 1.0 - z;
            of_z(m.max(0.0), if m > 0.0 { -1.0 } else { 0.0 })
        }
        DpoLoss::Robust => {
            let e = s.label_smoothing;
            let k = 1.0 - 2.0 * e;
            of_z(
                (-(1.0 - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / k,
                (-(1.0 - e) * sigmoid(-z) - e * sigmoid(z)) / k,
            )
        }
        DpoLoss::Ipo => {
            let (nc, nr) = (lens.0.max(1) as f64, lens.1.max(1) as f64);
            let u = rc / nc - rr / nr - 1.0 / (2.0 * s.beta);
            (u * u, 2.0 * u / nc, -2.0 * u / nr)
        }
    }
}

impl Dpo<'_> {
    /// Loss, gradient graph and summed metrics of pairs `batch` of `set`.
    fn pairs_loss(
        &self,
        model: &dyn CausalLm,
        set: &PairSet<'_>,
        batch: &PairBatch,
    ) -> Result<MicroLoss> {
        let (sums, _) = sequence_logps(model, &batch.rows)?;
        let v = sums.detach().to_vec1::<f32>()?;
        let p = batch.items.len();
        let s = &self.settings;
        let mut grad = vec![0f32; 2 * p];
        let mut value = 0f64;
        let mut m = [0f64; 6];
        for (k, &i) in batch.items.iter().enumerate() {
            let policy = (v[k] as f64, v[p + k] as f64);
            let reference = set.reference[i];
            let (loss, dc, dr) =
                dpo_pair_loss(s, policy, reference, set.pairs[i].completion_lens());
            if !loss.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "the DPO loss of the pair on line {} is {loss}",
                    set.pairs[i].line
                )));
            }
            value += loss;
            grad[k] = dc as f32;
            grad[p + k] = dr as f32;
            let (chosen, rejected) = (
                s.beta * (policy.0 - reference.0),
                s.beta * (policy.1 - reference.1),
            );
            m[0] += chosen;
            m[1] += rejected;
            m[2] += f64::from(u8::from(chosen > rejected));
            m[3] += chosen - rejected;
            m[4] += policy.0;
            m[5] += policy.1;
        }
        let names = [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ];
        let grad = Tensor::from_vec(grad, 2 * p, &Device::Cpu)?;
        Ok(MicroLoss {
            graph: (sums * grad)?.sum_all()?,
            value,
            metrics: names.iter().map(|n| n.to_string()).zip(m).collect(),
            token_metrics: Metrics::new(),
        })
    }
}

impl Objective for Dpo<'_> {
    type Batch = PairBatch;

    fn len(&self) -> usize {
        self.train.pairs.len()
    }

    fn batches(&self, order: &[usize], batch_size: usize) -> Vec<PairBatch> {
        order
            .chunks(batch_size.max(1))
            .map(|items| pair_batch(self.train.pairs, items, self.pad_id))
            .collect()
    }

    fn units(&self, batch: &PairBatch) -> usize {
        batch.items.len()
    }

    fn tokens(&self, batch: &PairBatch) -> usize {
        batch.rows.target_count()
    }

    fn loss(&self, model: &dyn CausalLm, batch: &PairBatch) -> Result<MicroLoss> {
        self.pairs_loss(model, &self.train, batch)
    }

    fn validate(&self, model: &dyn CausalLm) -> Result<Metrics> {
        let all: Vec<usize> = (0..self.valid.pairs.len()).collect();
        let mut sum = Metrics::new();
        let mut loss = 0f64;
        for items in all.chunks(self.eval_batch.max(1)) {
            let b = pair_batch(self.valid.pairs, items, self.pad_id);
            let part = self.pairs_loss(model, &self.valid, &b)?;
            loss += part.value;
            for (k, v) in part.metrics {
                *sum.entry(k).or_default() += v;
            }
        }
        let n = all.len().max(1) as f64;
        let mut out: Metrics = sum.into_iter().map(|(k, v)| (k, v / n)).collect();
        out.insert("loss".into(), loss / n);
        out.insert("pairs".into(), all.len() as f64);
        Ok(out)
    }

    fn has_validation(&self) -> bool {
        !self.valid.pairs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each loss's derivative against a central difference.
    #[test]
    fn pair_loss_derivatives_match_finite_differences() {
        for loss in [
            DpoLoss::Sigmoid,
            DpoLoss::Hinge,
            DpoLoss::Ipo,
            DpoLoss::Robust,
        ] {
            let s = DpoSettings {
                loss,
                beta: 0.3,
                label_smoothing: 0.2,
            };
            let (p, r, lens) = ((-12.5, -15.0), (-13.0, -14.2), (5, 7));
            let (_, dc, dr) = dpo_pair_loss(&s, p, r, lens);
            let h = 1e-6;
            let f = |a: f64, b: f64| dpo_pair_loss(&s, (a, b), r, lens).0;
            let nc = (f(p.0 + h, p.1) - f(p.0 - h, p.1)) / (2.0 * h);
            let nr = (f(p.0, p.1 + h) - f(p.0, p.1 - h)) / (2.0 * h);
            assert!(
                (dc - nc).abs() < 1e-6 && (dr - nr).abs() < 1e-6,
                "{loss:?}: {dc} {nc} {dr} {nr}"
            );
            assert!(
                dc != 0.0,
                "{loss:?}: a gradient that cannot be zero here is"
            );
        }
        // At the reference the sigmoid loss is ln 2 and the chosen side is pulled up.
        let s = DpoSettings {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
        };
        let (l, dc, dr) = dpo_pair_loss(&s, (-3.0, -4.0), (-3.0, -4.0), (1, 1));
        assert!((l - std::f64::consts::LN_2).abs() < 1e-15);
        assert!(dc < 0.0 && dr > 0.0);
    }
}
