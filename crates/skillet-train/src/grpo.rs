//! Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300)
//! with TRL's definitions (`GRPOTrainer`, trl 1.16). For each prompt the
//! policy samples G completions, which are scored; a completion's
//! advantage is its reward minus its group's mean, divided by the group's
//! (or the step's) standard deviation plus 1e-4 (`scale_rewards`). Per
//! completion token, with `r = exp(log π − log π_old)`,
//! `−min(r A, clip(r, 1 − ε, 1 + ε_high) A)`, plus `β (e^{ref − log π} −
//! (ref − log π) − 1)` (the k3 estimate of the KL to the reference) when
//! β > 0, multiplied by `r` unless `bias_correction_kl` is off. Log-probabilities are of logits divided by the sampling
//! temperature. `π_old` is the policy that sampled (it differs from the
//! current one after the first of `num_iterations` steps on one set of
//! samples). Aggregation (`loss_type`): `dapo` sums over the step's tokens
//! and divides by their count; `grpo` averages each completion's tokens,
//! then the completions; `dr_grpo` sums each completion's tokens, divides
//! by `max_completion_length` and averages the completions.
//!
//! As for DPO the loss of each token is finished on the host in f64 and
//! its derivative flows back through the policy's log-probabilities.
//! Sampling and scoring are the [`RolloutSource`]'s (a front end that has
//! the tokenizer, the generation engine and the reward functions).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use skillet_models::{Adapted, Adapter, CausalLm};

use crate::logps::token_logps;
use crate::objective::{Metrics, MicroLoss, Objective};
use skillet_kernels::SHARED_SEGMENT;

use crate::{IGNORE, Result, TrainBatch, TrainError};

/// `method.loss_type` for GRPO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    /// Token-level: the step's token losses over its token count.
    #[default]
    Dapo,
    /// Each completion's mean token loss, averaged.
    Grpo,
    /// Each completion's summed token loss over `max_completion_length`,
    /// averaged.
    DrGrpo,
}

/// How advantages are scaled (`scale_rewards`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// By each group's standard deviation.
    #[default]
    Group,
    /// By the standard deviation over the step's completions.
    Batch,
    /// Not scaled (Dr. GRPO).
    None,
}

/// GRPO's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoSettings {
    /// How the token losses are aggregated.
    pub loss: GrpoLoss,
    /// Weight of the KL term (0: no reference is computed).
    pub beta: f64,
    /// Lower clipping bound `1 − epsilon`.
    pub epsilon: f64,
    /// Upper clipping bound `1 + epsilon_high`.
    pub epsilon_high: f64,
    /// Completions per prompt.
    pub num_generations: usize,
    /// Longest completion (also `dr_grpo`'s constant).
    pub max_completion_length: usize,
    /// Sampling temperature; log-probabilities are of logits over it.
    pub temperature: f64,
    /// Advantage scaling.
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps on each set of samples.
    pub num_iterations: u64,
    /// Multiply the KL term by the ratio `r`, which makes its gradient the
    /// unbiased reverse-KL gradient (TRL's default since 1.x,
    /// `use_bias_correction_kl`).
    pub bias_correction_kl: bool,
}

/// Mean and Bessel-corrected standard deviation (TRL's `nanstd`; NaN for
/// fewer than two values).
fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    // Equal values have exactly their value as mean (a sum's rounding
    // would leave advantages of ±1e-13 where they are 0).
    let mean = if v.iter().all(|&x| x == v[0]) {
        v[0]
    } else {
        v.iter().sum::<f64>() / n
    };
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let std = if v.len() > 1 {
        (var * n / (n - 1.0)).sqrt()
    } else {
        f64::NAN
    };
    (mean, std)
}

