//! `skillet tokenize`: text to token ids and token strings.

use serde::Serialize;

use crate::args::ModelArg;
use crate::output::print_json;
use skillet_runtime::Bundle;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// Add the special tokens the tokenizer's post-processor adds (e.g. BOS).
    /// Off by default: special-token text in the input is still recognized.
    #[arg(long)]
    add_special: bool,
    /// Print one JSON object: {"ids":[...],"tokens":[...]}.
    #[arg(long)]
    json: bool,
    /// The text to tokenize.
    text: String,
}

#[derive(Serialize)]
struct Output {
    ids: Vec<u32>,
    tokens: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model.model)?;
    let (ids, tokens) = b
        .tokenizer
        .encode_with_tokens(&args.text, args.add_special)?;
    if args.json {
        return print_json(&Output { ids, tokens });
    }
    for (id, tok) in ids.iter().zip(&tokens) {
        println!("{id:>8}  {tok}");
    }
    eprintln!("{} tokens", ids.len());
    Ok(())
}
