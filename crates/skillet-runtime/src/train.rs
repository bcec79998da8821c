//! A training run from one validated config: load the data (every
//! problem found before anything is written), evaluate the base model,
//! train a LoRA adapter with checkpoints and exact resume, evaluate the
//! tuned model the same way, and write the adapter and a report (Markdown,
//! JSON, loss plot) into the output folder. Front ends watch it through
//! [`TrainProgress`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use skillet_adapters::{
    LoraAdapter, LoraSettings, PeftFile, RewardAdapter, read_lora_peft, read_peft,
};
use skillet_data::{EncodeOptions, Example, split_fraction};
use skillet_eval::{Columns, RunFacts, Snapshot, exact_match, general_perplexity, write_report};
use skillet_models::export::SCORE_HEAD;
use skillet_models::{Activations, Adapted, Adapter, CausalLm, MemoryWeights, Model};
use skillet_train::{
    AdamW, AdamWConfig, Dpo, Event, FullWeights, Grpo, LoopSettings, MethodConfig, Objective,
    PairSet, Reward, RunConfig, SamplingActivations, Schedule, Sft, TrainState, Trainable, Trainer,
    Tuning, latest_checkpoint, load_checkpoint_state, pair_logps, read_metrics, steps_per_epoch,
};

use crate::pairs::{PairData, ReferenceLogps};
use crate::{Bundle, Dataset, Result, RuntimeError};
use crate::{PromptSet, PromptSource, RewardFn};

/// What a front end is told while a run goes on.
pub trait TrainProgress {
    /// A long phase began (evaluating, generating); `None` when it ended.
    fn phase(&mut self, _what: Option<&str>) {}
    /// Training is about to start.
    fn started(&mut self, _summary: &TrainSummary) {}
    /// A step, evaluation or checkpoint finished.
    fn event(&mut self, _event: &Event) {}
}

/// The size of a run, known before its first step.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Trainable parameters.
    pub parameters: usize,
    /// What the data holds: `examples` or `pairs`.
    pub items: &'static str,
    /// Training examples (or pairs).
    pub train_examples: usize,
    /// Held-out examples.
    pub valid_examples: usize,
    /// Training examples cut to `max_seq_len`.
    pub truncated: usize,
    /// The length they were cut to.
    pub max_seq_len: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// Steps already done (when resuming).
    pub done_steps: u64,
}

/// What a finished run left behind.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The report as Markdown.
    pub report: String,
    /// The trained adapter (PEFT format), or the trained model (a Hugging
    /// Face folder) in full fine-tuning.
    pub adapter_dir: PathBuf,
    /// report.md.
    pub report_path: PathBuf,
}

/// Window of the general-text perplexity (the forgetting check).
const GENERAL_WINDOW: usize = 1024;

/// The data of a run: train and held-out sets, of examples or of pairs.
enum RunData {
    Sft { train: Dataset, valid: Dataset },
    Pairs { train: PairData, valid: PairData },
    Prompts { train: PromptSet, valid: PromptSet },
}

impl RunData {
    fn load(cfg: &RunConfig, bundle: &Bundle) -> Result<Self> {
        let opts = EncodeOptions {
            max_seq_len: cfg.data.max_seq_len,
            train_on_prompt: cfg.data.train_on_prompt,
            add_eos: cfg.data.add_eos,
        };
        Ok(match &cfg.method {
            MethodConfig::Sft => {
                let (train, valid) = train_and_valid(
                    cfg,
                    |p| Dataset::load(p, cfg.data.format, bundle, opts),
                    |d| d.examples.len(),
                    Dataset::subset,
                )?;
                RunData::Sft { train, valid }
            }
            MethodConfig::Dpo(_) | MethodConfig::Reward(_) => {
                let (format, max_prompt) = cfg.method.pairs().expect("a pair method");
                let (train, valid) = train_and_valid(
                    cfg,
                    |p| PairData::load(p, format, bundle, opts, max_prompt),
                    |d| d.pairs.len(),
                    PairData::subset,
                )?;
                RunData::Pairs { train, valid }
            }
            MethodConfig::Grpo(g) => {
                let room = cfg.data.max_seq_len - g.max_completion_length;
                let (train, valid) = train_and_valid(
                    cfg,
                    |p| PromptSet::load(p, bundle, room),
                    |d| d.ids.len(),
                    PromptSet::subset,
                )?;
                RunData::Prompts { train, valid }
            }
        })
    }

