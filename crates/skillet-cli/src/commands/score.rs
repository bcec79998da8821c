//! `skillet score`: mean next-token cross-entropy and perplexity of a file.

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::Serialize;
use skillet_models::{Adapted, CausalLm, ForwardInput, LoadOptions};

use crate::args::{AdapterArg, ModelArg};
use crate::output::print_json;
use skillet_runtime::Bundle;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// Text file to score (tokenized as `tokenize` does: no BOS added).
    #[arg(long, short = 'f')]
    file: std::path::PathBuf,
    #[command(flatten)]
    adapter: AdapterArg,
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
    let (model, adapter) = b.load_with_adapters(LoadOptions::default(), &args.adapter.adapters)?;
    let model = Adapted::new(&model, adapter);
    let input = ForwardInput::new(Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?);
    let logits = model.forward(&input)?;
    let (nll, argmax) = skillet_eval::next_token_nll(&logits.squeeze(0)?.to_vec2::<f32>()?, &ids);
    let mean_loss = nll / (ids.len() - 1) as f64;
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
