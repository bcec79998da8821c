//! `skillet data check`: validate a data file against a model and show
//! exactly what training will see: counts, token lengths, truncation, and
//! a few examples rendered with the trained tokens marked `[[like this]]`.
//! A file of preference pairs (detected, or `--pairs`) shows both sides of
//! each pair that way, with the lengths of prompts and of both completions.

use serde::Serialize;
use skillet_data::{DataFormat, EncodeOptions, PairFormat, looks_like_pairs, mark_trained};

use crate::args::ModelArg;
use crate::output::print_json;
use skillet_runtime::Bundle;
use skillet_runtime::{Dataset, PairData};

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Validate a JSONL file and dry-run its rendering and loss mask.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The JSONL file.
    file: std::path::PathBuf,
    #[command(flatten)]
    model: ModelArg,
    /// auto, chat, sharegpt, alpaca, completion or text; for preference
    /// pairs auto, standard, conversational or openai.
    #[arg(long, default_value = "auto")]
    format: String,
    /// The file holds preference pairs (detected from the first line
    /// where the format is auto).
    #[arg(long)]
    pairs: bool,
    /// Preference pairs: cut prompts to their first this many tokens.
    #[arg(long)]
    max_prompt_len: Option<usize>,
    /// Longest sequence in tokens.
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Train on prompts too.
    #[arg(long)]
    train_on_prompt: bool,
    /// Do not append EOS to text and prompt/completion examples.
    #[arg(long)]
    no_eos: bool,
    /// How many examples to render.
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    file: String,
    format: DataFormat,
    examples: usize,
    tokens: usize,
    trained_tokens: usize,
    length_min: usize,
    length_mean: f64,
    length_median: usize,
    length_p95: usize,
    length_max: usize,
    truncated: usize,
    samples: Vec<Sample>,
}