    /// (train, held-out) item counts.
    fn sizes(&self) -> (usize, usize) {
        match self {
            RunData::Sft { train, valid } => (train.tokenized.len(), valid.tokenized.len()),
            RunData::Pairs { train, valid } => (train.tokenized.len(), valid.tokenized.len()),
            RunData::Prompts { train, valid } => (train.ids.len(), valid.ids.len()),
        }
    }

    /// (train, held-out) items cut by truncation.
    fn truncated(&self) -> (usize, usize) {
        match self {
            RunData::Sft { train, valid } => (train.truncated(), valid.truncated()),
            RunData::Pairs { train, valid } => (train.truncated(), valid.truncated()),
            RunData::Prompts { .. } => (0, 0),
        }
    }

    /// Held-out examples with a reference answer, for exact match (none
    /// for a reward model, which does not generate).
    fn answers(&self, method: &MethodConfig) -> Vec<(usize, Example)> {
        match (self, method) {
            (_, MethodConfig::Reward(_)) | (RunData::Prompts { .. }, _) => Vec::new(),
            (RunData::Sft { valid, .. }, _) => valid.examples.clone(),
            (RunData::Pairs { valid, .. }, _) => valid.chosen_examples(),
        }
    }
}

/// The training file and the held-out file, or, without one, the seeded
/// split of the training file.
fn train_and_valid<T>(
    cfg: &RunConfig,
    load: impl Fn(&Path) -> Result<T>,
    len: impl Fn(&T) -> usize,
    subset: impl Fn(&T, &[usize]) -> T,
) -> Result<(T, T)> {
    let all = load(&cfg.data.train)?;
    Ok(match &cfg.data.validation {
        Some(v) => (all, load(v)?),
        None => {
            let (t, v) = split_fraction(len(&all), cfg.data.validation_fraction, cfg.seed);
            (subset(&all, &t), subset(&all, &v))
        }
    })
}

/// A starting adapter (`init_adapter` or a checkpoint): LoRA factors, and
/// for a reward model the score head where the folder has one (a plain
/// LoRA adapter, e.g. from SFT, starts a fresh head).
fn read_start(dir: &Path, reward: bool) -> Result<PeftFile> {
    Ok(if reward {
        read_peft(dir)?
    } else {
        read_lora_peft(dir)?
    })
}

/// Base or tuned model evaluated the same way: `heldout` metrics (from the
/// objective), exact match of held-out answers, general-text perplexity.
#[allow(clippy::too_many_arguments)]
fn snapshot(
    model: &dyn CausalLm,
    heldout: Option<skillet_train::Metrics>,
    bundle: &Bundle,
    cfg: &RunConfig,
    answers: &[(usize, Example)],
    general: Option<&str>,
    what: &str,
    progress: &mut dyn TrainProgress,
) -> Result<Snapshot> {
    let em = if cfg.eval.generate && !answers.is_empty() {
        progress.phase(Some(&format!(
            "generating held-out answers with the {what} model"
        )));
        Some(exact_match(
            model,
            &bundle.tokenizer,
            bundle.template.as_ref(),
            answers,
            cfg.eval.max_new_tokens,
            skillet_eval::EXACT_MATCH_BATCH,
        )?)
    } else {
        None
    };
    let gen_stats = match general {
        // The same 1024-token windows as `skillet eval`, whatever the training length.
        Some(text) => Some(general_perplexity(
            model,
            &bundle.tokenizer,
            text,
            GENERAL_WINDOW,
        )?),
        None => None,
    };
    progress.phase(None);
    Ok(Snapshot::new(
        heldout.as_ref(),
        em.as_ref(),
        gen_stats.as_ref(),
    ))
}

