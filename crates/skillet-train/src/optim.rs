//! AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) with exactly
//! PyTorch's `torch.optim.AdamW` arithmetic, updated in place in the
//! parameters' memory by one fused pass (`skillet_kernels::adamw_step`), and gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// AdamW hyper-parameters (PyTorch's defaults except the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state: step count and both moments of every parameter.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    vars: Vec<Var>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    /// A fresh optimizer over `vars`.
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Self {
        let m = vars.iter().map(|v| vec![0f32; v.elem_count()]).collect();
        let v = vars.iter().map(|v| vec![0f32; v.elem_count()]).collect();
        Self {
            config,
            step: 0,
            vars,
            m,
            v,
        }
    }

    /// The parameters being optimized.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// First and second moments (for checkpoints).
    pub fn moments(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.m, &self.v)
    }

    /// Restores moments and step from a checkpoint.
    pub fn restore(&mut self, step: u64, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) -> Result<()> {
        let sizes_ok = m.len() == self.vars.len()
            && v.len() == self.vars.len()
            && self
                .vars
                .iter()
                .zip(m.iter().zip(&v))
                .all(|(p, (a, b))| a.len() == p.elem_count() && b.len() == p.elem_count());
        if !sizes_ok {
            return Err(TrainError::Invalid(
                "optimizer state does not match the trainable parameters".into(),
            ));
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One update with learning rate `lr` from `grads` (one per parameter,
    /// in order; already clipped).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(TrainError::Invalid(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let step_size = (lr / bias1) as f32;
        let bias2_sqrt = bias2.sqrt() as f32;
        let h = skillet_kernels::AdamWStep {
            step_size,
            bias2_sqrt,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
        };
        for (i, var) in self.vars.iter().enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            skillet_kernels::adamw_step(var.as_tensor(), &grads[i], m, v, h)?;
        }
        Ok(())
    }
}

/// The gradient of every parameter, in order. A parameter without one is
/// an error: it would silently stop training (as candle's fused ops without
/// a backward would cause).
pub fn collect_grads(store: &GradStore, vars: &[Var]) -> Result<Vec<Tensor>> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| {
            store.get(v.as_tensor()).cloned().ok_or_else(|| {
                TrainError::NonFinite(format!("trainable parameter {i} received no gradient"))
            })
        })
        .collect()
}

/// Global L2 norm of `grads`.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's
/// rule: factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping; a non-finite norm is an error.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if !norm.is_finite() {
        return Err(TrainError::NonFinite(format!("gradient norm is {norm}")));
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
