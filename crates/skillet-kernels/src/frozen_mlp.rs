//! Llama's whole MLP block over frozen weights in one op:
//! `h + (silu(n(h) Gᵀ) ∘ n(h) Uᵀ) Dᵀ (+ b)` for the residual stream `h`,
//! its RMSNorm `n` and the gate, up and down projections.
//!
//! As separate ops (two normed frozen products and `swiglu_down`), the
//! gate and the up product were two graph tensors whose gradients candle
//! made by zeroing a buffer and adding to it, and `h` took three
//! gradients, each a full-width add; each product normed `h` again in
//! forward and in backward. Here `h` is normed once each way, the gate
//! and up outputs are kept by the op itself for its backward (the same
//! bytes the graph kept; where all three products run on the tiles,
//! rounded to bf16 as autocast's matmul outputs are, half those bytes)
//! and overwritten there by their own gradients, and `h` gets one
//! gradient:
//! `dy + n'(h)(dg G + du U)` with `(dg, du)` the gated product's
//! gradients of `dy D`. The products run in the weights' precision, as
//! `frozen_product` does.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::FrozenWeight;
use crate::bf16::{Panels, RoundedRows, matmul_rounded, matmul_rounded_new, round_into};
use crate::lora_linear::FrozenLinear;
use crate::rms_norm::InputNorm;
use crate::storage::{slice, tensor, with_f32};
use crate::swiglu::{gated, gated_grads_in_place, gated_grads_rounded_row, gated_row};
use crate::swiglu_down::add_residual;

/// The weights of a frozen MLP block: `gate` and `up` are `[inner, C]`,
/// `down` `[C, inner]`.
#[derive(Debug, Clone)]
pub struct FrozenMlp {
    pub gate: FrozenWeight,
    pub up: FrozenWeight,
    pub down: FrozenLinear,
}

/// The gate and up products of a forward, for its backward: in f32, or
/// rounded to bf16 where all three products run on the tiles (autocast's
/// bf16 matmul outputs, half the bytes).
enum Saved {
    F32 { gate: Vec<f32>, up: Vec<f32> },
    Bf16 { gate: RoundedRows, up: RoundedRows },
}

struct FrozenMlpAdd {
    mlp: FrozenMlp,
    norm: InputNorm,
    saved: Mutex<Option<Saved>>,
}

/// `f` of `w`'s column blocks (`Wᵀ` where `forward`, else `W`), where
/// its products run on the tiles (the callers' check; an error else).
fn with_panels<R>(w: &FrozenWeight, forward: bool, f: impl FnOnce(&dyn Panels) -> R) -> Result<R> {
    match w.on_tiles(forward, f)? {
        Some(r) => Ok(r),
        None => bail!("frozen mlp: a product off the tiles"),
    }
}

/// `a Wᵀ` (`forward`) or `a W` for rows rounded once, on the tiles.
fn tiles_product(w: &FrozenWeight, a: &RoundedRows, forward: bool) -> Result<Vec<f32>> {
    with_panels(w, forward, |b| matmul_rounded_new(a, b))
}

impl FrozenMlpAdd {
    /// `C`, checked across the three weights, the norm and the input's
    /// last dimension `c`.
    fn width(&self, c: Option<usize>) -> Result<usize> {
        let (inner, width) = self.mlp.gate.dims()?;
        let (out, down_in) = self.mlp.down.weight.dims()?;
        if self.mlp.up.dims()? != (inner, width)
            || (out, down_in) != (width, inner)
            || self.norm.width() != width
            || c != Some(width)
        {
            bail!(
                "frozen mlp: gate {:?}, up {:?}, down {:?}, norm of {}, input rows of {c:?}",
                self.mlp.gate.dims()?,
                self.mlp.up.dims()?,
                self.mlp.down.weight.dims()?,
                self.norm.width()
            );
        }
        Ok(width)
    }

    /// Whether all three products run on the tiles, for widths they can
    /// take.
    fn on_tiles(&self, width: usize) -> Result<bool> {
        let w = [&self.mlp.gate, &self.mlp.up, &self.mlp.down.weight];
        Ok(width > 0 && self.mlp.gate.dims()?.0 > 0 && w.iter().all(|w| w.on_tiles_here()))
    }