/// Advantages of `rewards` (prompt-major, `g` per prompt) and the fraction
/// of completions whose scaling deviation is zero (TRL's
/// `frac_reward_zero_std`).
pub fn advantages(rewards: &[f64], g: usize, scale: ScaleRewards) -> (Vec<f64>, f64) {
    let batch_std = mean_std(rewards).1;
    let mut out = Vec::with_capacity(rewards.len());
    let mut zero = 0usize;
    for group in rewards.chunks(g) {
        let (mean, group_std) = mean_std(group);
        let std = match scale {
            ScaleRewards::Batch => batch_std,
            _ if g > 1 => group_std,
            _ => 0.0,
        };
        for &r in group {
            let a = r - mean;
            let a = if scale == ScaleRewards::None {
                a
            } else {
                a / (std + 1e-4)
            };
            out.push(if a.is_nan() { 0.0 } else { a });
            // torch.isclose(std, 0): |std| <= 1e-8.
            zero += usize::from(std.abs() <= 1e-8);
        }
    }
    (out, zero as f64 / rewards.len().max(1) as f64)
}

/// One token's loss and its derivative with respect to the policy's
/// log-probability `lp`, with the sampling policy's `old` and the
/// reference's `reference` (when β > 0); and whether the ratio is clipped
/// below or above (with the advantage's sign), for TRL's clip ratios.
pub fn grpo_token_loss(
    s: &GrpoSettings,
    lp: f64,
    old: f64,
    reference: Option<f64>,
    advantage: f64,
) -> (f64, f64, (bool, bool)) {
    let r = (lp - old).exp();
    let (lo, hi) = (1.0 - s.epsilon, 1.0 + s.epsilon_high);
    let clipped = r.clamp(lo, hi);
    let (l1, l2) = (r * advantage, clipped * advantage);
    // −min(l1, l2); d r / d lp = r, and the clamp passes it inside [lo, hi].
    let (mut loss, mut d) = if l1 <= l2 || (lo..=hi).contains(&r) {
        (-l1, -advantage * r)
    } else {
        (-l2, 0.0)
    };
    if let Some(reference) = reference.filter(|_| s.beta != 0.0) {
        let x = reference - lp;
        let k3 = x.exp() - x - 1.0;
        if s.bias_correction_kl {
            // d(r · k3)/d lp = r · k3 + r · (1 − eˣ) = −r x.
            loss += s.beta * r * k3;
            d += s.beta * r * -x;
        } else {
            loss += s.beta * k3;
            d += s.beta * (1.0 - x.exp());
        }
    }
    let flags = (r < lo && advantage < 0.0, r > hi && advantage > 0.0);
    (loss, d, flags)
}

/// Completions sampled for a step's prompts, with their rewards.
#[derive(Debug, Clone)]
pub struct Sampled {
    /// Each prompt's tokens.
    pub prompts: Vec<Vec<u32>>,
    /// `num_generations` completions per prompt, prompt-major (each
    /// through its end-of-turn token, or cut at the length limit).
    pub completions: Vec<Vec<u32>>,
    /// Each completion's weighted total reward.
    pub rewards: Vec<f64>,
    /// What sampling and scoring measured (rewards per function, lengths).
    pub metrics: Metrics,
}

/// Where GRPO's prompts are sampled and scored.
pub trait RolloutSource {
    /// Training prompts.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples `num_generations` completions of each prompt in `items`
    /// from `model` with `adapter` (seeded by `step` and the prompt) and
    /// scores them.
    fn sample(
        &self,
        model: &dyn CausalLm,
        adapter: Option<Arc<dyn Adapter>>,
        items: &[usize],
        step: u64,
    ) -> Result<Sampled>;

    /// Whether there are held-out prompts.
    fn has_validation(&self) -> bool;

    /// Held-out metrics of `model` (one greedy completion per prompt).
    fn validate(&self, model: &dyn CausalLm) -> Result<Metrics>;
}

/// A micro-batch: prompts to sample, or sampled completions to train on.
#[derive(Debug, Clone)]
pub enum GrpoBatch {
    /// Indices of prompts, before sampling.
    Prompts(Vec<usize>),
    /// Completions ready to train on.
    Rollouts(Box<RolloutBatch>),
}

