//! A training run from one validated config: load the data (every
//! problem found before anything is written), evaluate the base model,
//! train a LoRA adapter with checkpoints and exact resume, evaluate the
//! tuned model the same way, and write the adapter and a report (Markdown,
//! JSON, loss plot) into the output folder. Front ends watch it through
//! [`TrainProgress`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use skillet_adapters::{LoraAdapter, LoraSettings, load_peft, save_peft};
use skillet_data::{EncodeOptions, split_fraction};
use skillet_eval::{RunFacts, Snapshot, evaluate, exact_match, general_perplexity, write_report};
use skillet_models::{Adapted, Adapter, CausalLm};
use skillet_train::{
    AdamW, AdamWConfig, Event, LoopSettings, RunConfig, Schedule, TrainState, Trainer,
    latest_checkpoint, load_checkpoint_state, read_metrics,
};

use crate::{Bundle, Dataset, Result, RuntimeError};

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
    /// Training examples.
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
    /// The trained adapter (PEFT format).
    pub adapter_dir: PathBuf,
    /// report.md.
    pub report_path: PathBuf,
}

/// Window of the general-text perplexity (the forgetting check).
const GENERAL_WINDOW: usize = 1024;

/// The data of a run: train and held-out sets.
struct RunData {
    train: Dataset,
    valid: Dataset,
}

fn load_data(cfg: &RunConfig, bundle: &Bundle) -> Result<RunData> {
    let opts = EncodeOptions {
        max_seq_len: cfg.data.max_seq_len,
        train_on_prompt: cfg.data.train_on_prompt,
        add_eos: cfg.data.add_eos,
    };
    let all = Dataset::load(&cfg.data.train, cfg.data.format, bundle, opts)?;
    Ok(match &cfg.data.validation {
        Some(v) => RunData {
            valid: Dataset::load(v, cfg.data.format, bundle, opts)?,
            train: all,
        },
        None => {
            let (t, v) = split_fraction(all.examples.len(), cfg.data.validation_fraction, cfg.seed);
            RunData {
                train: all.subset(&t),
                valid: all.subset(&v),
            }
        }
    })
}

