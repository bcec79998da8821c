//! The LoRA adapter: for each target module, `y = base(x) + scale ·
//! dropout(x) Aᵀ Bᵀ` with `A` `[r, in]` and `B` `[out, r]`, as PEFT's
//! `lora.Linear`. The adapter is a value passed with each forward call
//! (see `skillet_models::Adapters`), never written into the model, so one
//! model runs many adapters at once. Dropout is seeded by the call, so
//! training is reproducible and a resumed run draws the same masks.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use skillet_models::{Adapter, CausalLm, LoraFactors, Rng};

use crate::{AdapterError, LoraSettings, LoraWeights, PeftAdapterConfig, Result, load_peft};

/// The factors of one adapted module.
#[derive(Debug, Clone)]
pub struct LoraParams {
    /// Module name (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// `[r, in]` (a variable's tensor when trainable).
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `b` transposed and contiguous, kept by a frozen adapter for the
    /// batched inference kernel (`None` when trainable: `b` changes).
    pub b_t: Option<Tensor>,
}

/// A LoRA adapter for one model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The settings it was made with.
    pub settings: LoraSettings,
    /// Per adapted module, in the model's module order.
    pub params: Vec<LoraParams>,
    /// A then B of each module when trainable; empty when frozen.
    vars: Vec<Var>,
    /// Per model module, the index into `params`.
    by_module: Vec<Option<usize>>,
}

