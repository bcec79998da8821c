//! Writing GGUF files llama.cpp loads: a whole model (merged with an
//! adapter or not) in a chosen file type, with its tokenizer and chat
//! template; and an adapter alone in llama.cpp's LoRA adapter format.

use std::path::Path;

use skillet_gguf::Value;
use skillet_models::export::{LoraTensors, write_gguf, write_gguf_lora};
use skillet_models::{FileType, MemoryWeights, ModelSource, layer_of, tensor_shapes};
use skillet_tokenizer::gguf_tokenizer_metadata;

use crate::export::{check_fits, read_adapter};
use crate::{Bundle, Result, RuntimeError};

/// The GGUF tokenizer entries of the bundle's model: copied as they are
/// from a GGUF source (plus Skillet's chat template where the file has
/// none), written from `tokenizer.json` for a Hugging Face folder.
pub fn tokenizer_metadata(b: &Bundle) -> Result<Vec<(String, Value)>> {
    let template = b.template.as_ref().map(|t| t.source());
    Ok(match &b.source {
        ModelSource::Gguf(file) => {
            let mut out: Vec<(String, Value)> = file
                .metadata()
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if let Some(t) = template
                && !out.iter().any(|(k, _)| k == "tokenizer.chat_template")
            {
                out.push(("tokenizer.chat_template".into(), Value::String(t.into())));
            }
            out
        }
        ModelSource::HfFolder(_) => gguf_tokenizer_metadata(&b.tokenizer, template)?,
    })
}

/// Writes `weights` (the bundle's model, an adapter perhaps merged in) as
/// one GGUF file of type `ty`, each tensor stored as llama.cpp's quantizer
/// would store it ([`FileType::storage`]).
pub fn write_gguf_model(
    b: &Bundle,
    weights: &MemoryWeights,
    ty: FileType,
    out: &Path,
) -> Result<()> {
    let cfg = &b.config;
    let cols: std::collections::HashMap<String, usize> = tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| (name, shape.last().copied().unwrap_or(1)))
        .collect();
    let mut extra = tokenizer_metadata(b)?;
    extra.push(("general.file_type".into(), Value::U32(ty.ftype())));
    let storage = |name: &str| ty.storage(cfg, name, cols.get(name).copied().unwrap_or(1));
    write_gguf(cfg, weights, out, &storage, extra)?;
    Ok(())
}

/// Writes the PEFT adapter folder `adapter` as a llama.cpp LoRA GGUF for
/// the bundle's model; returns how many modules it holds. DoRA adapters
/// have no such form and are refused.
pub fn write_gguf_adapter(b: &Bundle, adapter: &Path, out: &Path) -> Result<usize> {
    let (file, settings) = read_adapter(adapter)?;
    if settings.use_dora {
        return Err(RuntimeError::Invalid(format!(
            "{}: a DoRA adapter has no llama.cpp LoRA form (llama.cpp applies B·A alone); \
             merge it into the model instead (--format gguf)",
            adapter.display()
        )));
    }
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        tensor_shapes(&b.config).into_iter().collect();
    let mut modules: Vec<LoraTensors> = Vec::with_capacity(file.lora.len());
    for (module, (a, bm)) in file.lora {
        let dims = shapes.get(&format!("{module}.weight")).map(Vec::as_slice);
        check_fits(adapter, &module, (&a, &bm), settings.r, dims)?;
        modules.push(LoraTensors { module, a, b: bm });
    }
    // Layer order, as llama.cpp's converter writes them.
    modules.sort_by_key(|m| (layer_of(&m.module).unwrap_or(usize::MAX), m.module.clone()));
    write_gguf_lora(&b.config, &modules, settings.scale(), out)?;
    Ok(modules.len())
}
