//! A frozen `[out, in]` weight as the products of training see it
//! (forward `x Wᵀ`, input gradient `dy W`, no weight gradient), in f32 or
//! in bf16 with f32 accumulation (PyTorch autocast's semantics). Nothing
//! but the weight's own storage is kept between calls: bf16 products make
//! the tile kernel's 16-column blocks of the right operand on the fly,
//! once per product, rounding a dense weight or dequantizing Q4_1 / Q8_0
//! blocks; f32 products on blocks dequantize a slab at a time. So the weight
//! costs its own bytes alone, as in PyTorch, where autocast casts a
//! frozen weight for each use and keeps no copy.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};

use crate::bf16::{
    Bf16Blocks, DensePanels, Panels, bf16_accelerated, matmul_panels_new, rounded_product_into,
};
use crate::gemm::{Out, View, matmul};
use crate::quantized::QuantMatrix;
use crate::rms_norm::InputNorm;
use crate::storage::{slice, tensor, with_f32};

/// A frozen weight and the precision of its products.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense f32 weight through the f32 GEMM.
    Dense(Tensor),
    /// A dense f32 weight in bf16 products.
    DenseBf16(Tensor),
    /// A weight held in bf16, always in bf16 products.
    Bf16(Arc<Bf16Blocks>),
    /// Quantized blocks in bf16 products.
    QuantBf16(Arc<QuantMatrix>),
    /// Quantized blocks in f32 products, dequantized a slab at a time.
    QuantF32(Arc<QuantMatrix>),
}

impl FrozenWeight {
    /// `(out, in)`.
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            FrozenWeight::Dense(w) | FrozenWeight::DenseBf16(w) => w.dims2()?,
            FrozenWeight::Bf16(w) => (w.rows(), w.cols()),
            FrozenWeight::QuantBf16(q) | FrozenWeight::QuantF32(q) => (q.rows(), q.cols()),
        })
    }

    /// `x Wᵀ` for row-major rows `x` of width `in`.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.product(x, true)
    }

    /// `dy W` for row-major rows `dy` of width `out`.
    pub fn backward(&self, dy: &[f32]) -> Result<Vec<f32>> {
        self.product(dy, false)
    }

    /// Whether the weight's products run on the tiles in bf16.
    pub(crate) fn on_tiles_here(&self) -> bool {
        bf16_accelerated()
            && matches!(
                self,
                FrozenWeight::DenseBf16(_) | FrozenWeight::Bf16(_) | FrozenWeight::QuantBf16(_)
            )
    }

    /// `f` of the weight's column blocks (`Wᵀ` where `forward`, else `W`)
    /// as the tile kernel reads them, where its products run on the tiles
    /// in bf16 (`None` for f32 products, or where the CPU has no native
    /// bf16): for operands rounded once
    /// ([`RoundedRows`](crate::bf16::RoundedRows)) or kept rounded.
    pub(crate) fn on_tiles<R>(
        &self,
        forward: bool,
        f: impl FnOnce(&dyn Panels) -> R,
    ) -> Result<Option<R>> {
        if !self.on_tiles_here() {
            return Ok(None);
        }
        let (out, inp) = self.dims()?;
        Ok(match self {
            FrozenWeight::DenseBf16(w) => Some(with_f32([w], "frozen weight", |[w]| {
                Ok(f(&DensePanels::new(w, out, inp, forward)))
            })?),
            FrozenWeight::Bf16(w) => Some(f(&w.panels(forward))),
            FrozenWeight::QuantBf16(q) => Some(f(&q.panels_bf16(forward))),
            FrozenWeight::Dense(_) | FrozenWeight::QuantF32(_) => None,
        })
    }

    /// `a Wᵀ` (`forward`) or `a W`.
    fn product(&self, a: &[f32], forward: bool) -> Result<Vec<f32>> {
        let (out, inp) = self.dims()?;
        let (k, n) = if forward { (inp, out) } else { (out, inp) };
        if bf16_accelerated() {
            // On the tiles the results are written once, not zeroed first.
            match self {
                FrozenWeight::DenseBf16(w) => {
                    return with_f32([w], "frozen weight", |[w]| {
                        let panels = DensePanels::new(w, out, inp, forward);
                        Ok(matmul_panels_new(a, a.len() / k.max(1), &panels))
                    });
                }
                FrozenWeight::Bf16(w) => return Ok(w.product_new(a, forward)),
                FrozenWeight::QuantBf16(q) => return Ok(q.product_bf16_new(a, forward)),
                FrozenWeight::Dense(_) | FrozenWeight::QuantF32(_) => {}
            }
        }
        let mut y = vec![0f32; a.len() / k.max(1) * n];
        self.product_into(a, forward, &mut y)?;
        Ok(y)
    }

    /// `a Wᵀ` (`forward`) or `a W`, written over `y`.
    pub(crate) fn product_into(&self, a: &[f32], forward: bool, y: &mut [f32]) -> Result<()> {
        let (out, inp) = self.dims()?;
        let (k, n) = if forward { (inp, out) } else { (out, inp) };
        let rows = a.len() / k.max(1);
        if y.len() != rows * n {
            bail!("frozen product: {} outputs for {rows} rows of {n}", y.len());
        }
        match self {
            FrozenWeight::Dense(w) => with_f32([w], "frozen weight", |[w]| {
                let wv = if forward {
                    View::rows(w, inp).t()
                } else {
                    View::rows(w, inp)
                };
                matmul(rows, n, k, View::rows(a, k), wv, Out::new(y, n), true);
                Ok(())
            })?,
            FrozenWeight::DenseBf16(w) => with_f32([w], "frozen weight", |[w]| {
                rounded_product_into(a, rows, w, (out, inp), forward, y);
                Ok(())
            })?,
            FrozenWeight::Bf16(w) => w.product_into(a, forward, y),
            FrozenWeight::QuantBf16(q) => q.product_bf16_into(a, forward, y),
            FrozenWeight::QuantF32(q) => q.product_f32_into(a, forward, y),
        }
        Ok(())
    }
}

