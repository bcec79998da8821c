//! `skillet merge`: fold a LoRA adapter into the base weights
//! (`W + scale·B·A`) and write a Hugging Face folder whose logits equal
//! base + adapter. A quantized base is dequantized first, then merged in
//! f32, never merged into quantized blocks (which loses quality).

use serde::Serialize;
use skillet_adapters::{load_peft, merged_weight};
use skillet_models::collect_weights;

use crate::args::ModelArg;
use crate::output::print_json;
use skillet_runtime::Bundle;
use skillet_runtime::{is_quantized, write_hf_folder};

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
    let (config, lora) = load_peft(&args.adapter)?;
    let settings = config
        .settings()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.adapter.display()))?;
    let src = b.source.weights(&b.config)?;
    let dequantized_base = is_quantized(src.as_ref());
    let mut weights = collect_weights(&b.config, src.as_ref())?;
    for (module, (a, bm)) in &lora {
        let key = format!("{module}.weight");
        let base = weights.tensors.get(&key).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the adapter targets '{module}', which this model does not have",
                args.adapter.display()
            )
        })?;
        let merged = merged_weight(base, a, bm, settings.scale())?;
        weights.tensors.insert(key, merged);
    }
    write_hf_folder(&b, &weights, &args.out)?;
    let o = Output {
        out: args.out.display().to_string(),
        merged_modules: lora.len(),
        dequantized_base,
    };
    if args.json {
        return print_json(&o);
    }
    if dequantized_base {
        eprintln!(
            "note: the base model is quantized; it was dequantized to f32 and the adapter merged into that"
        );
    }
    println!("merged {} modules into {}", o.merged_modules, o.out);
    Ok(())
}
