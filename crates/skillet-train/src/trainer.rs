//! The training loop, readable top to bottom: for each optimizer step take
//! `grad_accum` micro-batches, normalize their summed loss by the labelled
//! tokens of all of them together, accumulate gradients, clip, step AdamW
//! at the scheduled learning rate; evaluate and checkpoint on cadence.
//!
//! Data order: each epoch shuffles the examples with a generator seeded by
//! (seed, epoch); dropout masks are seeded by (seed, step, micro-batch).
//! Position and moments are all a checkpoint needs for an exact resume.
//! What is optimized is the objective's ([`Objective`]): SFT, DPO and the
//! rest share this loop and its `step()`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;
use skillet_models::{Adapted, CausalLm, Rng};

use crate::checkpoint::{TrainState, save_checkpoint};
use crate::objective::{Metrics, Objective};
use crate::trainable::Trainable;
use crate::{AdamW, Result, Schedule, TrainError, backward, clip_grad_norm, collect_grads};

/// Loop settings (validated by the caller's config layer).
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Passes over the training set.
    pub epochs: u64,
    /// Stop after this many optimizer steps instead (if set).
    pub max_steps: Option<u64>,
    /// Items (examples, pairs, or packed sequences) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Evaluate on the validation set every this many steps.
    pub eval_every: Option<u64>,
    /// Checkpoint every this many steps.
    pub save_every: Option<u64>,
    /// Seed of data order and dropout.
    pub seed: u64,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// An optimizer step finished.
    Train {
        /// Steps done.
        step: u64,
        /// Of this many.
        total_steps: u64,
        /// Epoch (fractional progress through the data).
        epoch: f64,
        /// The step's loss, averaged over its units (labelled tokens, pairs).
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Tokens trained on in the step.
        tokens: usize,
        /// Those tokens per second over the step.
        tokens_per_s: f64,
        /// The objective's own metrics, averaged like the loss.
        #[serde(skip_serializing_if = "Metrics::is_empty")]
        metrics: Metrics,
    },
    /// A validation pass finished.
    Eval {
        /// After this many steps.
        step: u64,
        /// Held-out metrics (`loss` among them).
        stats: Metrics,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// After this many steps.
        step: u64,
        /// Its folder.
        path: PathBuf,
    },
}

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// The loss averaged over the step's units.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Units the loss was averaged over.
    pub units: usize,
    /// Tokens trained on.
    pub tokens: usize,
    /// The objective's metrics, averaged over the units.
    pub metrics: Metrics,
}

/// One training run: a model, what is trained on it, the optimizer and
/// the loop's position. The objective (and its data) is passed to each
/// call, so the same trainer drives SFT, DPO and the rest.
pub struct Trainer<'a> {
    /// The base model.
    pub model: &'a dyn CausalLm,
    /// The parameters trained (an adapter passed with every call, never
    /// written into the model).
    pub trainable: &'a dyn Trainable,
    /// Its optimizer.
    pub opt: AdamW,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Loop settings.
    pub settings: LoopSettings,
    /// Output folder (metrics.jsonl, checkpoints/).
    pub out: PathBuf,
    /// Recorded in checkpoints' adapter_config.json.
    pub base_model: Option<String>,
    /// Where the run stands.
    pub state: TrainState,
}