/// Held-out metrics of `model` under `objective`, if there is held-out data.
fn heldout<O: Objective>(
    objective: &O,
    model: &dyn CausalLm,
    what: &str,
    progress: &mut dyn TrainProgress,
) -> Result<Option<skillet_train::Metrics>> {
    if !objective.has_validation() {
        return Ok(None);
    }
    progress.phase(Some(&format!("evaluating the {what} model")));
    Ok(Some(objective.validate(model)?))
}

fn prepare_output(dir: &Path, overwrite: bool) -> Result<()> {
    let not_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if not_empty && !overwrite {
        return Err(RuntimeError::Invalid(format!(
            "{}: the output folder is not empty; use --resume {} to continue it, --overwrite, or another output_dir",
            dir.display(),
            dir.display()
        )));
    }
    let checkpoints = dir.join("checkpoints");
    if overwrite && checkpoints.exists() {
        std::fs::remove_dir_all(&checkpoints).map_err(RuntimeError::io(checkpoints))?;
        let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
    }
    std::fs::create_dir_all(dir).map_err(RuntimeError::io(dir))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(RuntimeError::io(path))
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(RuntimeError::io(path))
}

/// Runs the training `cfg` describes: a new run (its output folder must be
/// empty unless `overwrite`), or, with `resuming`, the continuation of the
/// run in `cfg.output_dir` from its latest checkpoint.
pub fn run_training(
    cfg: &RunConfig,
    resuming: bool,
    overwrite: bool,
    progress: &mut dyn TrainProgress,
) -> Result<TrainOutcome> {
    let out = cfg.output_dir.clone();
    let bundle = Bundle::open(&cfg.model)?;
    // Everything that can be wrong with the data is found before anything
    // is written or trained.
    let data = RunData::load(cfg, &bundle)?;
    if data.sizes().0 == 0 {
        return Err(RuntimeError::Invalid(format!(
            "{}: no training examples",
            cfg.data.train.display()
        )));
    }
    // The forgetting check reads the LM head, which a reward model does
    // not use.
    let general = match (&cfg.eval.general, &cfg.method) {
        (_, MethodConfig::Reward(_)) | (None, _) => None,
        (Some(p), _) => Some(read_text(p)?),
    };
    let mut settings = LoraSettings::new(
        cfg.lora.r,
        cfg.lora.alpha,
        cfg.lora.dropout,
        cfg.lora.use_rslora,
        cfg.targets()?,
    )?;
    settings.use_dora = cfg.lora.use_dora;
    // Read a starting adapter before anything is written, so a bad path
    // leaves no output folder behind.
    let reward = matches!(cfg.method, MethodConfig::Reward(_));
    let init_weights =
        match (&cfg.lora.init_adapter, resuming) {
            (Some(dir), false) => Some(read_start(dir, reward).map_err(|e| {
                RuntimeError::Invalid(format!("init_adapter {}: {e}", dir.display()))
            })?),
            _ => None,
        };
    if let Some(f) = &init_weights
        && f.config.use_dora != settings.use_dora
    {
        return Err(RuntimeError::Invalid(format!(
            "init_adapter {}: it was trained with use_dora = {}, the run sets lora.use_dora = {}",
            cfg.lora
                .init_adapter
                .as_deref()
                .unwrap_or(Path::new(""))
                .display(),
            f.config.use_dora,
            settings.use_dora
        )));
    }
    let checkpoint = if resuming {
        Some(latest_checkpoint(&out).ok_or_else(|| {
            RuntimeError::Invalid(format!("{}: no checkpoint to resume from", out.display()))
        })?)
    } else {
        prepare_output(&out, overwrite)?;
        write_text(&out.join("config.toml"), &cfg.to_toml())?;
        None
    };

    let precision = products(cfg);
    let full = cfg.train.tuning == Tuning::Full;
    let mut model = match (&checkpoint, full) {
        // Full fine-tuning: every weight a variable; a resumed run starts
        // from the checkpoint's model folder.
        (Some(dir), true) => load_full(&Bundle::open(dir)?, &cfg.train.frozen()?)?,
        (None, true) => load_full(&bundle, &cfg.train.frozen()?)?,
        _ => bundle.load_model(skillet_models::LoadOptions {
            keep_quantized: cfg.lora.keep_base_quantized,
            // Products in bf16 round the frozen base anyway: hold it in bf16.
            frozen_bf16: precision.holds_base_in_bf16(),
            quantize: cfg.lora.quantize_base.map(|q| match q {
                skillet_train::QuantizeBase::Nf4 => skillet_models::QuantizeBase::Nf4 {
                    double_quant: cfg.lora.double_quant,
                },
            }),
            ..Default::default()
        })?,
    };
    let initial = match &checkpoint {
        // A full fine-tuning checkpoint is the model itself, loaded above.
        Some(_) if full => None,
        Some(dir) => Some(read_start(dir, reward)?),
        None => init_weights,
    };
    let run = Run {
        cfg,
        bundle: &bundle,
        general: general.as_deref(),
        resuming,
        out: &out,
    };
    let (
        Measured {
            facts,
            base,
            start,
            tuned,
        },
        adapter,
    ) = match &data {
        RunData::Sft { train, valid } => {
            let objective = Sft {
                train: &train.tokenized,
                valid: &valid.tokenized,
                packing: cfg.data.packing.then_some(cfg.data.max_seq_len),
                pad_id: bundle.pad_id(),
                eval_batch: cfg.eval.batch_size,
            };
            // Measured in f32 (training sets its precision later).
            let adapter = run.trainable(&model, &settings, initial.as_ref())?;
            let r = run.evaluate_and_train(
                &objective,
                &mut model,
                &*adapter,
                checkpoint.as_deref(),
                &data,
                progress,
            )?;
            (r, adapter)
        }
        RunData::Prompts { train, valid } => {
            let MethodConfig::Grpo(g) = &cfg.method else {
                unreachable!("prompts are loaded for GRPO")
            };
            model.set_precision(precision);
            let adapter = run.trainable(&model, &settings, initial.as_ref())?;
            // The reference: the starting adapter frozen, or the base; only
            // computed when the KL term is on.
            let reference = match (&cfg.lora.init_adapter, g.beta != 0.0) {
                (Some(dir), true) => {
                    Some(Arc::new(LoraAdapter::load(&model, dir)?) as Arc<dyn Adapter>)
                }
                _ => None,
            };
            // Full fine-tuning changes the weights themselves: the
            // reference is a frozen copy of the starting ones.
            let reference_model = match (full, g.beta != 0.0) {
                // Multiplied in the policy's precision, so that the first
                // step sees policy and reference equal.
                (true, true) => {
                    let mut m = bundle.load_model(Default::default())?;
                    m.set_precision(precision);
                    Some(m)
                }
                _ => None,
            };
            let rewards = RewardFn::build_all(&g.rewards, &model)?;
            // A copy in quantized blocks holds the base, which full
            // fine-tuning does not keep.
            let sampler = crate::quantized_sampler(&bundle, cfg.lora.keep_base_quantized || full)?;
            let source = PromptSource {
                train,
                valid,
                tokenizer: &bundle.tokenizer,
                rewards: &rewards,
                settings: g.settings(),
                top_p: g.top_p,
                seed: cfg.seed,
                pad_id: bundle.pad_id(),
                sampler: sampler.as_ref().map(|m| m as &dyn CausalLm),
                activations: match g.sampling_activations {
                    SamplingActivations::F32 => Activations::F32,
                    SamplingActivations::Int8 => Activations::Int8,
                },
                ignore_eos: false,
            };
            let objective = Grpo {
                settings: g.settings(),
                source: &source,
                reference,
                reference_model: reference_model.as_ref().map(|m| m as &dyn CausalLm),
                pad_id: bundle.pad_id(),
            };
            let r = run.evaluate_and_train(
                &objective,
                &mut model,
                &*adapter,
                checkpoint.as_deref(),
                &data,
                progress,
            )?;
            (r, adapter)
        }
        RunData::Pairs { train, valid } if reward => {
            let MethodConfig::Reward(r) = &cfg.method else {
                unreachable!("a reward run")
            };
            model.set_precision(precision);
            let (score, adapter): (Tensor, Box<dyn Trainable + '_>) = if full {
                // Every weight and the head; a resumed run's head is in
                // its checkpoint's model folder.
                let head = match &checkpoint {
                    Some(dir) => crate::reward::read_score_head(&Bundle::open(dir)?)?,
                    None => {
                        skillet_adapters::fresh_score_head(model.config().hidden_size, cfg.seed)?
                    }
                };
                let var = candle_core::Var::from_tensor(&head)?;
                let trainable = FullModel {
                    weights: FullWeights {
                        named: model.parameters().to_vec(),
                    },
                    frozen: model.frozen_parameters().to_vec(),
                    score: Some(var.clone()),
                    bundle: &bundle,
                };
                (var.as_tensor().clone(), Box::new(trainable))
            } else {
                let a = RewardAdapter::new(&model, &settings, cfg.seed, initial.as_ref())?;
                (a.score.clone(), Box::new(a))
            };
            let objective = Reward {
                settings: r.settings(),
                score,
                train: &train.tokenized,
                valid: &valid.tokenized,
                pad_id: bundle.pad_id(),
                eval_batch: cfg.eval.batch_size,
            };
            // The base column is the body without the adapter, under the
            // starting head.
            let r = run.evaluate_and_train(
                &objective,
                &mut model,
                &*adapter,
                checkpoint.as_deref(),
                &data,
                progress,
            )?;
            (r, adapter)
        }
        RunData::Pairs { train, valid } => {
            let MethodConfig::Dpo(d) = &cfg.method else {
                unreachable!("pairs are loaded for DPO and reward models")
            };
            // The reference and the policy multiply alike, so that the
            // first step sees them equal.
            model.set_precision(precision);
            let adapter = run.trainable(&model, &settings, initial.as_ref())?;
            let reference = run.reference(&model, &*adapter, train, valid, progress)?;
            let objective = Dpo {
                settings: d.settings(),
                train: PairSet {
                    pairs: &train.tokenized,
                    reference: &reference.train,
                },
                valid: PairSet {
                    pairs: &valid.tokenized,
                    reference: &reference.valid,
                },
                pad_id: bundle.pad_id(),
                eval_batch: cfg.eval.batch_size,
            };
            let r = run.evaluate_and_train(
                &objective,
                &mut model,
                &*adapter,
                checkpoint.as_deref(),
                &data,
                progress,
            )?;
            (r, adapter)
        }
    };
    let adapter_dir = out.join(if full { "model" } else { "adapter" });
    adapter.save(&adapter_dir, Some(cfg.model.display().to_string()))?;
    let columns = Columns {
        base: &base,
        start: start.as_ref(),
        tuned: &tuned,
    };
    let report = write_report(&out, &facts, columns, &read_metrics(&out))
        .map_err(RuntimeError::io(out.join("report.md")))?;
    Ok(TrainOutcome {
        report,
        adapter_dir,
        report_path: out.join("report.md"),
    })
}