/// Completions with what the loss needs of them.
#[derive(Debug, Clone)]
pub struct RolloutBatch {
    /// Prompts and completions, labels on the completions.
    pub rows: TrainBatch,
    /// Each labelled token's completion (an index into `advantages` and
    /// `lens`), in [`TrainBatch::targets`] order.
    pub owner: Vec<usize>,
    /// Each completion's advantage.
    pub advantages: Vec<f64>,
    /// Each completion's length.
    pub lens: Vec<usize>,
    /// Sampling policy's log-probability per completion token (in
    /// [`TrainBatch::targets`] order), where it differs from the current
    /// policy's (`num_iterations` > 1).
    pub old: Option<Vec<f32>>,
    /// The reference's, where β > 0.
    pub reference: Option<Vec<f32>>,
}

/// Rows of prompt + completion, one per completion, right-padded,
/// labelled on the completion; and each labelled token's completion.
pub fn rollout_rows(pairs: &[(&[u32], &[u32])], pad_id: u32) -> (TrainBatch, Vec<usize>) {
    let rows: Vec<Vec<Piece>> = pairs
        .iter()
        .map(|&(p, c)| vec![Piece::context(p, 0), Piece::completion(c, 0, p.len())])
        .collect();
    let batch = pack_rows(&rows, pad_id, false);
    let owner = owners(pairs.iter().map(|(_, c)| c.len()));
    (batch, owner)
}

/// Each prompt once per row, followed by its completions: a row is the
/// prompt but its last token as a shared prefix (seen by every segment
/// after it), then per completion a segment of that last prompt token and
/// the completion, with positions continuing the prompt's. Every
/// completion token sees exactly what it sees in [`rollout_rows`] (the
/// prompt and its own earlier tokens, at the same positions), so the
/// log-probabilities and their gradients are the same, while the prompt
/// runs through the model once per group instead of once per completion.
/// Labelled tokens come completion by completion, as in [`rollout_rows`].
pub fn shared_prompt_rows(groups: &[(&[u32], &[&[u32]])], pad_id: u32) -> (TrainBatch, Vec<usize>) {
    let rows: Vec<Vec<Piece>> = groups
        .iter()
        .map(|&(p, completions)| {
            let (prefix, last) = p.split_at(p.len().saturating_sub(1));
            let mut pieces = vec![Piece::context(prefix, SHARED_SEGMENT)];
            for (k, c) in completions.iter().enumerate() {
                let segment = k as u32;
                pieces.push(Piece {
                    tokens: last.to_vec(),
                    labelled: false,
                    segment,
                    start: prefix.len(),
                });
                pieces.push(Piece::completion(c, segment, p.len()));
            }
            pieces
        })
        .collect();
    let batch = pack_rows(&rows, pad_id, true);
    let owner = owners(groups.iter().flat_map(|(_, cs)| cs.iter().map(|c| c.len())));
    (batch, owner)
}

/// A run of tokens in a row: its segment, its first position, and
/// whether its tokens are labels.
struct Piece {
    tokens: Vec<u32>,
    labelled: bool,
    segment: u32,
    start: usize,
}

impl Piece {
    fn context(tokens: &[u32], segment: u32) -> Self {
        Self {
            tokens: tokens.to_vec(),
            labelled: false,
            segment,
            start: 0,
        }
    }

    fn completion(tokens: &[u32], segment: u32, start: usize) -> Self {
        Self {
            tokens: tokens.to_vec(),
            labelled: true,
            segment,
            start,
        }
    }
}

