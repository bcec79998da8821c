//! Writing a model out: its weights with an adapter folded in, as a
//! Hugging Face folder (config.json, f32 model.safetensors,
//! tokenizer.json, tokenizer_config.json, chat_template.jinja,
//! generation_config.json) that transformers loads. GGUF files are
//! `export_gguf.rs`.

use std::path::Path;

use skillet_adapters::{merged_weight, read_peft};
use skillet_models::export::{TokenIds, write_hf_weights};
use skillet_models::{MemoryWeights, WeightSource, collect_weights};

use crate::{Bundle, Result, RuntimeError};

/// A model's weights with an adapter folded in.
#[derive(Debug)]
pub struct Merged {
    /// Every tensor by Hugging Face name, in f32.
    pub weights: MemoryWeights,
    /// How many modules the adapter changed.
    pub merged_modules: usize,
    /// Whether the base was quantized (then dequantized to f32 and merged
    /// in f32, never merged into quantized blocks, which loses quality).
    pub dequantized_base: bool,
}

/// The bundle's weights in f32, with the PEFT adapter folder `adapter` (if
/// any) folded in (`W + scale·B·A`). An adapter that names a module the
/// model lacks, or whose factors do not fit the module's shape (an
/// adapter trained for another model), is refused.
pub fn merged_weights(b: &Bundle, adapter: Option<&Path>) -> Result<Merged> {
    let src = b.source.weights(&b.config)?;
    let dequantized_base = is_quantized(src.as_ref());
    let mut weights = collect_weights(&b.config, src.as_ref())?;
    let Some(dir) = adapter else {
        return Ok(Merged {
            weights,
            merged_modules: 0,
            dequantized_base,
        });
    };
    let file = read_peft(dir)?;
    if !file.modules.is_empty() {
        // Whole modules besides LoRA: refused with load_peft's reason.
        skillet_adapters::load_peft(dir)?;
    }
    let (config, lora) = (&file.config, &file.lora);
    let settings = config
        .settings()
        .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", dir.display())))?;
    let refuse = |message: String| RuntimeError::Invalid(format!("{}: {message}", dir.display()));
    for (module, (a, bm)) in lora {
        let key = format!("{module}.weight");
        let base = weights.tensors.get(&key).ok_or_else(|| {
            refuse(format!(
                "the adapter targets '{module}', which this model does not have"
            ))
        })?;
        let (out, inp) = base.dims2()?;
        if a.dims() != [settings.r, inp] || bm.dims() != [out, settings.r] {
            return Err(refuse(format!(
                "the adapter's {module} (A {:?}, B {:?}) does not fit this model, whose \
                 weight is [{out}, {inp}] (rank {}): it was made for another model",
                a.dims(),
                bm.dims(),
                settings.r
            )));
        }
        let magnitude = file.magnitudes.get(module);
        let merged = merged_weight(base, a, bm, settings.scale(), magnitude)?;
        weights.tensors.insert(key, merged);
    }
    Ok(Merged {
        weights,
        merged_modules: lora.len(),
        dequantized_base,
    })
}

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