/// How full fine-tuning loads a model: every weight a variable.
const FULL: skillet_models::LoadOptions = skillet_models::LoadOptions {
    keep_quantized: false,
    composed_ops: false,
    trainable: true,
    frozen_bf16: false,
    quantize: None,
};

/// The precision of a run's products: `train.precision`, where `auto`
/// keeps full fine-tuning in f32 (bf16 there is asked for by name: its
/// loss and gradients are f32's to bf16 precision, but once trained, the
/// weights' small updates reach the rounded products unevenly, and on the
/// bundled example the loss curve leaves f32's after the first update).
/// In bf16 a trained weight's products round its f32 master copy on each
/// call, and frozen ones (`train.freeze`, a reference model) round the
/// same values, so a reference loaded from the starting weights (GRPO's)
/// gives the policy's numbers at the start up to the order of f32 sums.
fn products(cfg: &RunConfig) -> skillet_models::Precision {
    match (cfg.train.tuning, cfg.train.precision) {
        (Tuning::Full, skillet_train::PrecisionSetting::Auto) => skillet_models::Precision::F32,
        (_, setting) => setting.resolve(),
    }
}

/// A model for full fine-tuning from `b`: every weight a variable but those
/// `freeze` names, a freeze pattern that matches nothing refused.
fn load_full(b: &Bundle, freeze: &skillet_train::Freeze) -> Result<Model> {
    let weights = b.source.weights(&b.config)?;
    let model = Model::load_freezing(b.config.clone(), weights.as_ref(), FULL, &|n| {
        freeze.is_frozen(n)
    })?;
    let names: Vec<&str> = model
        .parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .chain(model.frozen_parameters().iter().map(|(n, _)| n.as_str()))
        .collect();
    freeze.check(&names)?;
    Ok(model)
}

