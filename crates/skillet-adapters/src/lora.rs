//! The LoRA adapter: for each target module, `y = base(x) + scale ·
//! dropout(x) Aᵀ Bᵀ` with `A` `[r, in]` and `B` `[out, r]`, as PEFT's
//! `lora.Linear`. With DoRA (Liu et al. 2024, arXiv 2402.09353; PEFT's
//! `DoraLinearLayer`) each module also has a magnitude `m` per output row:
//! `y = m/‖W + s·BA‖ ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias`, the row norms taken as
//! constants (detached), `m` starting at the norms themselves. The adapter is a value passed with each forward call
//! (see `skillet_models::Adapters`), never written into the model, so one
//! model runs many adapters at once. Dropout is seeded by the call, so
//! training is reproducible and a resumed run draws the same masks.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use skillet_models::{Adapter, BaseOutput, CausalLm, Linear, LoraFactors, Rng};

use crate::{AdapterError, LoraSettings, LoraWeights, PeftFile, Result, read_lora_peft};

/// DoRA magnitudes (`[out]`) by module name.
pub type Magnitudes = HashMap<String, Tensor>;

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
    /// DoRA's magnitude per output row, `[out]` (a variable's tensor when
    /// trainable); `None` for LoRA.
    pub magnitude: Option<Tensor>,
    /// DoRA: the squared row norms of the base weight, `[out]`, so the
    /// norms of `W + s·BA` need no pass over `W` (see `dora_norm`).
    w_sq: Option<Tensor>,
}

