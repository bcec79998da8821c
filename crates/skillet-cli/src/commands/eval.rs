//! `skillet eval`: held-out loss, perplexity and token accuracy of a model
//! (optionally with an adapter) on a data file; exact match of greedy
//! answers with `--generate`; base-vs-adapted perplexity on general text
//! with `--general` (the forgetting check).

use serde::Serialize;
use skillet_data::{DataFormat, EncodeOptions};
use skillet_eval::{ExactMatch, GeneralStats, evaluate, exact_match, general_perplexity};
use skillet_models::{Adapted, LoadOptions};
use skillet_train::EvalStats;

use crate::args::{AdapterArg, ModelArg};
use crate::output::print_json;
use skillet_runtime::Bundle;
use skillet_runtime::Dataset;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    adapter: AdapterArg,
    /// Held-out JSONL (any supported format).
    #[arg(long)]
    data: std::path::PathBuf,
    /// Greedy-generate each example's answer and report exact match.
    #[arg(long)]
    generate: bool,
    /// Longest generated answer.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Answers generated together (continuous batching; 1 = one at a time,
    /// the same answers, slower).
    #[arg(long, default_value_t = skillet_eval::EXACT_MATCH_BATCH)]
    generate_batch: usize,
    /// General text file: perplexity of the base and the adapted model.
    #[arg(long)]
    general: Option<std::path::PathBuf>,
    /// Longest sequence (longer examples keep their first tokens).
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Output {
    examples: usize,
    heldout: EvalStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    exact_match: Option<ExactMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    general: Option<General>,
}

#[derive(Serialize)]
struct General {
    base: GeneralStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    adapted: Option<GeneralStats>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model.model)?;
    let opts = EncodeOptions {
        max_seq_len: args.max_seq_len,
        train_on_prompt: false,
        add_eos: true,
    };
    let data = Dataset::load(&args.data, DataFormat::Auto, &b, opts)?;
    let general_text = match &args.general {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
        }
        None => None,
    };
    let (base, adapter) = b.load_with_adapters(LoadOptions::default(), &args.adapter.adapters)?;
    let model = Adapted::new(&base, adapter);
    let heldout = evaluate(&model, &data.tokenized, args.batch_size, b.pad_id())?;
    let em = if args.generate {
        Some(exact_match(
            &model,
            &b.tokenizer,
            b.template.as_ref(),
            &data.examples,
            args.max_new_tokens,
            args.generate_batch,
        )?)
    } else {
        None
    };
    let general = match &general_text {
        Some(text) => {
            let adapted = general_perplexity(&model, &b.tokenizer, text, args.max_seq_len)?;
            Some(if !args.adapter.adapters.is_empty() {
                let base = general_perplexity(&base, &b.tokenizer, text, args.max_seq_len)?;
                General {
                    base,
                    adapted: Some(adapted),
                }
            } else {
                General {
                    base: adapted,
                    adapted: None,
                }
            })
        }
        None => None,
    };
    let out = Output {
        examples: data.tokenized.len(),
        heldout,
        exact_match: em,
        general,
    };
    if args.json {
        return print_json(&out);
    }
    println!("examples           {}", out.examples);
    println!("held-out loss      {:.4}", out.heldout.loss);
    println!("perplexity         {:.4}", out.heldout.perplexity);
    println!(
        "token accuracy     {:.4} ({} tokens)",
        out.heldout.accuracy, out.heldout.tokens
    );
    if let Some(em) = &out.exact_match {
        println!(
            "exact match        {:.4} ({} of {})",
            em.exact_match,
            em.samples.iter().filter(|s| s.exact).count(),
            em.examples
        );
    }
    if let Some(g) = &out.general {
        match &g.adapted {
            Some(a) => println!(
                "general perplexity {:.4} (base) -> {:.4} (adapted)",
                g.base.perplexity, a.perplexity
            ),
            None => println!("general perplexity {:.4}", g.base.perplexity),
        }
    }
    Ok(())
}
