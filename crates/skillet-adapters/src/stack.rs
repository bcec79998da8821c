//! Several adapters active at once, as PEFT's multiple active adapters:
//! each module's update is the sum of every adapter's own update, each on
//! the base layer's output (so DoRA's rescaling sees the base alone; PEFT
//! feeds a DoRA adapter the output so far, the same where the DoRA adapter
//! comes first). Weights go into each adapter's scale
//! ([`crate::LoraAdapter::weighted`]).
//!
//! Where every adapter of a module is a plain product, the module's update
//! is also given as one product of concatenated factors (`A` rows stacked,
//! each scaled by its adapter's scale; `B` columns side by side), so the
//! fused kernels that serve a different adapter per row take the stack
//! like any adapter.

use std::sync::Arc;

use candle_core::Tensor;
use skillet_models::{Adapter, BaseOutput, LoraFactors};

use crate::{AdapterError, Result};

/// Adapters summed.
#[derive(Debug)]
pub struct Stacked {
    parts: Vec<Arc<dyn Adapter>>,
    /// Per model module, the concatenated plain factors (scale 1), where
    /// every adapter of the module has plain factors.
    factors: Vec<Option<LoraFactors>>,
}

impl Stacked {
    /// The sum of `parts` over a model with `modules` linear layers.
    pub fn new(parts: Vec<Arc<dyn Adapter>>, modules: usize) -> Result<Self> {
        if parts.is_empty() {
            return Err(AdapterError::Settings("no adapters to stack".into()));
        }
        let factors = (0..modules)
            .map(|m| concatenated(&parts, m))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { parts, factors })
    }
}

/// The factors of every part that adapts `module`, side by side, each
/// part's scale folded into its rows of `A`; `None` where some part's
/// update there is not a plain product (DoRA) or none adapts it.
fn concatenated(parts: &[Arc<dyn Adapter>], module: usize) -> Result<Option<LoraFactors>> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for p in parts.iter().filter(|p| p.adapts(module)) {
        let Some(f) = p.factors(module) else {
            return Ok(None);
        };
        a.push((f.a * f.scale as f64)?);
        b.push(f.b);
    }
    if a.is_empty() {
        return Ok(None);
    }
    let a = Tensor::cat(&a, 0)?.contiguous()?;
    let b = Tensor::cat(&b, 1)?.contiguous()?;
    let b_t = b.t()?.contiguous()?;
    Ok(Some(LoraFactors {
        a,
        b,
        b_t: Some(b_t),
        scale: 1.0,
    }))
}

impl Adapter for Stacked {
    fn delta(
        &self,
        module: usize,
        x: &Tensor,
        base: &BaseOutput<'_>,
        dropout_seed: Option<u64>,
    ) -> skillet_models::Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for p in &self.parts {
            if let Some(d) = p.delta(module, x, base, dropout_seed)? {
                total = Some(match total {
                    Some(t) => (t + d)?,
                    None => d,
                });
            }
        }
        Ok(total)
    }

    fn adapts(&self, module: usize) -> bool {
        self.parts.iter().any(|p| p.adapts(module))
    }

    fn factors(&self, module: usize) -> Option<LoraFactors> {
        self.factors.get(module).cloned().flatten()
    }

    fn dropout(&self) -> f32 {
        self.parts.iter().map(|p| p.dropout()).fold(0.0, f32::max)
    }
}