#[derive(Serialize)]
struct Sample {
    line: usize,
    tokens: usize,
    trained_tokens: usize,
    rendered: String,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    let DataCommand::Check(args) = cmd;
    if args.pairs || (args.format == "auto" && looks_like_pairs(&args.file)) {
        return check_pairs(&args);
    }
    let format: DataFormat = serde_json::from_value(serde_json::Value::String(args.format.clone()))
        .map_err(|_| {
            anyhow::anyhow!(
                "--format must be auto, chat, sharegpt, alpaca, completion or text, got {:?}",
                args.format
            )
        })?;
    let b = Bundle::open(&args.model.model)?;
    let opts = EncodeOptions {
        max_seq_len: args.max_seq_len,
        train_on_prompt: args.train_on_prompt,
        add_eos: !args.no_eos,
    };
    let d = Dataset::load(&args.file, format, &b, opts)?;
    let mut lens: Vec<usize> = d.tokenized.iter().map(|t| t.full_len).collect();
    lens.sort_unstable();
    let pct = |p: f64| lens[((lens.len() - 1) as f64 * p).round() as usize];
    let samples = d
        .tokenized
        .iter()
        .take(args.show)
        .map(|t| {
            Ok(Sample {
                line: t.line,
                tokens: t.ids.len(),
                trained_tokens: t.target_count(),
                rendered: mark_trained(&b.tokenizer, &t.ids, &t.trainable)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let r = Report {
        file: args.file.display().to_string(),
        format: d.format,
        examples: d.tokenized.len(),
        tokens: d.tokenized.iter().map(|t| t.ids.len()).sum(),
        trained_tokens: d.tokenized.iter().map(|t| t.target_count()).sum(),
        length_min: lens[0],
        length_mean: lens.iter().sum::<usize>() as f64 / lens.len() as f64,
        length_median: pct(0.5),
        length_p95: pct(0.95),
        length_max: *lens.last().expect("at least one example"),
        truncated: d.truncated(),
        samples,
    };
    if args.json {
        return print_json(&r);
    }
    println!(
        "{}: {} examples ({:?} format), all valid",
        r.file, r.examples, r.format
    );
    println!(
        "tokens          {} ({} trained)",
        r.tokens, r.trained_tokens
    );
    println!(
        "length          min {}, mean {:.1}, median {}, p95 {}, max {}",
        r.length_min, r.length_mean, r.length_median, r.length_p95, r.length_max
    );
    println!(
        "truncated       {} (to {} tokens)",
        r.truncated, args.max_seq_len
    );
    for s in &r.samples {
        println!(
            "\n--- line {} ({} tokens, {} trained) ---\n{}",
            s.line, s.tokens, s.trained_tokens, s.rendered
        );
    }
    Ok(())
}

/// Lengths of one part of every pair.
#[derive(Serialize)]
struct Lengths {
    min: usize,
    mean: f64,
    max: usize,
}

impl Lengths {
    fn of(v: impl Iterator<Item = usize>) -> Self {
        let v: Vec<usize> = v.collect();
        Lengths {
            min: v.iter().copied().min().unwrap_or(0),
            mean: v.iter().sum::<usize>() as f64 / v.len().max(1) as f64,
            max: v.iter().copied().max().unwrap_or(0),
        }
    }
}

#[derive(Serialize)]
struct PairReport {
    file: String,
    format: PairFormat,
    pairs: usize,
    prompt_tokens: Lengths,
    chosen_tokens: Lengths,
    rejected_tokens: Lengths,
    truncated: usize,
    samples: Vec<PairSample>,
}

#[derive(Serialize)]
struct PairSample {
    line: usize,
    chosen: String,
    rejected: String,
}

fn check_pairs(args: &CheckArgs) -> anyhow::Result<()> {
    let format: PairFormat = serde_json::from_value(serde_json::Value::String(args.format.clone()))
        .map_err(|_| {
            anyhow::anyhow!(
                "--format for preference pairs must be auto, standard, conversational or openai, got {:?}",
                args.format
            )
        })?;
    let b = Bundle::open(&args.model.model)?;
    let opts = EncodeOptions {
        max_seq_len: args.max_seq_len,
        train_on_prompt: false,
        add_eos: !args.no_eos,
    };
    let d = PairData::load(&args.file, format, &b, opts, args.max_prompt_len)?;
    let t = &d.tokenized;
    let mark = |side: &skillet_data::TokenizedExample| {
        mark_trained(&b.tokenizer, &side.ids, &side.trainable)
    };
    let samples = t
        .iter()
        .take(args.show)
        .map(|p| {
            Ok(PairSample {
                line: p.line,
                chosen: mark(&p.side(true))?,
                rejected: mark(&p.side(false))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let r = PairReport {
        file: args.file.display().to_string(),
        format: d.format,
        pairs: t.len(),
        prompt_tokens: Lengths::of(t.iter().map(|p| p.prompt.len())),
        chosen_tokens: Lengths::of(t.iter().map(|p| p.chosen.len())),
        rejected_tokens: Lengths::of(t.iter().map(|p| p.rejected.len())),
        truncated: d.truncated(),
        samples,
    };
    if args.json {
        return print_json(&r);
    }
    println!(
        "{}: {} preference pairs ({:?} format), all valid",
        r.file, r.pairs, r.format
    );
    for (name, l) in [
        ("prompt", &r.prompt_tokens),
        ("chosen", &r.chosen_tokens),
        ("rejected", &r.rejected_tokens),
    ] {
        println!(
            "{name:<15} tokens min {}, mean {:.1}, max {}",
            l.min, l.mean, l.max
        );
    }
    println!(
        "truncated       {} (to {} tokens)",
        r.truncated, args.max_seq_len
    );
    for s in &r.samples {
        println!(
            "\n--- line {}, chosen ---\n{}\n--- line {}, rejected ---\n{}",
            s.line, s.chosen, s.line, s.rejected
        );
    }
    Ok(())
}