/// The item indices of one epoch in their shuffled order.
pub fn epoch_order(items: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items).collect();
    let mut rng = Rng::new(seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Micro-batches of one epoch, in order.
pub fn epoch_batches<O: Objective>(objective: &O, s: &LoopSettings, epoch: u64) -> Vec<O::Batch> {
    objective.batches(&epoch_order(objective.len(), s.seed, epoch), s.batch_size)
}

/// Optimizer steps in one epoch (the first epoch's batching decides it,
/// where packing makes it depend on the order).
pub fn steps_per_epoch<O: Objective>(objective: &O, s: &LoopSettings) -> u64 {
    epoch_batches(objective, s, 0)
        .len()
        .div_ceil(s.grad_accum.max(1)) as u64
}

impl Trainer<'_> {
    /// Total optimizer steps of the run.
    pub fn total_steps<O: Objective>(&self, objective: &O) -> u64 {
        self.settings.max_steps.unwrap_or(
            self.settings.epochs
                * steps_per_epoch(objective, &self.settings)
                * objective.iterations(),
        )
    }

    fn log(&self, event: &Event) -> Result<()> {
        let path = self.out.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
        writeln!(
            f,
            "{}",
            serde_json::to_string(event).expect("event serializes")
        )
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Held-out metrics of the model as trained so far (no dropout).
    pub fn validate<O: Objective>(&self, objective: &O) -> Result<Metrics> {
        objective.validate(&Adapted::new(self.model, self.trainable.adapter()))
    }

    /// One optimizer step over the micro-batches `group`: each one's loss
    /// divided by the units of all of them, gradients accumulated, clipped,
    /// then AdamW at the scheduled rate. Advances `state.step`. Called from
    /// a thread of a rayon pool, the pool's other threads poll for work
    /// through the step instead of sleeping between its products.
    pub fn step<O: Objective>(&mut self, objective: &O, group: &[O::Batch]) -> Result<StepStats> {
        skillet_kernels::keep_awake(|| self.step_inner(objective, group))
    }

    fn step_inner<O: Objective>(&mut self, objective: &O, group: &[O::Batch]) -> Result<StepStats> {
        let vars = self.trainable.vars();
        let adapter = self.trainable.adapter();
        let units: usize = group.iter().map(|b| objective.units(b)).sum();
        let tokens: usize = group.iter().map(|b| objective.tokens(b)).sum();
        let mut acc: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0f64;
        let mut metrics = Metrics::new();
        for (k, batch) in group.iter().enumerate() {
            if objective.units(batch) == 0 {
                continue;
            }
            let seed = self.settings.seed
                ^ (self.state.step << 16 | k as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let model = Adapted::new(self.model, adapter.clone()).with_dropout(seed);
            let part = objective.loss(&model, batch)?;
            let value = part.value / units as f64;
            if !value.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "loss is {value} at step {} (micro-batch {k}); stopping. The last checkpoint is intact; \
                     try a lower learning rate",
                    self.state.step + 1
                )));
            }
            loss_sum += value;
            for (name, v) in part.metrics {
                *metrics.entry(name).or_default() += v / units as f64;
            }
            for (name, v) in part.token_metrics {
                *metrics.entry(name).or_default() += v / tokens.max(1) as f64;
            }
            let loss = (part.graph / units as f64)?;
            let grads = collect_grads(&backward(&model, &loss)?, &vars)?;
            acc = Some(match acc {
                None => grads,
                Some(prev) => prev
                    .iter()
                    .zip(&grads)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let Some(mut grads) = acc else {
            return Err(TrainError::Invalid("a step had nothing to train on".into()));
        };
        let grad_norm = match self.settings.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => crate::grad_norm(&grads)?,
        };
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite(format!(
                "gradient norm is {grad_norm} at step {}; stopping",
                self.state.step + 1
            )));
        }
        let lr = self.schedule.lr(self.state.step);
        self.opt.step(&grads, lr)?;
        self.state.step += 1;
        Ok(StepStats {
            loss: loss_sum,
            grad_norm,
            lr,
            units,
            tokens,
            metrics,
        })
    }

    /// Runs `objective` until the last step, reporting each event to
    /// `on_event`. Each group of `grad_accum` micro-batches is prepared by
    /// the objective (GRPO samples here) and trained on for its
    /// `iterations()` steps; checkpoints fall between groups, so a resume
    /// prepares the next group as the run would have.
    pub fn run<O: Objective>(
        &mut self,
        objective: &O,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        let total = self.total_steps(objective);
        let iterations = objective.iterations().max(1);
        let mut batches = epoch_batches(objective, &self.settings, self.state.epoch);
        while self.state.step < total {
            if self.state.micro as usize >= batches.len() {
                self.state.epoch += 1;
                self.state.micro = 0;
                batches = epoch_batches(objective, &self.settings, self.state.epoch);
            }
            let start = Instant::now();
            let from = self.state.micro as usize;
            let group = &batches[from..(from + self.settings.grad_accum).min(batches.len())];
            let prepared =
                objective.prepare(self.model, self.trainable.adapter(), group, self.state.step)?;
            let (ready, extra) = match &prepared {
                Some((g, m)) => (g.as_slice(), m.clone()),
                None => (group, Metrics::new()),
            };
            for iteration in 0..iterations {
                let started = if iteration == 0 {
                    start
                } else {
                    Instant::now()
                };
                let stats = self.step(objective, ready)?;
                let last = iteration + 1 == iterations || self.state.step == total;
                if last {
                    self.state.micro += group.len() as u64;
                }
                self.state.tokens += stats.tokens as u64;
                let mut metrics = stats.metrics;
                metrics.extend(extra.iter().map(|(k, v)| (k.clone(), *v)));
                let event = Event::Train {
                    step: self.state.step,
                    total_steps: total,
                    epoch: self.state.epoch as f64 + self.state.micro as f64 / batches.len() as f64,
                    loss: stats.loss,
                    lr: stats.lr,
                    grad_norm: stats.grad_norm,
                    tokens: stats.tokens,
                    tokens_per_s: stats.tokens as f64 / started.elapsed().as_secs_f64(),
                    metrics,
                };
                self.log(&event)?;
                on_event(&event);
                self.after_step(objective, total, last, on_event)?;
                if last {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Evaluation and checkpoint on their cadence after a step; a
    /// checkpoint only where a prepared group is finished (`group_done`).
    fn after_step<O: Objective>(
        &mut self,
        objective: &O,
        total: u64,
        group_done: bool,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        let due =
            |every: Option<u64>| every.is_some_and(|e| e > 0 && self.state.step.is_multiple_of(e));
        if objective.has_validation() && (due(self.settings.eval_every) || self.state.step == total)
        {
            let event = Event::Eval {
                step: self.state.step,
                stats: self.validate(objective)?,
            };
            self.log(&event)?;
            on_event(&event);
        }
        if group_done && (due(self.settings.save_every) || self.state.step == total) {
            let path = save_checkpoint(
                &self.out,
                &self.state,
                self.trainable,
                &self.opt,
                self.base_model.clone(),
            )?;
            let event = Event::Checkpoint {
                step: self.state.step,
                path,
            };
            on_event(&event);
        }
        Ok(())
    }
}

/// Reads `metrics.jsonl` back (for reports and plots).
pub fn read_metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