/// Full fine-tuning's parameters: every weight of the model, saved (and
/// checkpointed) as a Hugging Face folder with the run's tokenizer and
/// chat template, which transformers and `skillet` load as a model. The
/// weights left frozen are saved with the trained ones.
struct FullModel<'b> {
    weights: FullWeights,
    frozen: Vec<(String, Tensor)>,
    /// A reward model's `score` head, trained with the body and saved as
    /// `score.weight` (the folder is then a sequence classifier).
    score: Option<candle_core::Var>,
    bundle: &'b Bundle,
}

impl Trainable for FullModel<'_> {
    fn vars(&self) -> Vec<candle_core::Var> {
        let mut v = self.weights.vars();
        v.extend(self.score.clone());
        v
    }

    fn adapter(&self) -> Option<Arc<dyn Adapter>> {
        None
    }

    fn save(&self, dir: &Path, _base_model: Option<String>) -> skillet_train::Result<()> {
        let mut tensors: std::collections::HashMap<String, Tensor> = self
            .weights
            .named
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .chain(self.frozen.iter().cloned())
            .collect();
        if let Some(score) = &self.score {
            tensors.insert(SCORE_HEAD.into(), score.as_tensor().clone());
        }
        crate::write_hf_folder(self.bundle, &MemoryWeights { tensors }, dir)
            .map_err(|e| skillet_train::TrainError::Invalid(format!("{}: {e}", dir.display())))
    }
}

