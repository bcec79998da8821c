//! `skillet score`: mean next-token cross-entropy and perplexity of a file.

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::Serialize;
use skillet_models::{CausalLm, ForwardInput};

use crate::bundle::{Bundle, ModelArg};
use crate::output::print_json;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// Text file to score (tokenized as `tokenize` does: no BOS added).
    #[arg(long, short = 'f')]
    file: std::path::PathBuf,
    /// A PEFT LoRA adapter folder to apply (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Output {
    tokens: usize,
    predicted: usize,
    mean_loss: f64,
    perplexity: f64,
    argmax: Vec<u32>,
}

/// Mean negative log-likelihood of `ids[1..]` and the argmax at every
/// position, from logits `[1, T, V]` (log-sum-exp in f64).
pub fn score_logits(logits: &Tensor, ids: &[u32]) -> anyhow::Result<(f64, Vec<u32>)> {
    let rows = logits.squeeze(0)?.to_vec2::<f32>()?;
    let mut nll = 0.0f64;
    let mut argmax = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        argmax.push(skillet_generate::argmax(row));
        if i + 1 < ids.len() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[ids[i + 1] as usize] as f64;
        }
    }
    Ok((nll / (ids.len() - 1) as f64, argmax))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model.model)?;
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let ids = b.tokenizer.encode(&text, false)?;
    if ids.len() < 2 {
        anyhow::bail!(
            "{}: needs at least 2 tokens to score, has {}",
            args.file.display(),
            ids.len()
        );
    }
    let ctx = b.config.max_position_embeddings;
    if ids.len() > ctx {
        anyhow::bail!(
            "{}: {} tokens exceed the model's context of {ctx}",
            args.file.display(),
            ids.len()
        );
    }
    let model = b.load_model_with(args.adapter.as_deref())?;
    let input = ForwardInput::new(Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?);
    let logits = model.forward(&input, None)?;
    let (mean_loss, argmax) = score_logits(&logits, &ids)?;
    let out = Output {
        tokens: ids.len(),
        predicted: ids.len() - 1,
        mean_loss,
        perplexity: mean_loss.exp(),
        argmax,
    };
    if args.json {
        return print_json(&out);
    }
    println!("tokens      {}", out.tokens);
    println!("predicted   {}", out.predicted);
    println!("mean loss   {:.6}", out.mean_loss);
    println!("perplexity  {:.4}", out.perplexity);
    Ok(())
}
