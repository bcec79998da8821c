//! `skillet convert`: write any supported model as a Hugging Face folder
//! (config.json, f32 model.safetensors, tokenizer.json, tokenizer_config.json,
//! chat_template.jinja, generation_config.json). A quantized GGUF is
//! dequantized on the way.

use anyhow::Context;
use serde::Serialize;
use std::path::Path;

use skillet_models::{MemoryWeights, WeightSource, collect_weights, export::write_hf_weights};

use crate::bundle::{Bundle, ModelArg};
use crate::output::print_json;

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

/// Writes `weights` with the bundle's config, tokenizer and chat template
/// as a Hugging Face folder.
pub fn write_hf_folder(b: &Bundle, weights: &MemoryWeights, out: &Path) -> anyhow::Result<()> {
    let specials = b.tokenizer.specials();
    write_hf_weights(
        &b.config,
        weights,
        out,
        specials.bos.as_ref().map(|t| t.id),
        specials.eos.as_ref().map(|t| t.id),
    )?;
    let write = |name: &str, text: String| -> anyhow::Result<()> {
        let p = out.join(name);
        std::fs::write(&p, text).with_context(|| format!("{}", p.display()))
    };
    write("tokenizer.json", b.tokenizer.to_json()?)?;
    let text = |t: &Option<skillet_tokenizer::SpecialToken>| t.as_ref().map(|t| t.text.clone());
    let tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(&specials.bos),
        "eos_token": text(&specials.eos),
        "pad_token": text(&specials.pad),
        "unk_token": text(&specials.unk),
        "model_max_length": b.config.max_position_embeddings,
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tok_cfg)? + "\n",
    )?;
    if let Some(t) = &b.template {
        write("chat_template.jinja", t.source().to_string())?;
    }
    Ok(())
}

/// Whether the model's weights are stored quantized.
pub fn is_quantized(src: &dyn WeightSource) -> bool {
    src.storage_types().keys().any(|t| t.starts_with('Q'))
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