impl LoraAdapter {
    /// A trainable adapter on every target module of `model`. `initial`
    /// gives `(A, B)` per module name (an existing adapter); modules not in
    /// it get PEFT's default init: A Kaiming-uniform with a = √5, i.e.
    /// U(±1/√in), and B zero, so the adapted model starts equal to the base.
    pub fn new(
        model: &dyn CausalLm,
        settings: &LoraSettings,
        seed: u64,
        initial: Option<&LoraWeights>,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed);
        Self::build(model, settings, initial, true, |_, inp, out, r| {
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            Ok((
                Tensor::from_vec(a, (r, inp), &Device::Cpu)?,
                Tensor::zeros((out, r), DType::F32, &Device::Cpu)?,
            ))
        })
    }

    /// A frozen adapter read from a PEFT folder, for inference. Every
    /// target module of the model must have its weights in the file, every
    /// weight must name a target module, and all must be finite: an adapter
    /// that does not fit the model is refused, never served as the base.
    pub fn load(model: &dyn CausalLm, dir: &Path) -> Result<Self> {
        let (config, weights) = load_peft(dir)?;
        Self::from_file(model, dir, config, weights)
    }

    /// A frozen adapter from the config and factors read from `dir`,
    /// checked as [`LoraAdapter::load`] says.
    pub(crate) fn from_file(
        model: &dyn CausalLm,
        dir: &Path,
        config: PeftAdapterConfig,
        weights: LoraWeights,
    ) -> Result<Self> {
        let settings = config.settings().map_err(|e| AdapterError::File {
            path: dir.join("adapter_config.json"),
            message: e.to_string(),
        })?;
        let file = dir.join("adapter_model.safetensors");
        for (module, (a, b)) in &weights {
            for t in [a, b] {
                let finite = t
                    .to_dtype(DType::F32)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?
                    .is_finite();
                if !finite {
                    return Err(AdapterError::File {
                        path: file.clone(),
                        message: format!("the weights of {module} are not all finite"),
                    });
                }
            }
        }
        Self::build(model, &settings, Some(&weights), false, |name, _, _, _| {
            Err(AdapterError::File {
                path: file.clone(),
                message: format!(
                    "target_modules selects {name}, but the file has no weights for it"
                ),
            })
        })
        .map_err(|e| match e {
            AdapterError::File { .. } | AdapterError::Io { .. } => e,
            other => AdapterError::File {
                path: dir.to_path_buf(),
                message: other.to_string(),
            },
        })
    }

    fn build(
        model: &dyn CausalLm,
        settings: &LoraSettings,
        initial: Option<&LoraWeights>,
        trainable: bool,
        mut fresh: impl FnMut(&str, usize, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let modules = model.modules();
        let r = settings.r;
        let mut params = Vec::new();
        let mut vars = Vec::new();
        let mut by_module = vec![None; modules.len()];
        for (id, m) in modules.iter().enumerate() {
            if !settings.targets.matches(&m.name) {
                continue;
            }
            let (inp, out) = (m.in_features, m.out_features);
            let (a, b) = match initial.and_then(|w| w.get(&m.name)) {
                Some((a, b)) => {
                    if a.dims() != [r, inp] || b.dims() != [out, r] {
                        return Err(AdapterError::Settings(format!(
                            "adapter for {} has A {:?} and B {:?}, expected [{r}, {inp}] and [{out}, {r}]",
                            m.name,
                            a.dims(),
                            b.dims()
                        )));
                    }
                    (
                        a.to_dtype(DType::F32)?.contiguous()?,
                        b.to_dtype(DType::F32)?.contiguous()?,
                    )
                }
                None => fresh(&m.name, inp, out, r)?,
            };
            let (a, b, b_t) = if trainable {
                let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                let ts = (va.as_tensor().clone(), vb.as_tensor().clone(), None);
                vars.extend([va, vb]);
                ts
            } else {
                let b_t = b.t()?.contiguous()?;
                (a, b, Some(b_t))
            };
            by_module[id] = Some(params.len());
            params.push(LoraParams {
                module: m.name.clone(),
                a,
                b,
                b_t,
            });
        }
        if params.is_empty() {
            return Err(AdapterError::NoTargets {
                targets: settings.targets.to_json().to_string(),
                example: modules.first().map(|m| m.name.clone()).unwrap_or_default(),
            });
        }
        if let Some(init) = initial {
            let known: HashSet<&str> = params.iter().map(|p| p.module.as_str()).collect();
            if let Some(extra) = init.keys().find(|k| !known.contains(k.as_str())) {
                return Err(AdapterError::Settings(format!(
                    "the adapter has weights for {extra}, which is not a target module of this model"
                )));
            }
        }
        Ok(Self {
            settings: settings.clone(),
            params,
            vars,
            by_module,
        })
    }

    /// Every trainable variable (A then B of each module); empty when frozen.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    /// Number of adapter parameters.
    pub fn parameter_count(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    fn dropout(&self, x: &Tensor, index: usize, seed: Option<u64>) -> Result<Tensor> {
        let Some(seed) = seed.filter(|_| self.settings.dropout > 0.0) else {
            return Ok(x.clone());
        };
        let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let keep = 1.0 - self.settings.dropout as f64;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.next_f64() < keep { scale } else { 0.0 })
            .collect();
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
    }
}

impl Adapter for LoraAdapter {
    fn delta(
        &self,
        module: usize,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> skillet_models::Result<Option<Tensor>> {
        let Some(&Some(i)) = self.by_module.get(module) else {
            return Ok(None);
        };
        let p = &self.params[i];
        let xin = self.dropout(x, i, dropout_seed).map_err(|e| match e {
            AdapterError::Candle(c) => skillet_models::ModelError::Candle(c),
            other => skillet_models::ModelError::Input(other.to_string()),
        })?;
        let delta = (xin.matmul(&p.a.t()?)?.matmul(&p.b.t()?)? * self.settings.scale())?;
        Ok(Some(delta))
    }

    fn adapts(&self, module: usize) -> bool {
        matches!(self.by_module.get(module), Some(Some(_)))
    }

    fn dropout(&self) -> f32 {
        self.settings.dropout
    }

    fn factors(&self, module: usize) -> Option<LoraFactors> {
        let p = &self.params[(*self.by_module.get(module)?)?];
        Some(LoraFactors {
            a: p.a.clone(),
            b: p.b.clone(),
            b_t: p.b_t.clone(),
            scale: self.settings.scale() as f32,
        })
    }
}

/// `W + scale · B·A`: the base weight with the adapter folded in.
pub fn merged_weight(base: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((base + (b.matmul(a)? * scale)?)?)
}
