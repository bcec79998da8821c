//! `skillet merge`: fold a LoRA adapter into the base weights
//! (`W + scale·B·A`) and write a Hugging Face folder whose logits equal
//! base + adapter. A quantized base is dequantized first, then merged in
//! f32, never merged into quantized blocks (which loses quality).

use serde::Serialize;
use skillet_runtime::{Bundle, merged_weights, write_hf_folder};

use crate::args::ModelArg;
use crate::output::print_json;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// The PEFT adapter folder to merge.
    #[arg(long)]
    adapter: std::path::PathBuf,
    /// Output folder (created).
    #[arg(long, short = 'o')]
    out: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Output {
    out: String,
    merged_modules: usize,
    dequantized_base: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model.model)?;
    let merged = merged_weights(&b, Some(&args.adapter))?;
    write_hf_folder(&b, &merged.weights, &args.out)?;
    let o = Output {
        out: args.out.display().to_string(),
        merged_modules: merged.merged_modules,
        dequantized_base: merged.dequantized_base,
    };
    if args.json {
        return print_json(&o);
    }
    if o.dequantized_base {
        eprintln!(
            "note: the base model is quantized; it was dequantized to f32 and the adapter merged into that"
        );
    }
    println!("merged {} modules into {}", o.merged_modules, o.out);
    Ok(())
}