/// Base or tuned model evaluated the same way.
fn snapshot(
    model: &dyn CausalLm,
    bundle: &Bundle,
    cfg: &RunConfig,
    data: &RunData,
    general: Option<&str>,
    what: &str,
    progress: &mut dyn TrainProgress,
) -> Result<Snapshot> {
    progress.phase(Some(&format!("evaluating the {what} model")));
    let heldout = if data.valid.tokenized.is_empty() {
        None
    } else {
        Some(evaluate(
            model,
            &data.valid.tokenized,
            cfg.eval.batch_size,
            bundle.pad_id(),
        )?)
    };
    let em = if cfg.eval.generate && !data.valid.examples.is_empty() {
        progress.phase(Some(&format!(
            "generating held-out answers with the {what} model"
        )));
        Some(exact_match(
            model,
            &bundle.tokenizer,
            bundle.template.as_ref(),
            &data.valid.examples,
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
    let data = load_data(cfg, &bundle)?;
    if data.train.tokenized.is_empty() {
        return Err(RuntimeError::Invalid(format!(
            "{}: no training examples",
            cfg.data.train.display()
        )));
    }
    let general = match &cfg.eval.general {
        Some(p) => Some(read_text(p)?),
        None => None,
    };
    let settings = LoraSettings::new(
        cfg.lora.r,
        cfg.lora.alpha,
        cfg.lora.dropout,
        cfg.lora.use_rslora,
        cfg.targets()?,
    )?;
    // Read a starting adapter before anything is written, so a bad path
    // leaves no output folder behind.
    let init_weights = match (&cfg.lora.init_adapter, resuming) {
        (Some(dir), false) => Some(
            load_peft(dir)
                .map_err(|e| RuntimeError::Invalid(format!("init_adapter {}: {e}", dir.display())))?
                .1,
        ),
        _ => None,
    };
    let checkpoint = if resuming {
        Some(latest_checkpoint(&out).ok_or_else(|| {
            RuntimeError::Invalid(format!("{}: no checkpoint to resume from", out.display()))
        })?)
    } else {
        prepare_output(&out, overwrite)?;
        write_text(&out.join("config.toml"), &cfg.to_toml())?;
        None
    };

    let precision = cfg.train.precision.resolve();
    let mut model = bundle.load_model(skillet_models::LoadOptions {
        keep_quantized: cfg.lora.keep_base_quantized,
        // Products in bf16 round the frozen base anyway: hold it in bf16.
        frozen_bf16: precision.holds_base_in_bf16(),
        ..Default::default()
    })?;
    let base = if resuming {
        serde_json::from_str(&read_text(&out.join("base_eval.json"))?)?
    } else {
        let s = snapshot(
            &model,
            &bundle,
            cfg,
            &data,
            general.as_deref(),
            "base",
            progress,
        )?;
        write_text(
            &out.join("base_eval.json"),
            &serde_json::to_string_pretty(&s)?,
        )?;
        s
    };

    let initial = match &checkpoint {
        Some(dir) => Some(load_peft(dir)?.1),
        None => init_weights,
    };
    let adapter = LoraAdapter::new(&model, &settings, cfg.seed, initial.as_ref())?;
    let t = &cfg.train;
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
    let state = match &checkpoint {
        Some(dir) => load_checkpoint_state(dir, &mut opt)?,
        None => TrainState::default(),
    };
    let loop_settings = LoopSettings {
        epochs: t.epochs,
        max_steps: (t.max_steps > 0).then_some(t.max_steps),
        batch_size: t.batch_size,
        grad_accum: t.grad_accum,
        max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        eval_every: (cfg.eval.every > 0).then_some(cfg.eval.every),
        save_every: (cfg.eval.save_every > 0).then_some(cfg.eval.save_every),
        seed: cfg.seed,
        packing: cfg.data.packing.then_some(cfg.data.max_seq_len),
        pad_id: bundle.pad_id(),
    };
    let mut trainer = Trainer {
        model: &model,
        adapter: &adapter,
        opt,
        schedule: Schedule {
            kind: t.schedule,
            peak: t.lr,
            warmup: t.warmup_steps,
            total: 0,
        },
        settings: loop_settings,
        train: &data.train.tokenized,
        valid: &data.valid.tokenized,
        out: out.clone(),
        base_model: Some(cfg.model.display().to_string()),
        state,
    };
    let total = trainer.total_steps();
    trainer.schedule.total = total;
    progress.started(&TrainSummary {
        parameters: adapter.parameter_count(),
        train_examples: data.train.tokenized.len(),
        valid_examples: data.valid.tokenized.len(),
        truncated: data.train.truncated(),
        max_seq_len: cfg.data.max_seq_len,
        total_steps: total,
        done_steps: trainer.state.step,
    });
    let start = Instant::now();
    let start_tokens = trainer.state.tokens;
    trainer.run(&mut |e| progress.event(e))?;
    let train_seconds = start.elapsed().as_secs_f64();
    let (steps, trained_tokens) = (trainer.state.step, trainer.state.tokens - start_tokens);
    drop(trainer);
    model.set_activation_checkpointing(None);
    model.set_precision(skillet_models::Precision::F32);

    let adapter_dir = out.join("adapter");
    save_peft(
        &adapter,
        &adapter_dir,
        Some(cfg.model.display().to_string()),
    )?;
    let parameters = adapter.parameter_count();
    let tuned_model = Adapted::new(&model, Some(Arc::new(adapter) as Arc<dyn Adapter>));
    let tuned = snapshot(
        &tuned_model,
        &bundle,
        cfg,
        &data,
        general.as_deref(),
        "tuned",
        progress,
    )?;
    let facts = RunFacts {
        model: cfg.model.display().to_string(),
        train_file: cfg.data.train.display().to_string(),
        train_examples: data.train.tokenized.len(),
        valid_examples: data.valid.tokenized.len(),
        truncated: data.train.truncated() + data.valid.truncated(),
        trainable_parameters: parameters,
        steps,
        trained_tokens,
        train_seconds,
        precision: format!("{precision:?}").to_lowercase(),
    };
    let report = write_report(&out, &facts, &base, &tuned, &read_metrics(&out))
        .map_err(RuntimeError::io(out.join("report.md")))?;
    Ok(TrainOutcome {
        report,
        adapter_dir,
        report_path: out.join("report.md"),
    })
}
