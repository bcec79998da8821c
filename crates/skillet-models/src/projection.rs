//! A layer's projections as the decoder layers call them: the frozen or
//! quantized product, each row's adapter update, and where given the
//! residual added or the input's RMSNorm applied, in one fused op where
//! training can use one (each keeps less for backward than the composed
//! form: see `skillet_kernels::lora_linear`, `frozen_product_add` and
//! `InputNorm`).

use std::sync::Arc;

use candle_core::Tensor;
use skillet_kernels::{
    FrozenLinear, FrozenWeight, InputNorm, LoraFactors, QkvProjection, QuantMatrix,
    frozen_product_add, lora_linear, normed_frozen_product,
};

use crate::Result;
use crate::layers::{LayerContext, RmsNorm};
use crate::linear::Linear;

/// The input of a layer's projections: rows and the RMSNorm that comes
/// before the projections. The rows are normed inside the projections'
/// ops where all of them can take the norm ([`LayerContext::project_each`]),
/// so that the normed rows are made again in backward instead of kept:
/// the graph then holds the rows before the norm, which the residual
/// stream holds anyway, and no normed copy (a layer's two norms kept two
/// `[tokens, C]` tensors each).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Normed<'a> {
    pub rows: &'a Tensor,
    pub norm: &'a RmsNorm,
}

/// How one projection of a group takes normed rows.
enum Plan {
    /// The fused LoRA op, the norm inside.
    Lora(FrozenLinear, LoraFactors),
    /// A frozen product, the norm inside.
    Frozen(FrozenWeight),
    /// No gradient flows through it: it reads a normed tensor that no
    /// graph keeps.
    Untracked,
    /// Its own path, over a normed tensor that its graph keeps.
    Apart,
}

impl LayerContext {
    /// `lin` over `x`, plus each row's adapter update of `module`.
    pub fn project(&self, lin: &dyn Linear, module: usize, x: &Tensor) -> Result<Tensor> {
        self.project_add(lin, module, x, None)
    }

    /// [`LayerContext::project`], plus `residual` where given (the result
    /// then shaped as it): in one op where the fused LoRA update runs (see
    /// `skillet_kernels::lora_linear_add`) or, in training, the layer is
    /// frozen, unadapted and without bias (`frozen_product_add`), either
    /// of which keeps no copy of the projection's output for backward.
    pub fn project_add(
        &self,
        lin: &dyn Linear,
        module: usize,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.rowwise.is_none()
            && !self.composed
            && let Some(y) = self
                .adapters
                .fused(lin, module, x, residual, self.precision)?
        {
            return Ok(y);
        }
        if let Some(residual) = residual
            && self.rowwise.is_none()
            && !self.composed
            && (x.track_op() || residual.track_op())
            && !self.adapters.adapts(module)
            && lin.bias().is_none()
            && let Some(frozen) = lin.frozen_for(rows_of(lin, x), self.precision)?
        {
            return Ok(frozen_product_add(x, residual, &frozen.weight)?);
        }
        let y = match self.rowwise {
            Some(activations) => lin.forward_rowwise(x, activations)?,
            None => lin.forward_in(x, self.precision)?,
        };
        let y = self.adapters.add_delta(lin, module, x, y)?;
        let Some(residual) = residual else {
            return Ok(y);
        };
        let y = match y.shape() == residual.shape() {
            true => y,
            false => y.reshape(residual.shape())?,
        };
        Ok((residual + y)?)
    }

    /// [`LayerContext::project`] of each of `lins` (modules `modules`) over
    /// the same rows, normed. Where gradients flow through some of them and
    /// every one they flow through can take the norm inside its op, each
    /// such does (see [`Normed`]); otherwise the rows are normed once, as a
    /// tensor, for all. In an incremental call over quantized blocks the products are
    /// taken in one pass ([`QuantMatrix::matmul_each`]): one hand-off to
    /// the threads instead of one per layer, the same numbers.
    pub fn project_each<const N: usize>(
        &self,
        lins: [&dyn Linear; N],
        modules: [usize; N],
        input: Normed,
    ) -> Result<[Tensor; N]> {
        let Normed { rows: h, norm } = input;
        if self.norms_inside(norm) {
            let plans = lins
                .iter()
                .zip(modules)
                .map(|(lin, m)| self.plan(*lin, m, h))
                .collect::<Result<Vec<_>>>()?;
            let inside = |p: &Plan| matches!(p, Plan::Lora(..) | Plan::Frozen(_));
            if plans.iter().any(inside) && !plans.iter().any(|p| matches!(p, Plan::Apart)) {
                let inside = norm.inside()?;
                return self.project_planned(lins, modules, plans, input, &inside);
            }
        }
        // [tokens, C], normed.
        let x = &norm.forward(h, self.composed)?;
        let blocks: Option<Vec<Arc<QuantMatrix>>> =
            lins.iter().map(|l| l.quant_blocks().cloned()).collect();
        let ys: Vec<Tensor> = match (self.rowwise, blocks) {
            (Some(activations), Some(ws)) => {
                let int8 = activations == crate::linear::Activations::Int8;
                let ys = QuantMatrix::matmul_each(&ws, x, int8)?;
                ys.into_iter()
                    .zip(lins.iter().zip(modules))
                    .map(|(y, (lin, m))| self.adapters.add_delta(*lin, m, x, y))
                    .collect::<Result<_>>()?
            }
            _ => lins
                .iter()
                .zip(modules)
                .map(|(lin, m)| self.project(*lin, m, x))
                .collect::<Result<_>>()?,
        };
        Ok(ys.try_into().expect("one result per projection"))
    }

