//! Writing a model as a Hugging Face folder (config.json, f32
//! model.safetensors, tokenizer.json, tokenizer_config.json,
//! chat_template.jinja, generation_config.json): what `convert` and
//! `merge` write, loadable by transformers.

use std::path::Path;

use skillet_models::export::{TokenIds, write_hf_weights};
use skillet_models::{MemoryWeights, WeightSource};

use crate::{Bundle, Result, RuntimeError};

/// Writes `weights` with the bundle's config, tokenizer and chat template
/// as a Hugging Face folder.
pub fn write_hf_folder(b: &Bundle, weights: &MemoryWeights, out: &Path) -> Result<()> {
    let specials = b.tokenizer.specials();
    write_hf_weights(
        &b.config,
        weights,
        out,
        TokenIds {
            bos: specials.bos.as_ref().map(|t| t.id),
            eos: specials.eos.as_ref().map(|t| t.id),
            // The pad token, else end of text, as Skillet and TRL pad.
            pad: Some(b.pad_id()),
        },
    )?;
    let write = |name: &str, text: String| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(RuntimeError::io(p))
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
