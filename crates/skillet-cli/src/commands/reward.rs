//! `skillet reward`: scores under a reward model (LoRA plus `score` head,
//! from `skillet train` with `type = "reward"` or from TRL; or a whole
//! model folder with its `score.weight`, from full fine-tuning). A file of
//! preference pairs gives accuracy, mean margin and reward statistics; a
//! file of examples (chat, prompt/completion, text) or `--text` gives one
//! score each.

use std::path::PathBuf;

use serde::Serialize;
use skillet_data::{DataFormat, EncodeOptions, Example, PairFormat, looks_like_pairs, read_jsonl};
use skillet_models::{CausalLm, LoadOptions, Model};
use skillet_runtime::{
    Bundle, PairData, PairScores, RewardModel, RewardStats, score_pairs, scored_tokens,
};

use crate::args::ModelArg;
use crate::output::print_json;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// The reward adapter folder (PEFT, with score.weight) on `--model`;
    /// without it, `--model` must be a whole reward model (a folder whose
    /// weights include score.weight).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A JSONL file: preference pairs (any shape `skillet train` reads),
    /// or examples (a conversation's last assistant turn is scored after
    /// the turns before it; prompt/completion; text).
    #[arg(long, conflicts_with = "text")]
    data: Option<PathBuf>,
    /// A text to score (repeatable).
    #[arg(long, required_unless_present = "data")]
    text: Vec<String>,
    /// Longest sequence in tokens (longer ones keep their start).
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// One scored example or text.
#[derive(Serialize)]
struct Scored {
    /// Line in the file (absent for `--text`).
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    reward: f64,
}

#[derive(Serialize)]
struct Scores {
    sequences: usize,
    rewards: RewardStats,
    each: Vec<Scored>,
}

/// The reward model: an adapter on `--model` (loaded here), or `--model`
/// itself (which carries its own body).
fn load(b: &Bundle, args: &Args) -> anyhow::Result<(Option<Model>, RewardModel)> {
    Ok(match &args.adapter {
        Some(dir) => {
            let model = b.load_model(LoadOptions::default())?;
            let rm = RewardModel::load(&model, dir)?;
            (Some(model), rm)
        }
        None => (None, RewardModel::load_model(&args.model.model)?),
    })
}

/// The model a reward model runs on.
fn base<'a>(model: &'a Option<Model>, rm: &'a RewardModel) -> anyhow::Result<&'a dyn CausalLm> {
    match (model, &rm.body) {
        (Some(m), _) | (None, Some(m)) => Ok(m),
        (None, None) => anyhow::bail!("a reward adapter needs its base model"),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model.model)?;
    let opts = EncodeOptions {
        max_seq_len: args.max_seq_len,
        train_on_prompt: false,
        add_eos: true,
    };
    if let Some(path) = args.data.as_ref().filter(|p| looks_like_pairs(p)) {
        // Every line is checked before the model is loaded.
        let data = PairData::load(path, PairFormat::Auto, &b, opts, None)?;
        let (model, rm) = load(&b, &args)?;
        let s = score_pairs(&rm, base(&model, &rm)?, &data, args.batch_size, b.pad_id())?;
        return print_pairs(&s, args.json);
    }
    let items: Vec<(Option<usize>, Example)> = match &args.data {
        Some(path) => {
            let (_, examples) = read_jsonl(path, DataFormat::Auto)?;
            examples.into_iter().map(|(l, e)| (Some(l), e)).collect()
        }
        None => args
            .text
            .iter()
            .map(|t| (None, Example::Text(t.clone())))
            .collect(),
    };
    let mut sequences = Vec::with_capacity(items.len());
    for (line, ex) in &items {
        sequences.push(
            scored_tokens(&b, opts, ex).map_err(|e| match (line, &args.data) {
                (Some(l), Some(p)) => anyhow::anyhow!("{}:{l}: {e}", p.display()),
                _ => e.into(),
            })?,
        );
    }
    let (model, rm) = load(&b, &args)?;
    let r = rm.score(base(&model, &rm)?, &sequences, args.batch_size, b.pad_id())?;
    let out = Scores {
        sequences: r.len(),
        rewards: RewardStats::of(r.iter().map(|&x| x as f64))
            .ok_or_else(|| anyhow::anyhow!("nothing to score"))?,
        each: items
            .iter()
            .zip(&r)
            .map(|((line, _), &reward)| Scored {
                line: *line,
                reward: reward as f64,
            })
            .collect(),
    };
    if args.json {
        return print_json(&out);
    }
    for s in &out.each {
        match s.line {
            Some(l) => println!("line {l:<5} {:>10.4}", s.reward),
            None => println!("{:.6}", s.reward),
        }
    }
    if out.sequences > 1 {
        print_stats(&out.rewards);
    }
    Ok(())
}

fn print_pairs(s: &PairScores, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(s);
    }
    println!("pairs        {}", s.pairs);
    println!("accuracy     {:.4}", s.accuracy);
    println!("mean margin  {:.4}", s.mean_margin);
    print_stats(&s.rewards);
    Ok(())
}

fn print_stats(r: &RewardStats) {
    println!(
        "rewards      mean {:.4}, std {:.4}, min {:.4}, max {:.4}",
        r.mean, r.std, r.min, r.max
    );
}