    /// The frozen weights of `lins` (modules `modules`) and `input`'s norm,
    /// where every one of them would be a frozen product with the norm
    /// inside in [`LayerContext::project_each`] (a fused training forward,
    /// none of them adapted or with a bias): for ops that take the whole
    /// group at once.
    pub(crate) fn frozen_normed<const N: usize>(
        &self,
        lins: [&dyn Linear; N],
        modules: [usize; N],
        input: Normed,
    ) -> Result<Option<([FrozenWeight; N], InputNorm)>> {
        let Normed { rows: h, norm } = input;
        // An adapted module is never a frozen product: no plan is made.
        if !self.norms_inside(norm) || modules.iter().any(|&m| self.adapters.adapts(m)) {
            return Ok(None);
        }
        let mut weights = Vec::with_capacity(N);
        for (lin, m) in lins.into_iter().zip(modules) {
            match self.plan(lin, m, h)? {
                Plan::Frozen(w) => weights.push(w),
                _ => return Ok(None),
            }
        }
        let weights = weights.try_into().expect("one weight per projection");
        Ok(Some((weights, norm.inside()?)))
    }

    /// `lins` (modules `modules`) as projections that take `input`'s norm
    /// inside one op, and that norm, where each would do so in
    /// [`LayerContext::project_each`] (a fused LoRA op or a frozen product
    /// without bias) and at least one is adapted: for the attention that
    /// makes its own q, k and v (`skillet_kernels::projected_attention`).
    /// A frozen one is taken as a frozen product even where no gradient
    /// flows to the rows.
    pub(crate) fn adapted_normed<const N: usize>(
        &self,
        lins: [&dyn Linear; N],
        modules: [usize; N],
        input: Normed,
    ) -> Result<Option<([QkvProjection; N], InputNorm)>> {
        let Normed { rows: h, norm } = input;
        if !self.norms_inside(norm) || !modules.iter().any(|&m| self.adapters.adapts(m)) {
            return Ok(None);
        }
        let mut projections = Vec::with_capacity(N);
        for (lin, m) in lins.into_iter().zip(modules) {
            let frozen = |weight| FrozenLinear { weight, bias: None };
            projections.push(match self.plan(lin, m, h)? {
                Plan::Lora(base, factors) => QkvProjection {
                    base,
                    lora: Some(factors),
                },
                Plan::Frozen(w) => QkvProjection {
                    base: frozen(w),
                    lora: None,
                },
                Plan::Untracked if lin.bias().is_none() => {
                    match lin.frozen_for(rows_of(lin, h), self.precision)? {
                        Some(f) => QkvProjection {
                            base: frozen(f.weight),
                            lora: None,
                        },
                        None => return Ok(None),
                    }
                }
                Plan::Untracked | Plan::Apart => return Ok(None),
            });
        }
        let projections = projections.try_into().expect("one per projection");
        Ok(Some((projections, norm.inside()?)))
    }

    /// The projections of [`LayerContext::project_each`] as `plans` say,
    /// none of them [`Plan::Apart`].
    fn project_planned<const N: usize>(
        &self,
        lins: [&dyn Linear; N],
        modules: [usize; N],
        plans: Vec<Plan>,
        input: Normed,
        inside: &InputNorm,
    ) -> Result<[Tensor; N]> {
        let h = input.rows;
        // Made for the untracked projections, if any: no graph keeps it.
        let mut normed = None;
        let mut ys = Vec::with_capacity(N);
        for ((plan, lin), m) in plans.into_iter().zip(lins).zip(modules) {
            ys.push(match plan {
                Plan::Lora(base, factors) => lora_linear(h, &base, &factors, Some(inside))?,
                Plan::Frozen(w) => normed_frozen_product(h, inside, &w)?,
                Plan::Untracked | Plan::Apart => {
                    if normed.is_none() {
                        normed = Some(input.norm.forward(h, self.composed)?);
                    }
                    self.project(lin, m, normed.as_ref().expect("made above"))?
                }
            });
        }
        Ok(ys.try_into().expect("one result per projection"))
    }

    /// Whether the projections' ops may apply `norm`: in a fused training
    /// forward (neither composed nor incremental) with the norm's weight
    /// frozen.
    fn norms_inside(&self, norm: &RmsNorm) -> bool {
        !(self.composed || self.rowwise.is_some() || norm.weight.track_op())
    }

    /// How `lin` (module `module`) takes the rows `h` normed inside its
    /// op: the fused LoRA op for an adapted module where it runs, a frozen
    /// product for a frozen layer without bias.
    fn plan(&self, lin: &dyn Linear, module: usize, h: &Tensor) -> Result<Plan> {
        if self.adapters.adapts(module) {
            let parts = self.adapters.fused_parts(lin, module, h, self.precision)?;
            // Where the fused op does not run (nothing tracks gradients,
            // dropout, DoRA, per-row adapters), the update is composed over
            // a normed tensor.
            return Ok(match parts {
                Some((base, factors)) => Plan::Lora(base, factors),
                None => Plan::Apart,
            });
        }
        if !h.track_op() {
            return Ok(Plan::Untracked);
        }
        if lin.bias().is_some() {
            return Ok(Plan::Apart);
        }
        Ok(match lin.frozen_for(rows_of(lin, h), self.precision)? {
            Some(frozen) => Plan::Frozen(frozen.weight),
            None => Plan::Apart,
        })
    }
}

/// The rows of `x` as `lin` takes them.
fn rows_of(lin: &dyn Linear, x: &Tensor) -> usize {
    x.elem_count() / lin.in_features().max(1)
}