struct FrozenProduct {
    weight: FrozenWeight,
    /// The norm of the input, applied inside the op.
    norm: Option<InputNorm>,
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let (out, inp) = self.weight.dims()?;
        let dims = layout.dims();
        if dims.last() != Some(&inp) {
            bail!("frozen product: input {dims:?} does not end in {inp}");
        }
        if let Some(n) = self.norm.as_ref().filter(|n| n.width() != inp) {
            bail!(
                "frozen product: a norm of width {} for inputs of {inp}",
                n.width()
            );
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out;
        let y = match &self.norm {
            Some(n) => self.weight.forward(&n.forward(x))?,
            None => self.weight.forward(x)?,
        };
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = match &self.norm {
            Some(n) => with_f32([x, dy], self.name(), |[x, dy]| {
                Ok(n.backward(x, &self.weight.backward(dy)?))
            })?,
            None => with_f32([dy], self.name(), |[dy]| self.weight.backward(dy))?,
        };
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// `residual + x Wᵀ`, shaped as the residual: as a separate add, the
/// product would be kept alive until backward by the add, a full-width
/// tensor that nothing needs (an unadapted output projection).
struct FrozenProductAdd(FrozenWeight);

impl CustomOp2 for FrozenProductAdd {
    fn name(&self) -> &'static str {
        "frozen-product-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let residual = slice(rs, rl, self.name())?;
        let (out, inp) = self.0.dims()?;
        let rows = x.len() / inp.max(1);
        if xl.dims().last() != Some(&inp)
            || rl.dims().last() != Some(&out)
            || residual.len() != rows * out
        {
            bail!(
                "frozen product add: input {:?} and residual {:?} for W [{out}, {inp}]",
                xl.dims(),
                rl.dims()
            );
        }
        let mut y = self.0.forward(x)?;
        y.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
        Ok((CpuStorage::F32(y), rl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x
            .track_op()
            .then(|| with_f32([dy], self.name(), |[dy]| self.0.backward(dy)))
            .transpose()?
            .map(|dx| tensor(dx, x.shape()))
            .transpose()?;
        let dres = residual.track_op().then(|| dy.clone());
        Ok((dx, dres))
    }
}

/// `x Wᵀ` for `x` of shape `[..., in]`; backward gives `x` its gradient
/// `dy W` in the same precision, the weight none.
pub fn frozen_product(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenProduct {
        weight: w.clone(),
        norm: None,
    })
}

/// [`frozen_product`] of `x` normed by `norm` inside the op: the normed
/// rows are made again in backward rather than kept, and `x` gets the
/// gradient of the rows before the norm.
pub fn normed_frozen_product(x: &Tensor, norm: &InputNorm, w: &FrozenWeight) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenProduct {
        weight: w.clone(),
        norm: Some(norm.clone()),
    })
}

