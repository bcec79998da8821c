//! Checkpoints: everything needed to continue a run exactly: the trained
//! parameters (an adapter in PEFT format), both AdamW moments, and the trainer's position (step,
//! epoch, micro-batch). Data order and dropout masks are derived from the
//! seed and that position, so they need no stored RNG state. Written to a
//! temporary folder, then renamed: a crash never leaves half a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::trainable::Trainable;
use crate::{AdamW, Result, TrainError};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Where the trainer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Micro-batches of the current epoch already consumed.
    pub micro: u64,
    /// Labelled tokens trained on so far.
    pub tokens: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Invalid(format!("{}: {e}", path.display()))
}

/// `dir/checkpoints/step-N`.
pub fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:06}"))
}

/// Writes a checkpoint of `state` under `out` and returns its folder.
pub fn save_checkpoint(
    out: &Path,
    state: &TrainState,
    trainable: &dyn Trainable,
    opt: &AdamW,
    base_model: Option<String>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(out, state.step);
    let tmp = final_dir.with_file_name(format!(".partial-step-{:06}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    trainable.save(&tmp, base_model)?;
    let (m, v) = opt.moments();
    let mut tensors = HashMap::new();
    for (i, (mi, vi)) in m.iter().zip(v).enumerate() {
        tensors.insert(format!("m.{i}"), Tensor::new(mi.as_slice(), &Device::Cpu)?);
        tensors.insert(format!("v.{i}"), Tensor::new(vi.as_slice(), &Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, tmp.join("optimizer.safetensors"))?;
    let json = serde_json::json!({"state": state, "optimizer_step": opt.step});
    std::fs::write(
        tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&json).expect("json") + "\n",
    )
    .map_err(io(&tmp))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    Ok(final_dir)
}

/// The newest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    dirs.pop()
}

/// Reads the trainer state and optimizer moments of a checkpoint into `opt`.
pub fn load_checkpoint_state(dir: &Path, opt: &mut AdamW) -> Result<TrainState> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).map_err(io(dir))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", dir.display())))?;
    let state: TrainState = serde_json::from_value(json["state"].clone())
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", dir.display())))?;
    let opt_step = json["optimizer_step"].as_u64().unwrap_or(state.step);
    let tensors = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    let n = opt.vars().len();
    let get = |k: String| -> Result<Vec<f32>> {
        tensors
            .get(&k)
            .ok_or_else(|| {
                TrainError::Invalid(format!("{}: optimizer state has no '{k}'", dir.display()))
            })?
            .to_vec1::<f32>()
            .map_err(Into::into)
    };
    let m = (0..n)
        .map(|i| get(format!("m.{i}")))
        .collect::<Result<Vec<_>>>()?;
    let v = (0..n)
        .map(|i| get(format!("v.{i}")))
        .collect::<Result<Vec<_>>>()?;
    opt.restore(opt_step, m, v)?;
    Ok(state)
}
