//! Models of a published shape with random weights, for benchmarks at
//! sizes whose real weights are not at hand: written as GGUF with another
//! model's tokenizer, so every tool that reads a GGUF (Skillet's loaders,
//! transformers, llama.cpp) can load them.

use std::path::Path;

use skillet_gguf::{GgmlType, GgufFile, Value};
use skillet_models::{export::write_gguf, random_weights_with, shape_config};

use crate::{Result, RuntimeError};

/// Writes a GGUF of shape `shape` (one of [`skillet_models::SHAPES`]) with
/// random weights (standard deviation 0.02, as transformers initializes)
/// stored as `storage` (norms stay F32), and every `tokenizer.*` entry of
/// the GGUF at `tokenizer_from`. The vocabulary size is the shape's; ids
/// past the tokenizer's own are never produced by it but are valid inputs.
pub fn write_random_model(
    shape: &str,
    tokenizer_from: &Path,
    storage: GgmlType,
    out: &Path,
) -> Result<()> {
    let cfg = shape_config(shape).ok_or_else(|| {
        RuntimeError::Invalid(format!(
            "unknown model shape '{shape}' (one of {})",
            skillet_models::SHAPES.join(", ")
        ))
    })?;
    let src = GgufFile::open(tokenizer_from).map_err(skillet_models::ModelError::from)?;
    let tokenizer: Vec<(String, Value)> = src
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let weights = random_weights_with(&cfg, 7, 0.02 * 12f32.sqrt())?;
    write_gguf(&cfg, &weights, out, &|_| storage, tokenizer)?;
    Ok(())
}