/// Rows of pieces, right-padded; positions and segments only where
/// `packed`.
fn pack_rows(rows: &[Vec<Piece>], pad_id: u32, packed: bool) -> TrainBatch {
    let len = |r: &Vec<Piece>| r.iter().map(|p| p.tokens.len()).sum::<usize>();
    let seq = rows.iter().map(len).max().unwrap_or(0);
    let n = rows.len() * seq;
    let mut b = TrainBatch {
        batch: rows.len(),
        seq,
        ids: Vec::with_capacity(n),
        key_mask: Vec::with_capacity(n),
        positions: packed.then(|| Vec::with_capacity(n)),
        segments: packed.then(|| Vec::with_capacity(n)),
        labels: Vec::with_capacity(n),
    };
    for row in rows {
        for p in row {
            b.ids.extend(&p.tokens);
            b.labels.extend(
                p.tokens
                    .iter()
                    .map(|&t| if p.labelled { t as i64 } else { IGNORE }),
            );
            let k = p.tokens.len();
            if let Some(pos) = &mut b.positions {
                pos.extend((p.start..p.start + k).map(|i| i as u32));
            }
            if let Some(seg) = &mut b.segments {
                seg.extend(std::iter::repeat_n(p.segment, k));
            }
        }
        let pad = seq - len(row);
        b.key_mask.extend(std::iter::repeat_n(1u8, seq - pad));
        b.key_mask.extend(std::iter::repeat_n(0u8, pad));
        b.ids.extend(std::iter::repeat_n(pad_id, pad));
        b.labels.extend(std::iter::repeat_n(IGNORE, pad));
        if let Some(pos) = &mut b.positions {
            pos.extend(std::iter::repeat_n(0, pad));
        }
        if let Some(seg) = &mut b.segments {
            seg.extend(std::iter::repeat_n(SHARED_SEGMENT - 1, pad));
        }
    }
    b
}

/// Each labelled token's completion, for completions of `lens` labelled
/// in order.
fn owners(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    lens.enumerate()
        .flat_map(|(k, n)| std::iter::repeat_n(k, n))
        .collect()
}

/// GRPO's loss of `batch` under `model`, summed over its units (tokens
/// for `dapo`, completions otherwise).
pub fn grpo_loss(
    s: &GrpoSettings,
    model: &dyn CausalLm,
    batch: &RolloutBatch,
) -> Result<MicroLoss> {
    let lp = token_logps(model, &batch.rows, s.temperature)?;
    let v = lp.detach().to_vec1::<f32>()?;
    let targets = batch.rows.targets();
    let mut grad = vec![0f32; v.len()];
    let mut value = 0f64;
    let (mut kl, mut low, mut high) = (0f64, 0f64, 0f64);
    if batch.owner.len() != targets.len() {
        return Err(TrainError::Invalid(format!(
            "{} labelled tokens but {} owners",
            targets.len(),
            batch.owner.len()
        )));
    }
    for k in 0..targets.len() {
        let row = batch.owner[k];
        let lpk = v[k] as f64;
        let old = batch.old.as_ref().map_or(lpk, |o| o[k] as f64);
        let reference = batch.reference.as_ref().map(|r| r[k] as f64);
        let (loss, d, (is_low, is_high)) =
            grpo_token_loss(s, lpk, old, reference, batch.advantages[row]);
        if let Some(r) = reference.filter(|_| s.beta != 0.0) {
            let k3 = (r - lpk).exp() - (r - lpk) - 1.0;
            kl += if s.bias_correction_kl {
                (lpk - old).exp() * k3
            } else {
                k3
            };
        }
        let w = match s.loss {
            GrpoLoss::Dapo => 1.0,
            GrpoLoss::Grpo => 1.0 / batch.lens[row].max(1) as f64,
            GrpoLoss::DrGrpo => 1.0 / s.max_completion_length as f64,
        };
        value += w * loss;
        grad[k] = (w * d) as f32;
        low += f64::from(u8::from(is_low));
        high += f64::from(u8::from(is_high));
    }
    if !value.is_finite() {
        return Err(TrainError::NonFinite(format!("the GRPO loss is {value}")));
    }
    let mut token_metrics: Metrics = [
        ("clip_ratio/low_mean", low),
        ("clip_ratio/high_mean", high),
        ("clip_ratio/region_mean", low + high),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if s.beta != 0.0 {
        token_metrics.insert("kl".into(), kl);
    }
    let n = grad.len();
    let grad = Tensor::from_vec(grad, n, &Device::Cpu)?;
    Ok(MicroLoss {
        graph: (lp * grad)?.sum_all()?,
        value,
        metrics: Metrics::new(),
        token_metrics,
    })
}

/// The GRPO objective.
pub struct Grpo<'a> {
    /// Loss settings.
    pub settings: GrpoSettings,
    /// Prompts, sampling and rewards.
    pub source: &'a dyn RolloutSource,
    /// The reference policy's adapter (`None`: the base model).
    pub reference: Option<Arc<dyn Adapter>>,
    /// The model the reference runs on where it is not the trained one (a
    /// frozen copy of the starting weights, in full fine-tuning).
    pub reference_model: Option<&'a dyn CausalLm>,
    /// Padding token id.
    pub pad_id: u32,
}

