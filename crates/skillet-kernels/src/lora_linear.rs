//! A frozen projection plus its LoRA update as one op, for training:
//! `y = x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ` (Hu et al. 2021; PEFT's `lora.Linear`
//! without dropout). Composed from candle ops, the update keeps three
//! full-width tensors per module alive until backward (the base output,
//! the update and its scaled copy, each held by the next op) and adds
//! four nodes whose gradients candle sums one by one. Here the op keeps
//! its inputs and the `r`-wide `x Aᵀ` (a product as long as the base's,
//! at a fraction of its rate, not made twice), and writes every gradient
//! in one pass:
//! `g = dy B`, `dB = s · dyᵀ (x Aᵀ)`, `dA = s · gᵀ x`,
//! `dx = dy W + s · g A`.
//!
//! [`lora_linear_add`] adds a residual in the same op (an attention's
//! output projection): as a separate add, the projection's output would
//! be kept alive until backward by the add, one full-width tensor per
//! layer that nothing needs.
//!
//! Given an [`InputNorm`], the op takes the rows before their RMSNorm and
//! norms them itself, again in backward, where `dA` needs them: the
//! normed rows are not kept between the passes.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use crate::bf16::transposed;
use crate::frozen::FrozenWeight;
use crate::lora_rows::LoraFactors;
use crate::rms_norm::InputNorm;
use crate::storage::{slice, tensor, with_f32, with_f32_all};
use crate::thin;

/// The frozen part of a LoRA-adapted layer.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    /// The weight.
    pub weight: FrozenWeight,
    /// An optional `[out]` bias, frozen too.
    pub bias: Option<Tensor>,
}

struct LoraLinear {
    base: FrozenLinear,
    scale: f32,
    /// `x Aᵀ` as forward made it, for backward.
    down: Arc<OnceLock<Vec<f32>>>,
    /// The op's second and third inputs are a residual (`[..., out]`) and
    /// `A` and `B` flattened one after the other, not `A` and `B`: the
    /// rank of `A`.
    residual: Option<usize>,
    /// The norm of the input, applied inside the op.
    norm: Option<InputNorm>,
}

impl LoraLinear {
    /// `x Aᵀ` (`[rows, r]`).
    fn down(x: &[f32], a: &[f32], inp: usize, r: usize) -> Vec<f32> {
        let rows = x.len() / inp;
        let mut u = vec![0f32; rows * r];
        thin::times_t(x, [rows, inp, r], a, &mut u);
        u
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let second = slice(as_, al, self.name())?;
        let third = slice(bs, bl, self.name())?;
        let (out, inp) = self.base.weight.dims()?;
        let dims = xl.dims();
        let (a, b, r, residual) = match self.residual {
            Some(r) => {
                let rows = second.len() / out.max(1);
                let shaped =
                    al.dims().last() == Some(&out) && rows * inp == xl.shape().elem_count();
                if third.len() != r * (inp + out) || !shaped {
                    bail!(
                        "lora linear: x {dims:?}, residual {:?}, {} factor values for W [{out}, {inp}] at rank {r}",
                        al.dims(),
                        third.len()
                    );
                }
                let (a, b) = third.split_at(r * inp);
                (a, b, r, Some(second))
            }
            None => {
                let (r, a_in) = al.shape().dims2()?;
                let (b_out, b_r) = bl.shape().dims2()?;
                if a_in != inp || b_out != out || b_r != r {
                    bail!(
                        "lora linear: x {dims:?}, A [{r}, {a_in}], B [{b_out}, {b_r}] for W [{out}, {inp}]"
                    );
                }
                (second, third, r, None)
            }
        };
        if dims.last() != Some(&inp) {
            bail!("lora linear: x {dims:?} for W [{out}, {inp}]");
        }
        if let Some(n) = self.norm.as_ref().filter(|n| n.width() != inp) {
            bail!(
                "lora linear: a norm of width {} for inputs of {inp}",
                n.width()
            );
        }
        let normed = self.norm.as_ref().map(|n| n.forward(x));
        let x = normed.as_deref().unwrap_or(x);
        let rows = x.len() / inp;
        let mut y = self.base.weight.forward(x)?;
        let u = self.down.get_or_init(|| Self::down(x, a, inp, r));
        thin::add_times(
            &mut y,
            [rows, r, out],
            u,
            &transposed(b, out, r),
            self.scale,
        );
        if let Some(bias) = &self.base.bias {
            with_f32([bias], self.name(), |[bias]| {
                if bias.len() != out {
                    bail!("lora linear: bias of {} for {out} outputs", bias.len());
                }
                for row in y.chunks_exact_mut(out) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                }
                Ok(())
            })?;
        }
        // With a residual, the output takes its shape.
        let shape = match residual {
            Some(residual) => {
                y.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
                al.shape().clone()
            }
            None => Shape::from(out_dims(dims, out)),
        };
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        third: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = self.base.weight.dims()?;
        let (inputs, r) = match self.residual {
            Some(r) => (vec![x, third, dy], r),
            None => (vec![x, second, third, dy], second.dim(0)?),
        };
        let s = self.scale;
        let want_dx = x.track_op();
        let (dx, da, db) = with_f32_all(&inputs, self.name(), |t| {
            let (x, (a, b), dy) = match self.residual {
                Some(_) => (t[0], t[1].split_at(r * inp), t[2]),
                None => (t[0], (t[1], t[2]), t[3]),
            };
            // The rows as the products saw them: normed again where the
            // op norms its input.
            let h = x;
            let normed = self.norm.as_ref().map(|n| n.forward(h));
            let x = normed.as_deref().unwrap_or(h);
            let rows = x.len() / inp;
            let u = self.down.get_or_init(|| Self::down(x, a, inp, r));
            // dx = dy W + s · g A.
            let mut dx = match want_dx {
                true => Some(self.base.weight.backward(dy)?),
                false => None,
            };
            let (da, db) =
                update_grads(x, u, dy, (a, b), [rows, inp, out, r], s, dx.as_deref_mut());
            let dx = dx.map(|dx| match &self.norm {
                Some(n) => n.backward(h, &dx),
                None => dx,
            });
            Ok((dx, da, db))
        })?;
        let dx = dx.map(|d| tensor(d, x.shape())).transpose()?;
        Ok(match self.residual {
            // The residual's gradient is `dy` (where it takes one); the
            // factors' one after the other, as they came.
            Some(_) => {
                let mut dab = da;
                dab.extend_from_slice(&db);
                let dres = second.track_op().then(|| dy.clone());
                (dx, dres, Some(tensor(dab, third.shape())?))
            }
            None => (
                dx,
                Some(tensor(da, second.shape())?),
                Some(tensor(db, third.shape())?),
            ),
        })
    }
}

