//! `skillet train`: fine-tune a LoRA adapter from one TOML config, with
//! held-out evaluation before and after, checkpoints, exact resume, and a
//! report (Markdown, JSON, loss plot) in the output folder. The run itself
//! is `skillet_runtime::run_training`; this file shows its progress.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use skillet_runtime::{TrainProgress, TrainSummary, run_training};
use skillet_train::{Event, RunConfig};

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

/// A spinner for the evaluations and a bar for the steps.
#[derive(Default)]
struct Progress {
    spinner: Option<ProgressBar>,
    bar: Option<ProgressBar>,
}

impl TrainProgress for Progress {
    fn phase(&mut self, what: Option<&str>) {
        match what {
            Some(msg) => {
                let s = self.spinner.get_or_insert_with(|| {
                    let s = ProgressBar::new_spinner();
                    s.enable_steady_tick(std::time::Duration::from_millis(200));
                    s
                });
                s.set_message(msg.to_string());
            }
            None => {
                if let Some(s) = self.spinner.take() {
                    s.finish_and_clear();
                }
            }
        }
    }

    fn started(&mut self, s: &TrainSummary) {
        eprintln!(
            "training {} adapter parameters on {} {} ({} held out, {} truncated to {} tokens): {} steps",
            s.parameters,
            s.train_examples,
            s.items,
            s.valid_examples,
            s.truncated,
            s.max_seq_len,
            s.total_steps
        );
        let bar = ProgressBar::new(s.total_steps).with_position(s.done_steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        self.bar = Some(bar);
    }

    fn event(&mut self, e: &Event) {
        let Some(bar) = &self.bar else { return };
        match e {
            Event::Train {
                step,
                loss,
                lr,
                tokens_per_s,
                epoch,
                total_steps,
                ..
            } => {
                bar.set_position(*step);
                bar.set_message(format!(
                    "loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s  epoch {epoch:.2}"
                ));
                if step == total_steps {
                    bar.finish_and_clear();
                }
            }
            Event::Eval { step, stats } => {
                let shown: Vec<String> = stats
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "tokens" | "pairs" | "perplexity"))
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect();
                bar.println(format!("step {step}: validation {}", shown.join(", ")))
            }
            Event::Checkpoint { .. } => {}
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let resuming = args.resume.is_some();
    let cfg = match (&args.config, &args.resume) {
        (_, Some(dir)) => RunConfig::load(&dir.join("config.toml"), &args.set)?,
        (Some(path), None) => RunConfig::load(path, &args.set)?,
        (None, None) => anyhow::bail!("give a config file or --resume DIR"),
    };
    let mut progress = Progress::default();
    let outcome = run_training(&cfg, resuming, args.overwrite, &mut progress)?;
    if let Some(bar) = progress.bar.take() {
        bar.finish_and_clear();
    }
    println!("{}", outcome.report);
    eprintln!(
        "adapter: {}\nreport: {}",
        outcome.adapter_dir.display(),
        outcome.report_path.display()
    );
    Ok(())
}
