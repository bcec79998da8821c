//! The PEFT adapter format: `adapter_config.json` plus
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight`
//! `[out, r]`, metadata `{"format": "pt"}`, plus whole modules trained
//! beside LoRA (`modules_to_save`, e.g. a reward model's `score`) as
//! `base_model.model.<module>.weight`. Read and written exactly so adapters
//! move between Skillet and PEFT unchanged.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{AdapterError, LoraAdapter, LoraWeights, PeftAdapterConfig, Result};

/// PEFT's name of a LoRA tensor: `part` is `lora_A` or `lora_B`.
pub fn peft_tensor_name(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}.weight")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> AdapterError + '_ {
    move |source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `adapter` into `dir` (created) as PEFT would.
pub fn save_peft(adapter: &LoraAdapter, dir: &Path, base_model: Option<String>) -> Result<()> {
    let config = PeftAdapterConfig::from_settings(&adapter.settings, base_model);
    write_peft(dir, &config, adapter, &[])
}

/// Writes `adapter` and whole `modules` (`(name, weight)`, e.g.
/// `("score.weight", w)`) into `dir` (created) under `config`.
pub fn write_peft(
    dir: &Path,
    config: &PeftAdapterConfig,
    adapter: &LoraAdapter,
    modules: &[(&str, &Tensor)],
) -> Result<()> {
    let mut tensors = Vec::new();
    for p in &adapter.params {
        tensors.push((peft_tensor_name(&p.module, "lora_A"), p.a.clone()));
        tensors.push((peft_tensor_name(&p.module, "lora_B"), p.b.clone()));
        if let Some(m) = &p.magnitude {
            tensors.push((magnitude_name(&p.module), m.clone()));
        }
    }
    for (name, t) in modules {
        tensors.push((format!("base_model.model.{name}"), (*t).clone()));
    }
    write_tensors(dir, config, tensors)
}

/// Writes `file` (config, factors, magnitudes, whole modules) into `dir`
/// (created), modules in name order.
pub fn write_peft_file(dir: &Path, file: &PeftFile) -> Result<()> {
    let mut names: Vec<&String> = file.lora.keys().collect();
    names.sort_unstable();
    let mut tensors = Vec::new();
    for m in names {
        let (a, b) = &file.lora[m];
        tensors.push((peft_tensor_name(m, "lora_A"), a.clone()));
        tensors.push((peft_tensor_name(m, "lora_B"), b.clone()));
        if let Some(mag) = file.magnitudes.get(m) {
            tensors.push((magnitude_name(m), mag.clone()));
        }
    }
    for (name, t) in &file.modules {
        tensors.push((format!("base_model.model.{name}"), t.clone()));
    }
    write_tensors(dir, &file.config, tensors)
}

fn magnitude_name(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

/// `adapter_config.json` and `adapter_model.safetensors` (f32 tensors,
/// metadata `{"format": "pt"}`) in `dir` (created).
fn write_tensors(
    dir: &Path,
    config: &PeftAdapterConfig,
    tensors: Vec<(String, Tensor)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let text = serde_json::to_string_pretty(&config).expect("config serializes") + "\n";
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join("adapter_model.safetensors");
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| AdapterError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
    write_atomic(&path, &bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A PEFT adapter folder as read: its config, the LoRA factors and the
/// whole modules saved beside them.
#[derive(Debug, Clone)]
pub struct PeftFile {
    /// `adapter_config.json`.
    pub config: PeftAdapterConfig,
    /// `(A, B)` per module name.
    pub lora: LoraWeights,
    /// DoRA's magnitude vector (`[out]`) per module name; empty for LoRA.
    pub magnitudes: HashMap<String, Tensor>,
    /// Whole-module weights by name (`score.weight`).
    pub modules: HashMap<String, Tensor>,
}

/// Reads a PEFT adapter folder of LoRA factors alone: its config and
/// `(A, B)` per module name. A DoRA adapter is refused here (its
/// magnitudes are in [`read_lora_peft`]'s answer, for the callers that
/// apply them), and so is one that saves whole modules, as there.
pub fn load_peft(dir: &Path) -> Result<(PeftAdapterConfig, LoraWeights)> {
    let file = read_lora_peft(dir)?;
    if file.config.use_dora {
        return Err(AdapterError::File {
            path: dir.join("adapter_config.json"),
            message: "a DoRA adapter (use_dora) is not supported here".into(),
        });
    }
    Ok((file.config, file.lora))
}

/// Reads a PEFT adapter folder of LoRA (or DoRA) weights alone. An adapter
/// that also saves whole modules (`modules_to_save`) is refused: using it
/// without them would silently give another model.
pub fn read_lora_peft(dir: &Path) -> Result<PeftFile> {
    let file = read_peft(dir)?;
    let mut saved: Vec<&str> = file.modules.keys().map(String::as_str).collect();
    saved.sort_unstable();
    if !saved.is_empty() {
        let head = if file.modules.contains_key("score.weight") {
            " (a reward model's score head: load it as a reward model)"
        } else {
            ""
        };
        return Err(AdapterError::File {
            path: dir.join("adapter_model.safetensors"),
            message: format!(
                "the adapter saves whole modules besides LoRA ({}){head}; only LoRA weights are supported here",
                saved.join(", ")
            ),
        });
    }
    Ok(file)
}

/// Reads a PEFT adapter folder: config, LoRA factors and saved modules.
pub fn read_peft(dir: &Path) -> Result<PeftFile> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let config: PeftAdapterConfig =
        serde_json::from_str(&text).map_err(|e| AdapterError::File {
            path: cfg_path.clone(),
            message: format!("invalid adapter_config.json: {e}"),
        })?;
    let path = dir.join("adapter_model.safetensors");
    if !path.is_file() {
        let bin = dir.join("adapter_model.bin");
        let message = if bin.is_file() {
            "only adapter_model.bin (pickle) is present; save the adapter with safetensors (PEFT's default)".to_string()
        } else {
            "missing adapter_model.safetensors".to_string()
        };
        return Err(AdapterError::File { path, message });
    }
    let tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| AdapterError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let mut a_parts = HashMap::new();
    let mut b_parts = HashMap::new();
    let mut modules = HashMap::new();
    let mut magnitudes = HashMap::new();
    for (name, t) in tensors {
        // PEFT files may carry the adapter name (".lora_A.default.weight",
        // ".modules_to_save.default.weight").
        let clean = name
            .replace(".modules_to_save.default.", ".")
            .replace(".default.weight", ".weight");
        let module = clean.strip_prefix("base_model.model.").unwrap_or(&clean);
        if let Some(m) = module.strip_suffix(".lora_A.weight") {
            a_parts.insert(m.to_string(), t);
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            b_parts.insert(m.to_string(), t);
        } else if let Some(m) = module
            .strip_suffix(".lora_magnitude_vector")
            .or_else(|| module.strip_suffix(".lora_magnitude_vector.weight"))
        {
            magnitudes.insert(m.to_string(), t);
        } else if module.contains("lora_") {
            return Err(AdapterError::File {
                path,
                message: format!(
                    "unexpected tensor '{name}' (only LoRA A/B weights and whole modules are supported)"
                ),
            });
        } else {
            modules.insert(module.to_string(), t);
        }
    }
    let mut out = HashMap::new();
    for (m, a) in a_parts {
        let b = b_parts.remove(&m).ok_or_else(|| AdapterError::File {
            path: path.clone(),
            message: format!("'{m}' has lora_A but no lora_B"),
        })?;
        out.insert(m, (a, b));
    }
    if let Some(m) = b_parts.keys().next() {
        return Err(AdapterError::File {
            path,
            message: format!("'{m}' has lora_B but no lora_A"),
        });
    }
    // DoRA needs a magnitude for every module; LoRA has none.
    let stray = match config.use_dora {
        true => out.keys().find(|m| !magnitudes.contains_key(*m)),
        false => magnitudes.keys().next(),
    };
    if let Some(m) = stray {
        let message = match config.use_dora {
            true => format!("use_dora is set but '{m}' has no lora_magnitude_vector"),
            false => format!("'{m}' has a lora_magnitude_vector but use_dora is not set"),
        };
        return Err(AdapterError::File { path, message });
    }
    Ok(PeftFile {
        config,
        lora: out,
        magnitudes,
        modules,
    })
}