/// The gradients `(dA, dB)` of a LoRA update `s · (x Aᵀ) Bᵀ` for rows `x`
/// (`[rows, in]`, as the products saw them), their down product
/// `u = x Aᵀ` and the output's gradient `dy` (`[rows, out]`):
/// `g = dy B`, `dA = s · gᵀ x`, `dB = s · dyᵀ u`; and `s · g A` added to
/// `dx` where given.
pub(crate) fn update_grads(
    x: &[f32],
    u: &[f32],
    dy: &[f32],
    (a, b): (&[f32], &[f32]),
    [rows, inp, out, r]: [usize; 4],
    s: f32,
    dx: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    // g = dy B: [rows, r].
    let mut g = vec![0f32; rows * r];
    thin::times_t(dy, [rows, out, r], &transposed(b, out, r), &mut g);
    // dB = s · dyᵀ u: [out, r], made as its transpose.
    let mut dbt = vec![0f32; r * out];
    thin::t_times(u, [rows, r, out], dy, s, &mut dbt);
    // dA = s · gᵀ x: [r, in].
    let mut da = vec![0f32; r * inp];
    thin::t_times(&g, [rows, r, inp], x, s, &mut da);
    if let Some(dx) = dx {
        thin::add_times(dx, [rows, r, inp], &g, a, s);
    }
    (da, transposed(&dbt, r, out))
}

/// `dims` with the last one made `out`.
fn out_dims(dims: &[usize], out: usize) -> Vec<usize> {
    let mut d = dims.to_vec();
    if let Some(last) = d.last_mut() {
        *last = out;
    }
    d
}

/// `x Wᵀ (+ bias) + s · (x Aᵀ) Bᵀ` for `x` of shape `[..., in]`, with
/// `A` (`[r, in]`) and `B` (`[out, r]`) and `s` from `lora`; backward
/// gives `x`, `A` and `B` their gradients (the frozen weight none). With
/// `norm`, `x` is first normed by it inside the op (its gradient is the
/// gradient of the rows before the norm).
pub fn lora_linear(
    x: &Tensor,
    base: &FrozenLinear,
    lora: &LoraFactors,
    norm: Option<&InputNorm>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &lora.a.contiguous()?,
        &lora.b.contiguous()?,
        LoraLinear {
            base: base.clone(),
            scale: lora.scale,
            down: Arc::default(),
            residual: None,
            norm: norm.cloned(),
        },
    )
}