    /// The down product of the gated product and the gate and up products
    /// to keep, in f32.
    fn forward_f32(&self, normed: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let gate = self.mlp.gate.forward(normed)?;
        let up = self.mlp.up.forward(normed)?;
        let p = gated(&gate, &up);
        let y = self.mlp.down.weight.forward(&p)?;
        Ok((y, Saved::F32 { gate, up }))
    }

    /// The same on the tiles: the normed rows rounded once for both
    /// products, the gated product rounded as each row is made (the
    /// values the down product would round it to), and the gate and up
    /// products kept rounded.
    fn forward_tiles(&self, normed: &[f32], width: usize) -> Result<(Vec<f32>, Saved)> {
        let rows = normed.len() / width;
        let inner = self.mlp.gate.dims()?.0;
        let x = RoundedRows::new_par(normed, rows, width);
        let gate = tiles_product(&self.mlp.gate, &x, true)?;
        let up = tiles_product(&self.mlp.up, &x, true)?;
        drop(x);
        let (mut p, mut g, mut u) = (
            RoundedRows::empty(),
            RoundedRows::empty(),
            RoundedRows::empty(),
        );
        p.rows_mut(rows, inner)
            .zip(g.rows_mut(rows, inner))
            .zip(u.rows_mut(rows, inner))
            .zip(gate.par_chunks(inner).zip(up.par_chunks(inner)))
            .for_each_init(
                || vec![0f32; inner],
                |row, (((p, g), u), (gf, uf))| {
                    gated_row(gf, uf, row);
                    round_into(row, p);
                    round_into(gf, g);
                    round_into(uf, u);
                },
            );
        drop((gate, up));
        let y = tiles_product(&self.mlp.down.weight, &p, true)?;
        Ok((y, Saved::Bf16 { gate: g, up: u }))
    }

    /// `dn(g) G + dn(u) U` for the kept products, overwritten by their
    /// gradients, and the gated product's gradient `dp`.
    fn normed_grad(&self, saved: Saved, dp: &[f32]) -> Result<Vec<f32>> {
        match saved {
            Saved::F32 {
                gate: mut dg,
                up: mut du,
            } => {
                gated_grads_in_place(&mut dg, &mut du, dp);
                let mut dn = self.mlp.gate.backward(&dg)?;
                drop(dg);
                let dn_up = self.mlp.up.backward(&du)?;
                drop(du);
                dn.par_iter_mut()
                    .zip(dn_up.par_iter())
                    .for_each(|(a, b)| *a += b);
                Ok(dn)
            }
            Saved::Bf16 {
                gate: mut dg,
                up: mut du,
            } => {
                let inner = self.mlp.gate.dims()?.0;
                dg.values_mut()
                    .zip(du.values_mut())
                    .zip(dp.par_chunks(inner))
                    .for_each_init(
                        || vec![0f32; 2 * inner],
                        |scratch, ((g, u), d)| gated_grads_rounded_row(g, u, d, scratch),
                    );
                let mut dn = tiles_product(&self.mlp.gate, &dg, false)?;
                drop(dg);
                with_panels(&self.mlp.up, false, |b| {
                    matmul_rounded(&du, b, &mut dn, true)
                })?;
                Ok(dn)
            }
        }
    }
}

