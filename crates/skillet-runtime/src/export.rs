//! Writing a model out: its weights with an adapter folded in, as a
//! Hugging Face folder (config.json, f32 model.safetensors,
//! tokenizer.json, tokenizer_config.json, chat_template.jinja,
//! generation_config.json) that transformers loads. GGUF files are
//! `export_gguf.rs`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use skillet_adapters::{LoraSettings, PeftFile, merged_weight, read_lora_peft};
use skillet_models::export::{TokenIds, write_hf_weights};
use skillet_models::{MemoryWeights, WeightSource, collect_weights};

use crate::{AdapterSpec, Bundle, Result, RuntimeError};

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

/// The bundle's weights in f32, with the PEFT adapter folders of
/// `adapters` (if any) folded in: one as `W + scale·B·A` (DoRA: PEFT's
/// merge), several as `W` plus each one's update at its weight, each
/// update taken on the base `W` (so the merged model equals the adapters
/// run together). An adapter that names a module the model lacks, or whose
/// factors do not fit the module's shape (an adapter trained for another
/// model), is refused.
pub fn merged_weights(b: &Bundle, adapters: &[AdapterSpec]) -> Result<Merged> {
    let src = b.source.weights(&b.config)?;
    let dequantized_base = is_quantized(src.as_ref());
    let mut weights = collect_weights(&b.config, src.as_ref())?;
    let mut bases: HashMap<String, Tensor> = HashMap::new();
    for spec in adapters {
        let dir = spec.dir.as_path();
        let (file, settings) = read_adapter(dir)?;
        let scale = settings.scale() * spec.weight;
        for (module, (a, bm)) in &file.lora {
            let key = format!("{module}.weight");
            let current = weights.tensors.get(&key);
            check_fits(dir, module, (a, bm), settings.r, current.map(|t| t.dims()))?;
            let current = current.expect("checked").clone();
            let base = bases.entry(key.clone()).or_insert_with(|| current.clone());
            let magnitude = file.magnitudes.get(module);
            let merged = merged_weight(base, a, bm, scale, magnitude)?;
            let merged = match adapters.len() {
                1 => merged,
                _ => (&current + (merged - &*base)?)?,
            };
            weights.tensors.insert(key, merged);
        }
    }
    Ok(Merged {
        weights,
        merged_modules: bases.len(),
        dequantized_base,
    })
}

/// The PEFT adapter folder `dir` (LoRA or DoRA factors alone, no whole
/// modules) and its validated settings, for merging or converting.
pub(crate) fn read_adapter(dir: &Path) -> Result<(PeftFile, LoraSettings)> {
    let file = read_lora_peft(dir)?;
    let settings = file
        .config
        .settings()
        .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", dir.display())))?;
    Ok((file, settings))
}

/// Refuses the factors `(A, B)` of `module` (rank `r`) unless the model
/// has the module and its weight `dims` are `[out, in]` with `A` `[r, in]`
/// and `B` `[out, r]`: an adapter made for another model.
pub(crate) fn check_fits(
    dir: &Path,
    module: &str,
    (a, b): (&Tensor, &Tensor),
    r: usize,
    dims: Option<&[usize]>,
) -> Result<()> {
    let refuse = |message: String| RuntimeError::Invalid(format!("{}: {message}", dir.display()));
    let Some(dims) = dims else {
        return Err(refuse(format!(
            "the adapter targets '{module}', which this model does not have"
        )));
    };
    match dims {
        [out, inp] if a.dims() == [r, *inp] && b.dims() == [*out, r] => Ok(()),
        _ => Err(refuse(format!(
            "the adapter's {module} (A {:?}, B {:?}) does not fit this model, whose weight \
             is {dims:?} (rank {r}): it was made for another model",
            a.dims(),
            b.dims(),
        ))),
    }
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
