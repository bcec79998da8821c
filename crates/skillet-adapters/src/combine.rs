//! Several LoRA adapters made into one, as PEFT's `add_weighted_adapter`
//! (`c_i` below is adapter `i`'s weight times its scale, `alpha/r` or
//! `alpha/√r`):
//! - `linear`: `A = Σ sign(c_i)·√|c_i|·A_i`, `B = Σ √|c_i|·B_i` (adapters of
//!   one rank; not the weighted sum of the updates, only near it);
//! - `cat`: `A` the `c_i·A_i` stacked, `B` the `B_i` side by side (rank
//!   `Σ r_i`; the update is exactly `Σ c_i·B_i·A_i`);
//! - `svd`: the best rank-`r` factors of `Σ c_i·B_i·A_i` (`B = U·S`,
//!   `A = Vᵀ`; `r` the largest rank unless given).
//!
//! The result has `lora_alpha = r`, so its scale is 1, and targets the
//! modules of every adapter. Where an adapter lacks a module, the others'
//! factors make it (`cat` pads the rank with zeros, as PEFT). PEFT copies
//! the first adapter's `use_rslora`, which would give the result a scale of
//! `√r`; it is written off here, so the file means what its factors say.
//! DoRA adapters are refused: a magnitude vector belongs to one direction
//! and does not combine.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::linalg::{Mat, qr, svd};
use crate::{AdapterError, LoraWeights, PeftFile, Result};

/// How adapters are made into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Weighted sums of the `A`s and of the `B`s (one rank).
    Linear,
    /// Factors concatenated: the exact weighted sum of the updates.
    Cat,
    /// The weighted sum of the updates, truncated to a rank by SVD.
    Svd {
        /// The rank of the result; the largest of the adapters' if `None`.
        rank: Option<usize>,
    },
}

/// One adapter `(A, B, c)` of a module, `c` its weight times its scale.
type Part<'a> = (&'a Tensor, &'a Tensor, f64);

/// The adapter that `parts` (each a PEFT file and its weight) make by
/// `how`. With one adapter, `linear` is used whatever `how` says (PEFT's
/// rule).
pub fn combine(parts: &[(&PeftFile, f64)], how: Combine) -> Result<PeftFile> {
    let refuse = |m: String| Err(AdapterError::Settings(m));
    let Some((first, _)) = parts.first() else {
        return refuse("no adapters to combine".into());
    };
    let how = if parts.len() == 1 {
        Combine::Linear
    } else {
        how
    };
    let mut scales = Vec::new();
    for (i, (file, weight)) in parts.iter().enumerate() {
        let settings = file.config.settings()?;
        if settings.use_dora {
            return refuse(format!(
                "adapter {} is DoRA: its magnitude vectors do not combine with other adapters \
                 (merge it into the base instead)",
                i + 1
            ));
        }
        if !weight.is_finite() {
            return refuse(format!("adapter {} has weight {weight}", i + 1));
        }
        scales.push(weight * settings.scale());
    }
    let ranks: Vec<usize> = parts.iter().map(|(f, _)| f.config.r).collect();
    let rank = match how {
        Combine::Linear if ranks.iter().any(|&r| r != ranks[0]) => {
            return refuse(format!(
                "linear combination needs adapters of one rank, got ranks {ranks:?} (use cat or svd)"
            ));
        }
        Combine::Linear => ranks[0],
        Combine::Cat => ranks.iter().sum(),
        Combine::Svd { rank: Some(0) } => return refuse("the SVD rank must be at least 1".into()),
        Combine::Svd { rank } => rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
    };
    let mut modules: Vec<&String> = parts.iter().flat_map(|(f, _)| f.lora.keys()).collect();
    modules.sort_unstable();
    modules.dedup();
    let mut lora = LoraWeights::new();
    for module in modules {
        let of_module: Vec<Part<'_>> = parts
            .iter()
            .zip(&scales)
            .filter_map(|((f, _), &c)| f.lora.get(module).map(|(a, b)| (a, b, c)))
            .collect();
        let (inp, out) = (of_module[0].0.dim(1)?, of_module[0].1.dim(0)?);
        if of_module
            .iter()
            .any(|(a, b, _)| a.dim(1).ok() != Some(inp) || b.dim(0).ok() != Some(out))
        {
            return refuse(format!(
                "the adapters' factors of {module} have different shapes: they were made for different models"
            ));
        }
        let factors = match how {
            Combine::Linear => linear(&of_module)?,
            Combine::Cat => cat(&of_module, rank)?,
            Combine::Svd { .. } => truncated(&of_module, rank, inp, out)?,
        };
        lora.insert(module.clone(), factors);
    }
    let mut config = first.config.clone();
    config.r = rank;
    config.lora_alpha = rank as f64;
    config.use_rslora = false;
    config.target_modules = targets(parts, &lora);
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.peft_version = None;
    config.inference_mode = true;
    Ok(PeftFile {
        config,
        lora,
        magnitudes: HashMap::new(),
        modules: HashMap::new(),
    })
}