/// A trained run's facts and the evaluations its report compares.
struct Measured {
    facts: RunFacts,
    base: Snapshot,
    start: Option<Snapshot>,
    tuned: Snapshot,
}

/// What every phase of one run shares.
struct Run<'r> {
    cfg: &'r RunConfig,
    bundle: &'r Bundle,
    general: Option<&'r str>,
    resuming: bool,
    out: &'r Path,
}

impl<'r> Run<'r> {
    /// What the run trains: a LoRA adapter (from `initial` where given),
    /// or, in full fine-tuning, `model`'s own weights.
    fn trainable(
        &self,
        model: &Model,
        settings: &LoraSettings,
        initial: Option<&PeftFile>,
    ) -> Result<Box<dyn Trainable + 'r>> {
        Ok(match self.cfg.train.tuning {
            Tuning::Full => Box::new(FullModel {
                weights: FullWeights {
                    named: model.parameters().to_vec(),
                },
                frozen: model.frozen_parameters().to_vec(),
                score: None,
                bundle: self.bundle,
            }),
            Tuning::Lora => Box::new(LoraAdapter::start(model, settings, self.cfg.seed, initial)?),
        })
    }

    /// The base model (and the starting adapter, where there is one)
    /// evaluated, then `adapter` trained on `objective` from `checkpoint`
    /// (or the start) and the tuned model evaluated.
    fn evaluate_and_train<O: Objective>(
        &self,
        objective: &O,
        model: &mut Model,
        adapter: &dyn Trainable,
        checkpoint: Option<&Path>,
        data: &RunData,
        progress: &mut dyn TrainProgress,
    ) -> Result<Measured> {
        let base = self.base_snapshot(objective, model, data, progress)?;
        let start = self.start_snapshot(
            objective,
            &Adapted::new(&*model, adapter.adapter()),
            data,
            progress,
        )?;
        let (facts, tuned) = self.train(objective, model, adapter, checkpoint, data, progress)?;
        Ok(Measured {
            facts,
            base,
            start,
            tuned,
        })
    }

    /// The base model's evaluation: measured on a new run and saved, read
    /// back on a resumed one.
    fn base_snapshot<O: Objective>(
        &self,
        objective: &O,
        model: &Model,
        data: &RunData,
        progress: &mut dyn TrainProgress,
    ) -> Result<Snapshot> {
        self.saved_snapshot("base", objective, model, data, progress)
    }

    /// The starting adapter's evaluation, where training continues one
    /// (`init_adapter`): `model` is the base with it.
    fn start_snapshot<O: Objective>(
        &self,
        objective: &O,
        model: &dyn CausalLm,
        data: &RunData,
        progress: &mut dyn TrainProgress,
    ) -> Result<Option<Snapshot>> {
        if self.cfg.lora.init_adapter.is_none() {
            return Ok(None);
        }
        Ok(Some(self.saved_snapshot(
            "start", objective, model, data, progress,
        )?))
    }

    /// `model` evaluated as `what` (`base`, `start`): measured on a new
    /// run and saved as `{what}_eval.json`, read back on a resumed one.
    fn saved_snapshot<O: Objective>(
        &self,
        what: &str,
        objective: &O,
        model: &dyn CausalLm,
        data: &RunData,
        progress: &mut dyn TrainProgress,
    ) -> Result<Snapshot> {
        let path = self.out.join(format!("{what}_eval.json"));
        if self.resuming {
            return Ok(serde_json::from_str(&read_text(&path)?)?);
        }
        let metrics = heldout(objective, model, what, progress)?;
        let s = snapshot(
            model,
            metrics,
            self.bundle,
            self.cfg,
            &data.answers(&self.cfg.method),
            self.general,
            what,
            progress,
        )?;
        write_text(&path, &serde_json::to_string_pretty(&s)?)?;
        Ok(s)
    }

    /// DPO's reference log-probabilities: the starting policy's (the base
    /// with a fresh adapter, whose B is zero, or the starting adapter
    /// frozen), computed once and saved; a resume reads them back.
    fn reference(
        &self,
        model: &Model,
        adapter: &dyn Trainable,
        train: &PairData,
        valid: &PairData,
        progress: &mut dyn TrainProgress,
    ) -> Result<ReferenceLogps> {
        let (n_train, n_valid) = (train.tokenized.len(), valid.tokenized.len());
        if self.resuming {
            return ReferenceLogps::load(self.out, n_train, n_valid);
        }
        progress.phase(Some("computing the reference model's log-probabilities"));
        let start = Adapted::new(model, Trainable::adapter(adapter));
        let batch = self.cfg.eval.batch_size;
        let pad = self.bundle.pad_id();
        let r = ReferenceLogps {
            train: pair_logps(&start, &train.tokenized, batch, pad)?,
            valid: pair_logps(&start, &valid.tokenized, batch, pad)?,
        };
        progress.phase(None);
        r.save(self.out)?;
        Ok(r)
    }

    /// Trains `adapter` on `objective` from `checkpoint` (or the start),
    /// then evaluates the tuned model.
    fn train<O: Objective>(
        &self,
        objective: &O,
        model: &mut Model,
        adapter: &dyn Trainable,
        checkpoint: Option<&Path>,
        data: &RunData,
        progress: &mut dyn TrainProgress,
    ) -> Result<(RunFacts, Snapshot)> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let precision = products(cfg);
        if t.activation_checkpointing {
            model.set_activation_checkpointing(Some(adapter.vars()));
        }
        model.set_precision(precision);
        let mut opt = AdamW::new(
            adapter.vars(),
            AdamWConfig {
                lr: t.lr,
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
        );
        let state = match checkpoint {
            Some(dir) => load_checkpoint_state(dir, &mut opt)?,
            None => TrainState::default(),
        };
        let mut trainer = Trainer {
            model: &*model,
            trainable: adapter,
            opt,
            schedule: Schedule {
                kind: t.schedule,
                peak: t.lr,
                warmup: t.warmup_steps,
                total: 0,
            },
            settings: LoopSettings {
                epochs: t.epochs,
                max_steps: (t.max_steps > 0).then_some(t.max_steps),
                batch_size: t.batch_size,
                grad_accum: t.grad_accum,
                max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
                eval_every: (cfg.eval.every > 0).then_some(cfg.eval.every),
                save_every: (cfg.eval.save_every > 0).then_some(cfg.eval.save_every),
                seed: cfg.seed,
            },
            out: self.out.to_path_buf(),
            base_model: Some(cfg.model.display().to_string()),
            state,
        };
        if cfg.eval.save_each_epoch {
            trainer.settings.save_every =
                Some(steps_per_epoch(objective, &trainer.settings) * objective.iterations());
        }
        let total = trainer.total_steps(objective);
        trainer.schedule.total = total;
        let (n_train, n_valid) = data.sizes();
        progress.started(&TrainSummary {
            parameters: adapter.parameter_count(),
            items: match data {
                RunData::Sft { .. } => "examples",
                RunData::Pairs { .. } => "pairs",
                RunData::Prompts { .. } => "prompts",
            },
            train_examples: n_train,
            valid_examples: n_valid,
            truncated: data.truncated().0,
            max_seq_len: cfg.data.max_seq_len,
            total_steps: total,
            done_steps: trainer.state.step,
        });
        let start = Instant::now();
        let start_tokens = trainer.state.tokens;
        trainer.run(objective, &mut |e| progress.event(e))?;
        let train_seconds = start.elapsed().as_secs_f64();
        let (steps, trained_tokens) = (trainer.state.step, trainer.state.tokens - start_tokens);
        drop(trainer);
        model.set_activation_checkpointing(None);
        let sft = matches!(cfg.method, MethodConfig::Sft);
        if sft {
            // Measured as the base was, in f32.
            model.set_precision(skillet_models::Precision::F32);
        }
        let tuned_model = Adapted::new(&*model, adapter.adapter());
        let metrics = heldout(objective, &tuned_model, "tuned", progress)?;
        let tuned = snapshot(
            &tuned_model,
            metrics,
            self.bundle,
            cfg,
            &data.answers(&self.cfg.method),
            self.general,
            "tuned",
            progress,
        )?;
        model.set_precision(skillet_models::Precision::F32);
        let truncated = data.truncated();
        let facts = RunFacts {
            model: cfg.model.display().to_string(),
            method: cfg.method.name().to_string(),
            train_file: cfg.data.train.display().to_string(),
            train_examples: n_train,
            valid_examples: n_valid,
            truncated: truncated.0 + truncated.1,
            trainable_parameters: adapter.parameter_count(),
            steps,
            trained_tokens,
            train_seconds,
            precision: format!("{precision:?}").to_lowercase(),
        };
        Ok((facts, tuned))
    }
}
