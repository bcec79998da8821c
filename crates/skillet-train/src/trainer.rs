//! The training loop, readable top to bottom: for each optimizer step take
//! `grad_accum` micro-batches, normalize their summed loss by the labelled
//! tokens of all of them together, accumulate gradients, clip, step AdamW
//! at the scheduled learning rate; evaluate and checkpoint on cadence.
//!
//! Data order: each epoch shuffles the examples with a generator seeded by
//! (seed, epoch); dropout masks are seeded by (seed, step, micro-batch).
//! Position and moments are all a checkpoint needs for an exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;
use skillet_adapters::LoraAdapter;
use skillet_data::{TokenizedExample, pack};
use skillet_models::{Adapted, Adapter, CausalLm, Rng};

use crate::checkpoint::{TrainState, save_checkpoint};
use crate::eval::{EvalStats, evaluate};
use crate::{
    AdamW, Result, Schedule, TrainBatch, TrainError, backward, causal_lm_loss, clip_grad_norm,
    collate, collate_packed, collect_grads,
};

/// Loop settings (validated by the caller's config layer).
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Passes over the training set.
    pub epochs: u64,
    /// Stop after this many optimizer steps instead (if set).
    pub max_steps: Option<u64>,
    /// Examples (or packed sequences) per micro-batch.
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
    /// Pack examples into sequences of `max_seq_len` tokens.
    pub packing: Option<usize>,
    /// Padding token id.
    pub pad_id: u32,
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
        /// Mean loss of the step's labelled tokens.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Labelled tokens in the step.
        tokens: usize,
        /// Labelled tokens per second over the step.
        tokens_per_s: f64,
    },
    /// A validation pass finished.
    Eval {
        /// After this many steps.
        step: u64,
        /// Held-out statistics.
        stats: EvalStats,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// After this many steps.
        step: u64,
        /// Its folder.
        path: PathBuf,
    },
}

/// One training run over tokenized data.
pub struct Trainer<'a> {
    /// The base model.
    pub model: &'a dyn CausalLm,
    /// The adapter being trained (passed with every call, never written
    /// into the model).
    pub adapter: &'a LoraAdapter,
    /// Its optimizer.
    pub opt: AdamW,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Loop settings.
    pub settings: LoopSettings,
    /// Training examples.
    pub train: &'a [TokenizedExample],
    /// Validation examples.
    pub valid: &'a [TokenizedExample],
    /// Output folder (metrics.jsonl, checkpoints/).
    pub out: PathBuf,
    /// Recorded in checkpoints' adapter_config.json.
    pub base_model: Option<String>,
    /// Where the run stands.
    pub state: TrainState,
}

/// The examples of one epoch in their shuffled order.
fn epoch_order<'t>(
    train: &'t [TokenizedExample],
    s: &LoopSettings,
    epoch: u64,
) -> Vec<&'t TokenizedExample> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = Rng::new(s.seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order.iter().map(|&i| &train[i]).collect()
}

/// Micro-batches of one epoch, as batches ready for the model.
pub fn epoch_batches(train: &[TokenizedExample], s: &LoopSettings, epoch: u64) -> Vec<TrainBatch> {
    let examples = epoch_order(train, s, epoch);
    match s.packing {
        Some(max_len) => {
            let packed = pack(&examples, max_len);
            packed
                .chunks(s.batch_size)
                .map(|c| collate_packed(&c.iter().collect::<Vec<_>>(), s.pad_id))
                .collect()
        }
        None => examples
            .chunks(s.batch_size)
            .map(|c| collate(c, s.pad_id))
            .collect(),
    }
}

/// Optimizer steps in one epoch (counted without building the batches;
/// with packing, the first epoch's packing decides the count).
pub fn steps_per_epoch(train: &[TokenizedExample], s: &LoopSettings) -> u64 {
    let rows = match s.packing {
        Some(max_len) => pack(&epoch_order(train, s, 0), max_len).len(),
        None => train.len(),
    };
    rows.div_ceil(s.batch_size.max(1))
        .div_ceil(s.grad_accum.max(1)) as u64
}

impl Trainer<'_> {
    /// Total optimizer steps of the run.
    pub fn total_steps(&self) -> u64 {
        self.settings
            .max_steps
            .unwrap_or(self.settings.epochs * steps_per_epoch(self.train, &self.settings))
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

    fn shared_adapter(&self) -> Arc<dyn Adapter> {
        Arc::new(self.adapter.clone())
    }

    /// Held-out statistics (no dropout).
    pub fn validate(&self) -> Result<EvalStats> {
        evaluate(
            &Adapted::new(self.model, Some(self.shared_adapter())),
            self.valid,
            self.settings.batch_size,
            self.settings.pad_id,
        )
    }

    /// Runs until the last step, reporting each event to `on_event`.
    pub fn run(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let total = self.total_steps();
        let vars = self.adapter.vars();
        let adapter = self.shared_adapter();
        let mut batches = epoch_batches(self.train, &self.settings, self.state.epoch);
        while self.state.step < total {
            if self.state.micro as usize >= batches.len() {
                self.state.epoch += 1;
                self.state.micro = 0;
                batches = epoch_batches(self.train, &self.settings, self.state.epoch);
            }
            let start = Instant::now();
            let from = self.state.micro as usize;
            let group = &batches[from..(from + self.settings.grad_accum).min(batches.len())];
            let targets: usize = group.iter().map(TrainBatch::target_count).sum();
            let mut acc: Option<Vec<Tensor>> = None;
            let mut loss_sum = 0f64;
            for (k, batch) in group.iter().enumerate() {
                let seed = self.settings.seed
                    ^ (self.state.step << 16 | k as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                let model = Adapted::new(self.model, Some(adapter.clone())).with_dropout(seed);
                let parts = causal_lm_loss(&model, batch)?;
                if parts.tokens == 0 {
                    continue;
                }
                let loss = (parts.sum / targets as f64)?;
                let value = loss.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    return Err(TrainError::NonFinite(format!(
                        "loss is {value} at step {} (micro-batch {k}); stopping. The last checkpoint is intact; \
                         try a lower learning rate",
                        self.state.step + 1
                    )));
                }
                loss_sum += value;
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
                return Err(TrainError::Invalid("a step had no labelled tokens".into()));
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
            self.state.micro += group.len() as u64;
            self.state.tokens += targets as u64;
            let event = Event::Train {
                step: self.state.step,
                total_steps: total,
                epoch: self.state.epoch as f64 + self.state.micro as f64 / batches.len() as f64,
                loss: loss_sum,
                lr,
                grad_norm,
                tokens: targets,
                tokens_per_s: targets as f64 / start.elapsed().as_secs_f64(),
            };
            self.log(&event)?;
            on_event(&event);
            let due = |every: Option<u64>| {
                every.is_some_and(|e| e > 0 && self.state.step.is_multiple_of(e))
            };
            if !self.valid.is_empty() && (due(self.settings.eval_every) || self.state.step == total)
            {
                let event = Event::Eval {
                    step: self.state.step,
                    stats: self.validate()?,
                };
                self.log(&event)?;
                on_event(&event);
            }
            if due(self.settings.save_every) || self.state.step == total {
                let path = save_checkpoint(
                    &self.out,
                    &self.state,
                    self.adapter,
                    &self.opt,
                    self.base_model.clone(),
                )?;
                let event = Event::Checkpoint {
                    step: self.state.step,
                    path,
                };
                on_event(&event);
            }
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