/// `residual + x Wᵀ` in one op that keeps no copy of the product for
/// backward, shaped as `residual` (which holds as many rows of `out` as
/// `x` holds of `in`); `x` gets `dy W`, `residual` gets `dy`.
pub fn frozen_product_add(x: &Tensor, residual: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&residual.contiguous()?, FrozenProductAdd(w.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same_product, grads, max_abs_diff, output_and_input_grad, random};
    use crate::{Bf16Weight, frozen_matmul, frozen_matmul_bf16};

    #[test]
    fn with_a_residual_equals_the_product_plus_the_residual() {
        let w = random(&[12, 10], 51, 1.0);
        let weight = FrozenWeight::Dense(w.clone());
        // `x` as rows, the residual (and so the output) `[2, 3, 12]`.
        let inputs = [random(&[6, 10], 52, 1.0), random(&[2, 3, 12], 53, 1.0)];
        crate::testing::check_op(
            &inputs,
            &|t| frozen_product_add(&t[0], &t[1], &weight),
            &|t| t[1].clone() + frozen_matmul(&t[0], &w)?.reshape((2, 3, 12))?,
            1e-4,
        );
        let bad = random(&[2, 3, 11], 54, 1.0);
        let err = frozen_product_add(&inputs[0], &bad, &weight);
        assert!(err.is_err(), "a residual of the wrong width is refused");
        // Only the residual tracks: it gets `dy`, the input nothing.
        let residual = candle_core::Var::from_tensor(&inputs[1]).unwrap();
        let y = frozen_product_add(&inputs[0], residual.as_tensor(), &weight).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&inputs[0]).is_none());
        let dres = g.get(residual.as_tensor()).unwrap();
        assert_eq!(
            dres.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 72]
        );
    }

    #[test]
    fn the_input_norm_inside_equals_the_norm_then_the_product() {
        let w = random(&[9, 16], 41, 1.0);
        let gain = (random(&[16], 42, 0.5) + 1.0).unwrap();
        let norm = crate::InputNorm::new(gain.to_vec1().unwrap(), 1e-6);
        let x = [random(&[3, 5, 16], 43, 2.0)];
        for weight in [
            FrozenWeight::Dense(w.clone()),
            FrozenWeight::DenseBf16(w.clone()),
        ] {
            let plain = |t: &[Tensor]| {
                let normed = crate::rms_norm(&t[0], &gain, 1e-6)?;
                frozen_product(&normed, &weight)
            };
            let inside = |t: &[Tensor]| normed_frozen_product(&t[0], &norm, &weight);
            match weight {
                FrozenWeight::Dense(_) => crate::testing::check_op(&x, &inside, &plain, 1e-4),
                // The same rounded operands both ways (no finite
                // differences: the rounding makes them coarse).
                _ => {
                    let (a, b) = (inside(&x).unwrap(), plain(&x).unwrap());
                    assert!(max_abs_diff(&a, &b) < 1e-5, "bf16 forward");
                    let (ga, gb) = (grads(&x, &inside), grads(&x, &plain));
                    assert!(max_abs_diff(&ga[0], &gb[0]) < 1e-4, "bf16 gradient");
                }
            }
        }
    }

    #[test]
    fn products_equal_the_packed_and_the_f32_ones() {
        // Shapes off the tile sizes: odd widths, outputs off 16.
        for (t, out, inp) in [(37, 40, 70), (300, 33, 64), (5, 16, 17)] {
            let w = random(&[out, inp], 1, 1.0);
            let x = random(&[t, inp], 2, 1.0);
            let dy = random(&[t, out], 3, 1.0);
            let packed = Arc::new(Bf16Weight::new(&w).unwrap());
            let what = format!("{t}×{inp}→{out}");
            // The same rounded operands and kernel: the same values.
            assert_same_product(
                |x| frozen_product(x, &FrozenWeight::DenseBf16(w.clone())),
                |x| frozen_matmul_bf16(x, &packed),
                &x,
                &dy,
                1e-5,
                &what,
            );
            let (y, gx) = output_and_input_grad(
                |x| frozen_product(x, &FrozenWeight::Dense(w.clone())),
                &x,
                &dy,
            );
            let (want_y, want_gx) = output_and_input_grad(|x| frozen_matmul(x, &w), &x, &dy);
            assert!(max_abs_diff(&y, &want_y) < 1e-5 && max_abs_diff(&gx, &want_gx) < 1e-5);
        }
    }
}
