//! `skillet train`: fine-tune a LoRA adapter from one TOML config, with
//! held-out evaluation before and after, checkpoints, exact resume, and a
//! report (Markdown, JSON, loss plot) in the output folder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use skillet_adapters::{LoraSettings, apply_lora, load_peft, save_peft};
use skillet_data::{EncodeOptions, split_fraction};
use skillet_eval::{RunFacts, Snapshot, evaluate, exact_match, general_perplexity, write_report};
use skillet_models::Llama;
use skillet_train::{
    AdamW, AdamWConfig, Event, LoopSettings, RunConfig, Schedule, TrainState, Trainer,
    latest_checkpoint, load_checkpoint_state, read_metrics,
};

use crate::bundle::Bundle;
use crate::dataset::Dataset;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run's TOML config (model, data, lora, train, eval sections).
    #[arg(required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Override a config value, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in this output folder from its latest checkpoint.
    #[arg(long, conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// Use an output folder that already holds files (they may be overwritten).
    #[arg(long)]
    overwrite: bool,
}

/// Window of the general-text perplexity (the forgetting check).
const GENERAL_WINDOW: usize = 1024;

/// The data of a run: train and held-out sets.
struct RunData {
    train: Dataset,
    valid: Dataset,
}

fn load_data(cfg: &RunConfig, bundle: &Bundle) -> anyhow::Result<RunData> {
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
    model: &Llama,
    bundle: &Bundle,
    cfg: &RunConfig,
    data: &RunData,
    general: Option<&str>,
    what: &str,
) -> anyhow::Result<Snapshot> {
    let spinner = ProgressBar::new_spinner().with_message(format!("evaluating the {what} model"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
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
        spinner.set_message(format!("generating held-out answers with the {what} model"));
        Some(exact_match(
            model,
            &bundle.tokenizer,
            bundle.template.as_ref(),
            &data.valid.examples,
            cfg.eval.max_new_tokens,
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
    spinner.finish_and_clear();
    Ok(Snapshot::new(
        heldout.as_ref(),
        em.as_ref(),
        gen_stats.as_ref(),
    ))
}

fn prepare_output(dir: &Path, overwrite: bool) -> anyhow::Result<()> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() && !overwrite {
        bail!(
            "{}: the output folder is not empty; use --resume {} to continue it, --overwrite, or another output_dir",
            dir.display(),
            dir.display()
        );
    }
    if overwrite && dir.join("checkpoints").exists() {
        std::fs::remove_dir_all(dir.join("checkpoints"))?;
        let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let resuming = args.resume.is_some();
    let cfg = match (&args.config, &args.resume) {
        (_, Some(dir)) => RunConfig::load(&dir.join("config.toml"), &args.set)?,
        (Some(path), None) => RunConfig::load(path, &args.set)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let out = cfg.output_dir.clone();
    let bundle = Bundle::open(&cfg.model)?;
    // Everything that can be wrong with the data is found before anything
    // is written or trained.
    let data = load_data(&cfg, &bundle)?;
    if data.train.tokenized.is_empty() {
        bail!("{}: no training examples", cfg.data.train.display());
    }
    let general = match &cfg.eval.general {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| p.display().to_string())?),
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
                .with_context(|| format!("init_adapter {}", dir.display()))?
                .1,
        ),
        _ => None,
    };
    let checkpoint =
        if resuming {
            Some(latest_checkpoint(&out).ok_or_else(|| {
                anyhow::anyhow!("{}: no checkpoint to resume from", out.display())
            })?)
        } else {
            prepare_output(&out, args.overwrite)?;
            std::fs::write(out.join("config.toml"), cfg.to_toml())?;
            None
        };

    let mut model = bundle.load_model_opts(skillet_models::LoadOptions {
        keep_quantized: cfg.lora.keep_base_quantized,
        ..Default::default()
    })?;
    let base = if resuming {
        serde_json::from_str(&std::fs::read_to_string(out.join("base_eval.json"))?)?
    } else {
        let s = snapshot(&model, &bundle, &cfg, &data, general.as_deref(), "base")?;
        std::fs::write(
            out.join("base_eval.json"),
            serde_json::to_string_pretty(&s)?,
        )?;
        s
    };

    let initial = match &checkpoint {
        Some(dir) => Some(load_peft(dir)?.1),
        None => init_weights,
    };
    let adapter = apply_lora(&mut model, &settings, cfg.seed, initial.as_ref())?;
    let t = &cfg.train;
    if t.activation_checkpointing {
        model.set_activation_checkpointing(Some(adapter.vars()));
    }
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
    eprintln!(
        "training {} LoRA parameters on {} examples ({} held out, {} truncated to {} tokens): {} steps",
        adapter.parameter_count(),
        data.train.tokenized.len(),
        data.valid.tokenized.len(),
        data.train.truncated(),
        cfg.data.max_seq_len,
        total
    );
    let bar = ProgressBar::new(total).with_position(trainer.state.step);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    let start = Instant::now();
    let start_tokens = trainer.state.tokens;
    trainer.run(&mut |e| match e {
        Event::Train {
            step,
            loss,
            lr,
            tokens_per_s,
            epoch,
            ..
        } => {
            bar.set_position(*step);
            bar.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s  epoch {epoch:.2}"
            ));
        }
        Event::Eval { step, stats } => bar.println(format!(
            "step {step}: validation loss {:.4}, token accuracy {:.3}",
            stats.loss, stats.accuracy
        )),
        Event::Checkpoint { .. } => {}
    })?;
    bar.finish_and_clear();
    let train_seconds = start.elapsed().as_secs_f64();

    let adapter_dir = out.join("adapter");
    save_peft(
        &adapter,
        &adapter_dir,
        Some(cfg.model.display().to_string()),
    )?;
    let tuned = snapshot(&model, &bundle, &cfg, &data, general.as_deref(), "tuned")?;
    let facts = RunFacts {
        model: cfg.model.display().to_string(),
        train_file: cfg.data.train.display().to_string(),
        train_examples: data.train.tokenized.len(),
        valid_examples: data.valid.tokenized.len(),
        truncated: data.train.truncated() + data.valid.truncated(),
        trainable_parameters: adapter.parameter_count(),
        steps: trainer.state.step,
        trained_tokens: trainer.state.tokens - start_tokens,
        train_seconds,
    };
    let md = write_report(&out, &facts, &base, &tuned, &read_metrics(&out))?;
    println!("{md}");
    eprintln!(
        "adapter: {}\nreport: {}",
        adapter_dir.display(),
        out.join("report.md").display()
    );
    Ok(())
}