fn f32s(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// PEFT's `linear`: the square root of each weight on both sides, the
/// sign on `A`'s.
fn linear(parts: &[Part<'_>]) -> Result<(Tensor, Tensor)> {
    let mut a_sum: Option<Tensor> = None;
    let mut b_sum: Option<Tensor> = None;
    for &(a, b, c) in parts {
        let root = c.abs().sqrt() as f32 as f64;
        let a = (f32s(a)? * if c >= 0.0 { root } else { -root })?;
        let b = (f32s(b)? * root)?;
        a_sum = Some(match a_sum {
            Some(s) => (s + a)?,
            None => a,
        });
        b_sum = Some(match b_sum {
            Some(s) => (s + b)?,
            None => b,
        });
    }
    Ok((a_sum.expect("one part"), b_sum.expect("one part")))
}

/// PEFT's `cat`, padded with zeros to `rank`.
fn cat(parts: &[Part<'_>], rank: usize) -> Result<(Tensor, Tensor)> {
    let mut a: Vec<Tensor> = Vec::new();
    let mut b: Vec<Tensor> = Vec::new();
    for &(pa, pb, c) in parts {
        a.push((f32s(pa)? * c)?);
        b.push(f32s(pb)?);
    }
    let have: usize = a
        .iter()
        .map(|t| t.dim(0))
        .sum::<candle_core::Result<usize>>()?;
    let (inp, out) = (a[0].dim(1)?, b[0].dim(0)?);
    if have < rank {
        a.push(Tensor::zeros((rank - have, inp), DType::F32, &Device::Cpu)?);
        b.push(Tensor::zeros((out, rank - have), DType::F32, &Device::Cpu)?);
    }
    Ok((Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?))
}

/// The best rank-`rank` factors of `Σ c_i·B_i·A_i`, through the QR of
/// the concatenated factors: `B_cat = Q_b R_b`, `A_catᵀ = Q_a R_a`, so the
/// update is `Q_b (R_b R_aᵀ) Q_aᵀ` and only the small middle needs an SVD.
fn truncated(parts: &[Part<'_>], rank: usize, inp: usize, out: usize) -> Result<(Tensor, Tensor)> {
    let (a, b) = cat(parts, 0)?;
    let mat = |t: &Tensor| -> Result<Mat> {
        let (rows, cols) = t.dims2()?;
        let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(Mat { rows, cols, data })
    };
    let (qb, rb) = qr(&mat(&b)?);
    let (qa, ra) = qr(&mat(&a.t()?)?);
    let (u, s, v) = svd(&rb.matmul(&ra.transpose()));
    let (u, v) = (qb.matmul(&u), qa.matmul(&v)); // [out, k], [in, k]
    let mut new_a = vec![0f32; rank * inp];
    let mut new_b = vec![0f32; out * rank];
    for k in 0..rank.min(s.len()) {
        for i in 0..inp {
            new_a[k * inp + i] = v.at(i, k) as f32;
        }
        for o in 0..out {
            new_b[o * rank + k] = (u.at(o, k) * s[k]) as f32;
        }
    }
    Ok((
        Tensor::from_vec(new_a, (rank, inp), &Device::Cpu)?,
        Tensor::from_vec(new_b, (out, rank), &Device::Cpu)?,
    ))
}

/// The combined adapter's `target_modules`: the union of the adapters'
/// lists where all are lists, the common value where all agree, else the
/// full name of every module it has weights for.
fn targets(parts: &[(&PeftFile, f64)], lora: &LoraWeights) -> serde_json::Value {
    let all: Vec<&serde_json::Value> = parts
        .iter()
        .map(|(f, _)| &f.config.target_modules)
        .collect();
    if all.iter().all(|t| *t == all[0]) {
        return all[0].clone();
    }
    if all.iter().all(|t| t.is_array()) {
        let mut names: Vec<serde_json::Value> = Vec::new();
        for t in all.iter().filter_map(|t| t.as_array()).flatten() {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
        return serde_json::Value::Array(names);
    }
    let mut names: Vec<&String> = lora.keys().collect();
    names.sort_unstable();
    serde_json::json!(names)
}
