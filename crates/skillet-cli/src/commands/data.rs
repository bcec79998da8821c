//! `skillet data check`: validate a data file against a model and show
//! exactly what training will see: counts, token lengths, truncation, and
//! a few examples rendered with the trained tokens marked `[[like this]]`.

use serde::Serialize;
use skillet_data::{DataFormat, EncodeOptions, mark_trained};

use crate::args::ModelArg;
use crate::output::print_json;
use skillet_runtime::Bundle;
use skillet_runtime::Dataset;

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
    /// auto, chat, sharegpt, alpaca, completion or text.
    #[arg(long, default_value = "auto")]
    format: String,
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
