//! The LoRA layer: `y = base(x) + scale · dropout(x) Aᵀ Bᵀ`, with `A`
//! `[r, in]` and `B` `[out, r]` trainable and the base frozen, as PEFT's
//! `lora.Linear`. Dropout is seeded per step so training is reproducible
//! and a resumed run draws the same masks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use skillet_models::{Linear, Llama, Rng};

use crate::{AdapterError, LoraSettings, LoraWeights, Result};

/// Switches dropout on (training) or off (evaluation) for every LoRA layer
/// of a model and sets the seed of the current step.
#[derive(Debug, Default)]
pub struct DropoutControl {
    enabled: AtomicBool,
    step_seed: AtomicU64,
}

impl DropoutControl {
    /// Enables dropout with masks derived from `step_seed`.
    pub fn train(&self, step_seed: u64) {
        self.step_seed.store(step_seed, Ordering::Relaxed);
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Disables dropout.
    pub fn eval(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }
}

/// A LoRA-wrapped linear layer.
#[derive(Debug)]
pub struct LoraLinear {
    base: Box<dyn Linear>,
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    control: Arc<DropoutControl>,
    index: u64,
}

impl LoraLinear {
    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout == 0.0 || !self.control.enabled.load(Ordering::Relaxed) {
            return Ok(x.clone());
        }
        let seed = self.control.step_seed.load(Ordering::Relaxed)
            ^ self.index.wrapping_mul(0xA24B_AED4_963E_E407);
        let mut rng = Rng::new(seed);
        let keep = 1.0 - self.dropout as f64;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.next_f64() < keep { scale } else { 0.0 })
            .collect();
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
    }
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> skillet_models::Result<Tensor> {
        let y = self.base.forward(x)?;
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let xin = self.dropout(x).map_err(|e| match e {
            AdapterError::Candle(c) => skillet_models::ModelError::Candle(c),
            other => skillet_models::ModelError::Input(other.to_string()),
        })?;
        let xin = xin.reshape((rows, self.base.in_features()))?;
        let delta = (xin
            .matmul(&self.a.as_tensor().t()?)?
            .matmul(&self.b.as_tensor().t()?)?
            * self.scale)?;
        let delta = delta.reshape(y.shape())?;
        Ok((y + delta)?)
    }

    fn in_features(&self) -> usize {
        self.base.in_features()
    }

    fn out_features(&self) -> usize {
        self.base.out_features()
    }
}

/// The trainable tensors of one adapted module.
#[derive(Debug, Clone)]
pub struct LoraParams {
    /// Module name (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
}

/// All LoRA layers applied to one model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The settings they were made with.
    pub settings: LoraSettings,
    /// Per module, in the model's order.
    pub params: Vec<LoraParams>,
    /// Dropout switch shared by all layers.
    pub dropout: Arc<DropoutControl>,
}

impl LoraAdapter {
    /// Every trainable variable (A then B of each module).
    pub fn vars(&self) -> Vec<Var> {
        self.params
            .iter()
            .flat_map(|p| [p.a.clone(), p.b.clone()])
            .collect()
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }
}

/// Wraps every target module of `model` in a LoRA layer. `initial` gives
/// `(A, B)` per module name (an existing adapter); modules not in it get
/// PEFT's default init: A Kaiming-uniform with a = √5, i.e. U(±1/√in), and
/// B zero, so the adapted model starts equal to the base.
pub fn apply_lora(
    model: &mut Llama,
    settings: &LoraSettings,
    seed: u64,
    initial: Option<&LoraWeights>,
) -> Result<LoraAdapter> {
    let control = Arc::new(DropoutControl::default());
    let mut rng = Rng::new(seed);
    let mut params = Vec::new();
    let mut example = String::new();
    let mut error = None;
    model.visit_linears_mut(|name, slot| {
        if example.is_empty() {
            example = name.to_string();
        }
        if error.is_some() || !settings.targets.matches(name) {
            return;
        }
        let (inp, out, r) = (slot.in_features(), slot.out_features(), settings.r);
        let made = (|| -> Result<(Var, Var)> {
            match initial.and_then(|m| m.get(name)) {
                Some((a, b)) => {
                    if a.dims() != [r, inp] || b.dims() != [out, r] {
                        return Err(AdapterError::Settings(format!(
                            "adapter for {name} has A {:?} and B {:?}, expected [{r}, {inp}] and [{out}, {r}]",
                            a.dims(),
                            b.dims()
                        )));
                    }
                    Ok((Var::from_tensor(&a.to_dtype(DType::F32)?)?, Var::from_tensor(&b.to_dtype(DType::F32)?)?))
                }
                None => {
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f32> = (0..r * inp).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
                    let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), &Device::Cpu)?)?;
                    let b = Var::zeros((out, r), DType::F32, &Device::Cpu)?;
                    Ok((a, b))
                }
            }
        })();
        match made {
            Ok((a, b)) => {
                let base = std::mem::replace(slot, Box::new(Placeholder));
                *slot = Box::new(LoraLinear {
                    base,
                    a: a.clone(),
                    b: b.clone(),
                    scale: settings.scale(),
                    dropout: settings.dropout,
                    control: control.clone(),
                    index: params.len() as u64,
                });
                params.push(LoraParams { module: name.to_string(), a, b });
            }
            Err(e) => error = Some(e),
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    if params.is_empty() {
        return Err(AdapterError::NoTargets {
            targets: settings.targets.to_json().to_string(),
            example,
        });
    }
    if let Some(init) = initial {
        let known: std::collections::HashSet<&str> =
            params.iter().map(|p| p.module.as_str()).collect();
        if let Some(extra) = init.keys().find(|k| !known.contains(k.as_str())) {
            return Err(AdapterError::Settings(format!(
                "the adapter has weights for {extra}, which is not a target module of this model"
            )));
        }
    }
    Ok(LoraAdapter {
        settings: settings.clone(),
        params,
        dropout: control,
    })
}

/// Stands in for a layer while it is being moved into its wrapper.
#[derive(Debug)]
struct Placeholder;

impl Linear for Placeholder {
    fn forward(&self, _: &Tensor) -> skillet_models::Result<Tensor> {
        Err(skillet_models::ModelError::Input(
            "placeholder layer".into(),
        ))
    }
    fn in_features(&self) -> usize {
        0
    }
    fn out_features(&self) -> usize {
        0
    }
}

/// `W + scale · B·A`: the base weight with the adapter folded in.
pub fn merged_weight(base: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((base + (b.matmul(a)? * scale)?)?)
}