/// A LoRA adapter for one model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The settings it was made with.
    pub settings: LoraSettings,
    /// Per adapted module, in the model's module order.
    pub params: Vec<LoraParams>,
    /// A then B (then DoRA's magnitude) of each module when trainable;
    /// empty when frozen.
    vars: Vec<Var>,
    /// Per model module, the index into `params`.
    by_module: Vec<Option<usize>>,
    /// The factor on the settings' scale when used beside other adapters
    /// (PEFT's `set_scale`); 1 alone.
    weight: f64,
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
        Self::trainable(model, settings, seed, initial, None)
    }

    /// A trainable adapter starting from `start` (an `init_adapter` or a
    /// checkpoint), DoRA magnitudes included; what `start` lacks starts as
    /// [`LoraAdapter::new`] starts it.
    pub fn start(
        model: &dyn CausalLm,
        settings: &LoraSettings,
        seed: u64,
        start: Option<&PeftFile>,
    ) -> Result<Self> {
        match start {
            Some(f) => Self::trainable(model, settings, seed, Some(&f.lora), Some(&f.magnitudes)),
            None => Self::trainable(model, settings, seed, None, None),
        }
    }

    fn trainable(
        model: &dyn CausalLm,
        settings: &LoraSettings,
        seed: u64,
        initial: Option<&LoraWeights>,
        magnitudes: Option<&Magnitudes>,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let init = Init {
            factors: initial,
            magnitudes,
            trainable: true,
        };
        Self::build(model, settings, init, |_, inp, out, r| {
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
        Self::from_file(model, dir, &read_lora_peft(dir)?)
    }

    /// A frozen adapter from the file read from `dir`, checked as
    /// [`LoraAdapter::load`] says (whole modules besides are the caller's).
    pub(crate) fn from_file(model: &dyn CausalLm, dir: &Path, peft: &PeftFile) -> Result<Self> {
        let settings = peft.config.settings().map_err(|e| AdapterError::File {
            path: dir.join("adapter_config.json"),
            message: e.to_string(),
        })?;
        let file = dir.join("adapter_model.safetensors");
        let weights = &peft.lora;
        let all = weights
            .iter()
            .flat_map(|(m, (a, b))| [(m, a), (m, b)])
            .chain(&peft.magnitudes);
        for (module, t) in all {
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
        let init = Init {
            factors: Some(weights),
            magnitudes: Some(&peft.magnitudes),
            trainable: false,
        };
        Self::build(model, &settings, init, |name, _, _, _| {
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
        init: Init<'_>,
        mut fresh: impl FnMut(&str, usize, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let (initial, trainable) = (init.factors, init.trainable);
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
            let (magnitude, w_sq) = match settings.use_dora {
                false => (None, None),
                true => {
                    let given = init.magnitudes.and_then(|g| g.get(&m.name));
                    let (mag, w_sq) = dora_start(model, id, &a, &b, settings.scale(), given)
                        .map_err(|e| match e {
                            AdapterError::Candle(c) => {
                                AdapterError::Settings(format!("DoRA magnitude of {}: {c}", m.name))
                            }
                            other => other,
                        })?;
                    (Some(mag), Some(w_sq))
                }
            };
            let (a, b, b_t, magnitude) = if trainable {
                let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                let ts = (va.as_tensor().clone(), vb.as_tensor().clone());
                vars.extend([va, vb]);
                let magnitude = match magnitude {
                    Some(t) => {
                        let v = Var::from_tensor(&t)?;
                        let t = v.as_tensor().clone();
                        vars.push(v);
                        Some(t)
                    }
                    None => None,
                };
                (ts.0, ts.1, None, magnitude)
            } else {
                let b_t = b.t()?.contiguous()?;
                (a, b, Some(b_t), magnitude)
            };
            by_module[id] = Some(params.len());
            params.push(LoraParams {
                module: m.name.clone(),
                a,
                b,
                b_t,
                magnitude,
                w_sq,
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
            weight: 1.0,
        })
    }

    /// The same adapter with its update scaled by `weight` (PEFT's
    /// `set_scale`: the scale becomes `weight · alpha/r`, DoRA's norm
    /// included), for use beside other adapters.
    pub fn weighted(mut self, weight: f64) -> Self {
        self.weight = weight;
        self
    }

    /// The factor applied to `B·A`: the settings' scale times the weight.
    pub fn scale(&self) -> f64 {
        self.settings.scale() * self.weight
    }

    /// Every trainable variable (A, B and, with DoRA, the magnitude of each
    /// module); empty when frozen.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    /// Number of adapter parameters.
    pub fn parameter_count(&self) -> usize {
        self.params
            .iter()
            .map(|p| {
                p.a.elem_count()
                    + p.b.elem_count()
                    + p.magnitude.as_ref().map_or(0, |m| m.elem_count())
            })
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
        base: &BaseOutput<'_>,
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
        let scale = self.scale();
        let lora = xin.matmul(&p.a.t()?)?.matmul(&p.b.t()?)?; // [n, out]
        let (Some(magnitude), Some(w_sq)) = (&p.magnitude, &p.w_sq) else {
            return Ok(Some((lora * scale)?));
        };
        // DoRA, as PEFT: (m/‖W + s·BA‖ − 1) ⊙ x Wᵀ + m/‖·‖ ⊙ s·x Aᵀ Bᵀ,
        // the norm a constant. Where dropout changed the input, the base
        // product is taken again on it (PEFT does the same).
        let norm = dora_norm(base.linear, &p.a, &p.b, w_sq, scale)?;
        let ratio = (magnitude / norm)?; // [out]
        let dropped = dropout_seed.is_some() && self.settings.dropout > 0.0;
        let product = match dropped {
            true => base.linear.forward(&xin)?,
            false => base.output()?,
        };
        let product = match base.linear.bias() {
            Some(bias) => product.broadcast_sub(bias)?,
            None => product,
        };
        let delta =
            (product.broadcast_mul(&(&ratio - 1.0)?)? + lora.broadcast_mul(&(ratio * scale)?)?)?;
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
        // DoRA's update is not a plain product: no fused kernel for it.
        if p.magnitude.is_some() {
            return None;
        }
        Some(LoraFactors {
            a: p.a.clone(),
            b: p.b.clone(),
            b_t: p.b_t.clone(),
            scale: self.scale() as f32,
        })
    }
}

/// `W + scale · B·A`: the base weight with the adapter folded in; with a
/// DoRA `magnitude`, that times `m / ‖W + scale·B·A‖` per row (PEFT's
/// merge).
pub fn merged_weight(
    base: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    magnitude: Option<&Tensor>,
) -> Result<Tensor> {
    let w = (base + (b.matmul(a)? * scale)?)?;
    Ok(match magnitude {
        None => w,
        Some(m) => {
            let norm = w.sqr()?.sum(D::Minus1)?.sqrt()?;
            w.broadcast_mul(&(m / norm)?.unsqueeze(1)?)?
        }
    })
}

/// How [`LoraAdapter::build`] starts each module.
struct Init<'a> {
    factors: Option<&'a LoraWeights>,
    magnitudes: Option<&'a Magnitudes>,
    trainable: bool,
}

/// DoRA's start for module `id`: the magnitude (`given`, else the row
/// norms of `W + s·BA`, as PEFT initializes it) and the squared row norms
/// of `W`.
fn dora_start(
    model: &dyn CausalLm,
    id: usize,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    given: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let w = model.module_weight(id)?; // [out, in]
    let out = w.dim(0)?;
    let w_sq = w.sqr()?.sum(D::Minus1)?;
    let magnitude = match given {
        Some(m) if m.dims() != [out] => {
            return Err(AdapterError::Settings(format!(
                "lora_magnitude_vector is {:?}, expected [{out}]",
                m.dims()
            )));
        }
        Some(m) => m.to_dtype(DType::F32)?.contiguous()?,
        None => (&w + (b.matmul(a)? * scale)?)?
            .sqr()?
            .sum(D::Minus1)?
            .sqrt()?,
    };
    Ok((magnitude, w_sq))
}

/// The row norms of `W + s·BA`, detached, without a pass over `W`:
/// `‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ`, where `A Wᵀ` is the
/// base layer applied to the rows of `A` (so a quantized base is read in
/// its blocks) and `‖W_i‖²` was taken once at load.
fn dora_norm(
    linear: &dyn Linear,
    a: &Tensor,
    b: &Tensor,
    w_sq: &Tensor,
    scale: f64,
) -> skillet_models::Result<Tensor> {
    let (a, b) = (a.detach(), b.detach());
    let aw = linear.forward(&a)?; // [r, out]
    let aw = match linear.bias() {
        Some(bias) => aw.broadcast_sub(bias)?,
        None => aw,
    };
    let cross = (&b * aw.t()?)?.sum(D::Minus1)?; // [out]
    let aat = a.matmul(&a.t()?)?; // [r, r]
    let ba_sq = (b.matmul(&aat)? * &b)?.sum(D::Minus1)?; // [out]
    let sq = ((w_sq + (cross * (2.0 * scale))?)? + (ba_sq * (scale * scale))?)?;
    Ok(sq.clamp(0f32, f32::MAX)?.sqrt()?)
}