/// `residual + lora_linear(x, base, lora)` in one op that keeps no copy
/// of the projection's output for backward, shaped as `residual` (which
/// holds as many rows of `out` as `x` holds of `in`); `residual` gets
/// `dy` as its gradient; `norm` as in [`lora_linear`].
pub fn lora_linear_add(
    x: &Tensor,
    residual: &Tensor,
    base: &FrozenLinear,
    lora: &LoraFactors,
    norm: Option<&InputNorm>,
) -> Result<Tensor> {
    let (out, inp) = base.weight.dims()?;
    let (r, a_in) = lora.a.dims2()?;
    if a_in != inp || lora.b.dims2()? != (out, r) {
        bail!(
            "lora linear: A {:?}, B {:?} for W [{out}, {inp}]",
            lora.a.dims(),
            lora.b.dims()
        );
    }
    // `A` and `B` as one input (the op has three): their gradients come
    // back through the concatenation to each.
    let factors = Tensor::cat(&[lora.a.flatten_all()?, lora.b.flatten_all()?], 0)?;
    x.contiguous()?.apply_op3(
        &residual.contiguous()?,
        &factors,
        LoraLinear {
            base: base.clone(),
            scale: lora.scale,
            down: Arc::default(),
            residual: Some(r),
            norm: norm.cloned(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_op, grads, random};
    use crate::{frozen_matmul, frozen_matmul_bf16};

    fn factors(a: &Tensor, b: &Tensor) -> LoraFactors {
        LoraFactors {
            a: a.clone(),
            b: b.clone(),
            b_t: None,
            scale: 1.5,
        }
    }

    /// PEFT's composition: base, plus the scaled update.
    fn composed(base: &Tensor, t: &[Tensor]) -> Result<Tensor> {
        let delta = t[0]
            .broadcast_matmul(&t[1].t()?)?
            .broadcast_matmul(&t[2].t()?)?;
        base + (delta * 1.5)?
    }

    #[test]
    fn equals_the_composed_update_over_a_dense_weight() {
        let w = random(&[12, 10], 1, 1.0);
        let bias = random(&[12], 5, 1.0);
        let inputs = [
            random(&[2, 3, 10], 2, 1.0),
            random(&[4, 10], 3, 0.5),
            random(&[12, 4], 4, 0.5),
        ];
        for bias in [None, Some(bias)] {
            let base = FrozenLinear {
                weight: FrozenWeight::Dense(w.clone()),
                bias: bias.clone(),
            };
            check_op(
                &inputs,
                &|t| lora_linear(&t[0], &base, &factors(&t[1], &t[2]), None),
                &|t| {
                    let y = frozen_matmul(&t[0], &w)?;
                    let y = match &bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    };
                    composed(&y, t)
                },
                1e-4,
            );
        }
    }

    #[test]
    fn with_a_residual_equals_the_composed_update_plus_the_residual() {
        let w = random(&[12, 10], 21, 1.0);
        let base = FrozenLinear {
            weight: FrozenWeight::Dense(w.clone()),
            bias: Some(random(&[12], 22, 1.0)),
        };
        // `x` as rows, the residual (and so the output) `[2, 3, 12]`.
        let inputs = [
            random(&[6, 10], 23, 1.0),
            random(&[4, 10], 24, 0.5),
            random(&[12, 4], 25, 0.5),
            random(&[2, 3, 12], 26, 1.0),
        ];
        check_op(
            &inputs,
            &|t| lora_linear_add(&t[0], &t[3], &base, &factors(&t[1], &t[2]), None),
            &|t| {
                let y = frozen_matmul(&t[0], &w)?.broadcast_add(base.bias.as_ref().unwrap())?;
                t[3].clone() + composed(&y, t)?.reshape((2, 3, 12))?
            },
            1e-4,
        );
        let bad = random(&[2, 3, 11], 27, 1.0);
        let err = lora_linear_add(
            &inputs[0],
            &bad,
            &base,
            &factors(&inputs[1], &inputs[2]),
            None,
        );
        assert!(err.is_err(), "a residual of the wrong width is refused");
        let b_t = inputs[2].t().unwrap().contiguous().unwrap();
        let err = lora_linear_add(
            &inputs[0],
            &inputs[3],
            &base,
            &factors(&inputs[1], &b_t),
            None,
        );
        assert!(err.is_err(), "B laid out as [r, out] is refused");
    }

    #[test]
    fn with_the_input_norm_inside_equals_the_norm_then_the_update() {
        let w = random(&[12, 10], 31, 1.0);
        let base = FrozenLinear {
            weight: FrozenWeight::Dense(w.clone()),
            bias: Some(random(&[12], 32, 1.0)),
        };
        let gain = (random(&[10], 33, 0.5) + 1.0).unwrap();
        let norm = InputNorm::new(gain.to_vec1().unwrap(), 1e-5);
        let normed = |x: &Tensor| crate::rms_norm_composed(x, &gain, 1e-5);
        let bias = base.bias.clone().unwrap();
        let inputs = [
            random(&[2, 3, 10], 34, 2.0),
            random(&[4, 10], 35, 0.5),
            random(&[12, 4], 36, 0.5),
            random(&[2, 3, 12], 37, 1.0),
        ];
        check_op(
            &inputs[..3],
            &|t| lora_linear(&t[0], &base, &factors(&t[1], &t[2]), Some(&norm)),
            &|t| {
                let x = normed(&t[0])?;
                let y = frozen_matmul(&x, &w)?.broadcast_add(&bias)?;
                composed(&y, &[x, t[1].clone(), t[2].clone()])
            },
            1e-4,
        );
        check_op(
            &inputs,
            &|t| lora_linear_add(&t[0], &t[3], &base, &factors(&t[1], &t[2]), Some(&norm)),
            &|t| {
                let x = normed(&t[0])?;
                let y = frozen_matmul(&x, &w)?.broadcast_add(&bias)?;
                t[3].clone() + composed(&y, &[x, t[1].clone(), t[2].clone()])?
            },
            1e-4,
        );
        let narrow = InputNorm::new(vec![1.0; 9], 1e-5);
        let err = lora_linear(
            &inputs[0],
            &base,
            &factors(&inputs[1], &inputs[2]),
            Some(&narrow),
        );
        assert!(err.is_err(), "a norm of the wrong width is refused");
        // An input that tracks nothing (a first layer over a frozen
        // embedding): the factors' gradients still see the normed rows.
        let a = candle_core::Var::from_tensor(&inputs[1]).unwrap();
        let b = candle_core::Var::from_tensor(&inputs[2]).unwrap();
        let loss = |y: Tensor| crate::testing::weighted_sum(&y, 5).unwrap();
        let fused = lora_linear(
            &inputs[0],
            &base,
            &factors(a.as_tensor(), b.as_tensor()),
            Some(&norm),
        )
        .unwrap();
        let g = loss(fused).backward().unwrap();
        assert!(g.get(&inputs[0]).is_none());
        let x = normed(&inputs[0]).unwrap();
        let y = frozen_matmul(&x, &w).unwrap().broadcast_add(&bias).unwrap();
        let reference = composed(&y, &[x, a.as_tensor().clone(), b.as_tensor().clone()]).unwrap();
        let want = loss(reference).backward().unwrap();
        for v in [&a, &b] {
            let (got, want) = (
                g.get(v.as_tensor()).unwrap(),
                want.get(v.as_tensor()).unwrap(),
            );
            assert_close(got, want, 1e-4, "a factor's gradient");
        }
    }

    #[test]
    fn equals_the_composed_update_over_bf16_weights() {
        let w = random(&[40, 64], 6, 1.0);
        let packed = std::sync::Arc::new(crate::Bf16Weight::new(&w).unwrap());
        let base = FrozenLinear {
            weight: FrozenWeight::DenseBf16(w),
            bias: None,
        };
        let inputs = [
            random(&[37, 64], 7, 1.0),
            random(&[8, 64], 8, 0.5),
            random(&[40, 8], 9, 0.5),
        ];
        // Same bf16 base product both ways, the update f32 in both (no
        // finite differences: the rounded operands make them coarse).
        let fused = |t: &[Tensor]| lora_linear(&t[0], &base, &factors(&t[1], &t[2]), None);
        let reference = |t: &[Tensor]| composed(&frozen_matmul_bf16(&t[0], &packed)?, t);
        assert_close(
            &fused(&inputs).unwrap(),
            &reference(&inputs).unwrap(),
            1e-4,
            "forward",
        );
        for (i, (g, want)) in grads(&inputs, &fused)
            .iter()
            .zip(grads(&inputs, &reference))
            .enumerate()
        {
            assert_close(g, &want, 1e-4, &format!("gradient of input {i}"));
        }
    }

    #[test]
    fn a_frozen_input_gets_no_gradient_and_the_factors_still_do() {
        let w = random(&[6, 5], 10, 1.0);
        let base = FrozenLinear {
            weight: FrozenWeight::Dense(w),
            bias: None,
        };
        let x = random(&[3, 5], 11, 1.0);
        let a = candle_core::Var::from_tensor(&random(&[2, 5], 12, 1.0)).unwrap();
        let b = candle_core::Var::from_tensor(&random(&[6, 2], 13, 1.0)).unwrap();
        let y = lora_linear(&x, &base, &factors(a.as_tensor(), b.as_tensor()), None).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(a.as_tensor()).is_some() && g.get(b.as_tensor()).is_some());
    }
}
