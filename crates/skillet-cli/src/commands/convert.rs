//! `skillet convert`: write any supported model as a Hugging Face folder
//! (config.json, f32 model.safetensors, tokenizer.json, tokenizer_config.json,
//! chat_template.jinja, generation_config.json). A quantized GGUF is
//! dequantized on the way.

use serde::Serialize;

use skillet_models::collect_weights;
use skillet_runtime::{is_quantized, write_hf_folder};

use crate::args::ModelArg;
use crate::output::print_json;
use skillet_runtime::Bundle;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// Output folder (created; existing files in it are overwritten).
    #[arg(long, short = 'o')]
    out: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Output {
    out: String,
    dequantized: bool,
    tensors: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model.model)?;
    let src = b.source.weights(&b.config)?;
    let dequantized = is_quantized(src.as_ref());
    let weights = collect_weights(&b.config, src.as_ref())?;
    write_hf_folder(&b, &weights, &args.out)?;
    let o = Output {
        out: args.out.display().to_string(),
        dequantized,
        tensors: weights.tensors.len(),
    };
    if args.json {
        return print_json(&o);
    }
    if dequantized {
        eprintln!("note: the source is quantized; weights were dequantized to f32");
    }
    println!("wrote {} tensors to {}", o.tensors, o.out);
    Ok(())
}