impl CustomOp1 for FrozenMlpAdd {
    fn name(&self) -> &'static str {
        "frozen-mlp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = slice(storage, layout, self.name())?;
        let width = self.width(layout.dims().last().copied())?;
        let normed = self.norm.forward(h);
        let (mut y, saved) = if self.on_tiles(width)? {
            self.forward_tiles(&normed, width)?
        } else {
            self.forward_f32(&normed)?
        };
        drop(normed);
        add_residual(&mut y, h, self.mlp.down.bias.as_ref(), width)?;
        if let Ok(mut kept) = self.saved.lock() {
            *kept = Some(saved);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// Backward once per forward: the kept products become their
    /// gradients in place.
    fn bwd(&self, h: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let Some(saved) = self.saved.lock().ok().and_then(|mut s| s.take()) else {
            bail!("frozen mlp: backward without a forward, or a second one");
        };
        let dh = with_f32([h, dy], self.name(), |[h, dy]| {
            let dp = self.mlp.down.weight.backward(dy)?;
            let dn = self.normed_grad(saved, &dp)?;
            drop(dp);
            let mut dh = self.norm.backward(h, &dn);
            dh.par_iter_mut()
                .zip(dy.par_iter())
                .for_each(|(a, b)| *a += b);
            Ok(dh)
        })?;
        Ok(Some(tensor(dh, h.shape())?))
    }
}

/// `h + mlp(n(h))` for the residual stream `h` (`[..., C]`), its RMSNorm
/// `norm` and the frozen SwiGLU MLP `mlp`, in one op; backward gives `h`
/// its whole gradient, the weights none.
pub fn frozen_mlp_add(h: &Tensor, norm: &InputNorm, mlp: &FrozenMlp) -> Result<Tensor> {
    h.contiguous()?.apply_op1(FrozenMlpAdd {
        mlp: mlp.clone(),
        norm: norm.clone(),
        saved: Mutex::new(None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_op, grads, quant_matrices, random};
    use crate::{normed_frozen_product, swiglu_down};
    use candle_core::DType;

    /// The separate ops the model ran before: the two normed products and
    /// `swiglu_down`.
    fn separate(h: &Tensor, norm: &InputNorm, mlp: &FrozenMlp) -> Result<Tensor> {
        let gate = normed_frozen_product(h, norm, &mlp.gate)?;
        let up = normed_frozen_product(h, norm, &mlp.up)?;
        swiglu_down(&gate, &up, h, &mlp.down)
    }

    /// The same with the gate and up products rounded to bf16 on their way
    /// to the gated product (the cast passes gradients through): the
    /// gradients of the op where it keeps those products in bf16.
    fn separate_rounded(h: &Tensor, norm: &InputNorm, mlp: &FrozenMlp) -> Result<Tensor> {
        let rounded = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let gate = rounded(normed_frozen_product(h, norm, &mlp.gate)?)?;
        let up = rounded(normed_frozen_product(h, norm, &mlp.up)?)?;
        swiglu_down(&gate, &up, h, &mlp.down)
    }

    /// Random dense gate, up and down weights of one kind, no bias.
    fn dense(c: usize, inner: usize, kind: fn(Tensor) -> FrozenWeight) -> FrozenMlp {
        let w = |r, k, seed| kind(random(&[r, k], seed, 0.3));
        FrozenMlp {
            gate: w(inner, c, 1),
            up: w(inner, c, 2),
            down: FrozenLinear {
                weight: w(c, inner, 3),
                bias: None,
            },
        }
    }

    fn mlps(c: usize, inner: usize) -> Vec<FrozenMlp> {
        let (g, u, d) = (
            random(&[inner, c], 11, 0.3),
            random(&[inner, c], 12, 0.3),
            random(&[c, inner], 13, 0.3),
        );
        let dense = |w: &Tensor, bf16: bool| match bf16 {
            true => FrozenWeight::DenseBf16(w.clone()),
            false => FrozenWeight::Dense(w.clone()),
        };
        let mut out = Vec::new();
        for bf16 in [false, true] {
            for bias in [None, Some(random(&[c], 14, 1.0))] {
                out.push(FrozenMlp {
                    gate: dense(&g, bf16),
                    up: dense(&u, bf16),
                    down: FrozenLinear {
                        weight: dense(&d, bf16),
                        bias,
                    },
                });
            }
        }
        let gates = quant_matrices(inner, c);
        // Each up of another kind than its gate, so that the two cannot
        // be swapped unnoticed.
        let mut ups = quant_matrices(inner, c);
        ups.rotate_left(1);
        let downs = quant_matrices(c, inner);
        for ((g, u), d) in gates.into_iter().zip(ups).zip(downs) {
            out.push(FrozenMlp {
                gate: FrozenWeight::QuantF32(g.clone()),
                up: FrozenWeight::QuantF32(u.clone()),
                down: FrozenLinear {
                    weight: FrozenWeight::QuantF32(d.clone()),
                    bias: None,
                },
            });
            out.push(FrozenMlp {
                gate: FrozenWeight::QuantBf16(g),
                up: FrozenWeight::QuantBf16(u),
                down: FrozenLinear {
                    weight: FrozenWeight::QuantBf16(d),
                    bias: None,
                },
            });
        }
        out
    }

    #[test]
    fn matches_the_separate_ops_over_dense_and_quantized_weights() {
        let (c, inner) = (64, 96);
        let norm = InputNorm::new(random(&[c], 3, 0.5).to_vec1::<f32>().unwrap(), 1e-5);
        let inputs = [random(&[2, 5, c], 1, 2.0)];
        for mlp in mlps(c, inner) {
            let fused = |a: &[Tensor]| frozen_mlp_add(&a[0], &norm, &mlp);
            let reference = |a: &[Tensor]| separate(&a[0], &norm, &mlp);
            let f32_products =
                matches!(mlp.gate, FrozenWeight::Dense(_) | FrozenWeight::QuantF32(_));
            if f32_products {
                // Gradients against finite differences too.
                check_op(&inputs, &fused, &reference, 1e-4);
                continue;
            }
            // bf16 products round their inputs, too coarse for finite
            // differences: the same output as the separate ops, and on the
            // tiles the gradients of the gate and up products rounded as
            // the op keeps them (elsewhere the separate ops' own), but for
            // the order of the sums of `h`'s gradient.
            assert_close(
                &fused(&inputs).unwrap(),
                &reference(&inputs).unwrap(),
                1e-5,
                "bf16 output",
            );
            let rounded = |a: &[Tensor]| separate_rounded(&a[0], &norm, &mlp);
            let (want, tol) = match crate::bf16_accelerated() {
                true => (grads(&inputs, &rounded), 1e-5),
                false => (grads(&inputs, &reference), 1e-4),
            };
            for (a, b) in grads(&inputs, &fused).iter().zip(&want) {
                assert_close(a, b, tol, "bf16 gradient");
            }
        }
    }

    #[test]
    fn widths_and_rows_off_the_tile_sizes_on_bf16_products() {
        // 7 rows (not whole tiles of 16), widths not multiples of 32 (the
        // rounded rows padded): kept and overwritten in place all the same.
        let (c, inner) = (40, 50);
        let mlp = dense(c, inner, FrozenWeight::DenseBf16);
        let norm = InputNorm::new(random(&[c], 5, 0.5).to_vec1::<f32>().unwrap(), 1e-5);
        let inputs = [random(&[7, c], 4, 2.0)];
        let fused = |a: &[Tensor]| frozen_mlp_add(&a[0], &norm, &mlp);
        let reference = |a: &[Tensor]| match crate::bf16_accelerated() {
            true => separate_rounded(&a[0], &norm, &mlp),
            false => separate(&a[0], &norm, &mlp),
        };
        let plain = separate(&inputs[0], &norm, &mlp).unwrap();
        assert_close(&fused(&inputs).unwrap(), &plain, 1e-5, "output");
        let tol = if crate::bf16_accelerated() {
            1e-5
        } else {
            1e-4
        };
        let (got, want) = (grads(&inputs, &fused), grads(&inputs, &reference));
        assert_close(&got[0], &want[0], tol, "gradient");
    }

    #[test]
    fn a_second_backward_over_one_forward_is_an_error() {
        let (c, inner) = (16, 24);
        let mlp = dense(c, inner, FrozenWeight::Dense);
        let norm = InputNorm::new(vec![1.0; c], 1e-5);
        let h = candle_core::Var::from_tensor(&random(&[3, c], 4, 1.0)).unwrap();
        let loss = frozen_mlp_add(h.as_tensor(), &norm, &mlp)
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(loss.backward().unwrap().get(h.as_tensor()).is_some());
        let err = loss.backward().unwrap_err().to_string();
        assert!(err.contains("second"), "{err}");
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let (c, inner) = (16, 24);
        let w = |r, k, seed| FrozenWeight::Dense(random(&[r, k], seed, 0.3));
        let norm = InputNorm::new(vec![1.0; c], 1e-5);
        let good = dense(c, inner, FrozenWeight::Dense);
        let h = random(&[3, c], 4, 1.0);
        assert!(frozen_mlp_add(&h, &norm, &good).is_ok());
        assert!(frozen_mlp_add(&random(&[3, c + 1], 4, 1.0), &norm, &good).is_err());
        let bad_up = FrozenMlp {
            up: w(inner + 1, c, 2),
            ..good.clone()
        };
        assert!(frozen_mlp_add(&h, &norm, &bad_up).is_err());
        let bad_down = FrozenMlp {
            down: FrozenLinear {
                weight: w(c, inner + 1, 3),
                bias: None,
            },
            ..good.clone()
        };
        assert!(frozen_mlp_add(&h, &norm, &bad_down).is_err());
        let narrow_norm = InputNorm::new(vec![1.0; c - 1], 1e-5);
        assert!(frozen_mlp_add(&h, &narrow_norm, &good).is_err());
    }
}