impl Grpo<'_> {
    /// Per-token log-probabilities of `rows` under `model` (no gradients).
    fn frozen_logps(&self, model: &dyn CausalLm, rows: &TrainBatch) -> Result<Vec<f32>> {
        Ok(token_logps(model, rows, self.settings.temperature)?
            .detach()
            .to_vec1::<f32>()?)
    }
}

impl Objective for Grpo<'_> {
    type Batch = GrpoBatch;

    fn len(&self) -> usize {
        self.source.len()
    }

    /// `batch_size` counts completions: `batch_size / num_generations`
    /// prompts per micro-batch.
    fn batches(&self, order: &[usize], batch_size: usize) -> Vec<GrpoBatch> {
        let per = (batch_size / self.settings.num_generations.max(1)).max(1);
        order
            .chunks(per)
            .map(|c| GrpoBatch::Prompts(c.to_vec()))
            .collect()
    }

    fn prepare(
        &self,
        model: &dyn CausalLm,
        adapter: Option<Arc<dyn Adapter>>,
        group: &[GrpoBatch],
        step: u64,
    ) -> Result<Option<(Vec<GrpoBatch>, Metrics)>> {
        let micro: Vec<&[usize]> = group
            .iter()
            .map(|b| match b {
                GrpoBatch::Prompts(items) => Ok(items.as_slice()),
                GrpoBatch::Rollouts(_) => Err(TrainError::Invalid(
                    "GRPO prompts were given already sampled".into(),
                )),
            })
            .collect::<Result<_>>()?;
        let items: Vec<usize> = micro.iter().flat_map(|m| m.iter().copied()).collect();
        let g = self.settings.num_generations;
        let sampled = self.source.sample(model, adapter.clone(), &items, step)?;
        if sampled.completions.len() != items.len() * g || sampled.rewards.len() != items.len() * g
        {
            return Err(TrainError::Invalid(format!(
                "sampling returned {} completions and {} rewards for {} prompts × {g}",
                sampled.completions.len(),
                sampled.rewards.len(),
                items.len()
            )));
        }
        if let Some(bad) = sampled.rewards.iter().find(|r| !r.is_finite()) {
            return Err(TrainError::NonFinite(format!(
                "a completion's reward is {bad}; rewards must be finite numbers"
            )));
        }
        let (adv, zero_std) = advantages(&sampled.rewards, g, self.settings.scale_rewards);
        let policy = Adapted::new(model, adapter);
        let reference = Adapted::new(
            self.reference_model.unwrap_or(model),
            self.reference.clone(),
        );
        let mut out = Vec::with_capacity(micro.len());
        let mut first = 0usize; // first prompt of the micro-batch, in `items`
        for m in &micro {
            let rows_of = first * g..(first + m.len()) * g;
            first += m.len();
            let completions: Vec<&[u32]> = rows_of
                .clone()
                .map(|r| sampled.completions[r].as_slice())
                .collect();
            let groups: Vec<(&[u32], &[&[u32]])> = completions
                .chunks(g)
                .zip(&sampled.prompts[first - m.len()..first])
                .map(|(cs, p)| (p.as_slice(), cs))
                .collect();
            let (rows, owner) = shared_prompt_rows(&groups, self.pad_id);
            let old = if self.settings.num_iterations > 1 {
                Some(self.frozen_logps(&policy, &rows)?)
            } else {
                None
            };
            let reference = if self.settings.beta != 0.0 {
                Some(self.frozen_logps(&reference, &rows)?)
            } else {
                None
            };
            out.push(GrpoBatch::Rollouts(Box::new(RolloutBatch {
                advantages: adv[rows_of.clone()].to_vec(),
                lens: completions.iter().map(|c| c.len()).collect(),
                rows,
                owner,
                old,
                reference,
            })));
        }
        let mut metrics = sampled.metrics;
        let (mean, std) = mean_std(&sampled.rewards);
        metrics.insert("reward".into(), mean);
        metrics.insert("reward_std".into(), if std.is_nan() { 0.0 } else { std });
        metrics.insert("frac_reward_zero_std".into(), zero_std);
        Ok(Some((out, metrics)))
    }

    fn iterations(&self) -> u64 {
        self.settings.num_iterations.max(1)
    }

    fn units(&self, batch: &GrpoBatch) -> usize {
        match batch {
            GrpoBatch::Prompts(_) => 0,
            GrpoBatch::Rollouts(b) => match self.settings.loss {
                GrpoLoss::Dapo => b.rows.target_count(),
                GrpoLoss::Grpo | GrpoLoss::DrGrpo => b.lens.len(),
            },
        }
    }

    fn tokens(&self, batch: &GrpoBatch) -> usize {
        match batch {
            GrpoBatch::Prompts(_) => 0,
            GrpoBatch::Rollouts(b) => b.rows.target_count(),
        }
    }

    fn loss(&self, model: &dyn CausalLm, batch: &GrpoBatch) -> Result<MicroLoss> {
        match batch {
            GrpoBatch::Rollouts(b) => grpo_loss(&self.settings, model, b),
            GrpoBatch::Prompts(_) => Err(TrainError::Invalid(
                "GRPO prompts must be sampled before the loss".into(),
            )),
        }
    }

    fn validate(&self, model: &dyn CausalLm) -> Result<Metrics> {
        self.source.validate(model)
    }

    fn has_validation(&self) -> bool {
        self.source.has_validation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(beta: f64) -> GrpoSettings {
        GrpoSettings {
            loss: GrpoLoss::Dapo,
            beta,
            epsilon: 0.2,
            epsilon_high: 0.28,
            num_generations: 2,
            max_completion_length: 8,
            temperature: 1.0,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 2,
            bias_correction_kl: true,
        }
    }

    /// The token loss's derivative against a central difference, inside
    /// and outside the clipping range, for both signs of the advantage.
    #[test]
    fn token_loss_derivative_matches_finite_differences() {
        for s in [
            settings(0.04),
            GrpoSettings {
                bias_correction_kl: false,
                ..settings(0.04)
            },
        ] {
            for (shift, adv) in [
                (0.0, 1.0),
                (0.1, -0.7),
                (0.5, 1.3),
                (-0.5, -0.4),
                (0.5, -1.0),
            ] {
                let (old, reference) = (-2.0, Some(-1.7));
                let lp = old + shift;
                let (_, d, _) = grpo_token_loss(&s, lp, old, reference, adv);
                let h = 1e-6;
                let f = |x: f64| grpo_token_loss(&s, x, old, reference, adv).0;
                let num = (f(lp + h) - f(lp - h)) / (2.0 * h);
                assert!(
                    (d - num).abs() < 1e-6,
                    "shift {shift} adv {adv}: {d} vs {num}"
                );
            }
        }
    }

    #[test]
    fn advantages_follow_trl() {
        // One group with spread, one without: the second's advantages are 0.
        let (a, zero) = advantages(&[1.0, 0.0, 0.5, 0.5], 2, ScaleRewards::Group);
        let std = (0.5f64).sqrt(); // Bessel-corrected std of {1, 0}
        assert!((a[0] - 0.5 / (std + 1e-4)).abs() < 1e-12);
        assert_eq!(&a[2..], &[0.0, 0.0]);
        assert_eq!(zero, 0.5);
        let (a, _) = advantages(&[1.0, 0.0, 0.5, 0.5], 2, ScaleRewards::None);
        assert_eq!(a, vec![0.5, -0.5, 0.0, 0.0]);
    }
}
