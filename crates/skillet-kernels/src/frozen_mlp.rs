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
//! bytes the graph kept) and overwritten there by their own gradients,
//! and `h` gets one gradient:
//! `dy + n'(h)(dg G + du U)` with `(dg, du)` the gated product's
//! gradients of `dy D`. The products run in the weights' precision, as
//! `frozen_product` does.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::FrozenWeight;
use crate::lora_linear::FrozenLinear;
use crate::rms_norm::InputNorm;
use crate::storage::{slice, tensor, with_f32};
use crate::swiglu::{gated, gated_grads_in_place};
use crate::swiglu_down::add_residual;

/// The weights of a frozen MLP block: `gate` and `up` are `[inner, C]`,
/// `down` `[C, inner]`.
#[derive(Debug, Clone)]
pub struct FrozenMlp {
    pub gate: FrozenWeight,
    pub up: FrozenWeight,
    pub down: FrozenLinear,
}

/// The gate and up products of a forward, for its backward.
struct Saved {
    gate: Vec<f32>,
    up: Vec<f32>,
}

struct FrozenMlpAdd {
    mlp: FrozenMlp,
    norm: InputNorm,
    saved: Mutex<Option<Saved>>,
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
}

impl CustomOp1 for FrozenMlpAdd {
    fn name(&self) -> &'static str {
        "frozen-mlp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = slice(storage, layout, self.name())?;
        let width = self.width(layout.dims().last().copied())?;
        let normed = self.norm.forward(h);
        let gate = self.mlp.gate.forward(&normed)?;
        let up = self.mlp.up.forward(&normed)?;
        drop(normed);
        let p = gated(&gate, &up);
        let mut y = self.mlp.down.weight.forward(&p)?;
        drop(p);
        add_residual(&mut y, h, self.mlp.down.bias.as_ref(), width)?;
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(Saved { gate, up });
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// Backward once per forward: the kept products become their
    /// gradients in place.
    fn bwd(&self, h: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let Some(Saved {
            gate: mut dg,
            up: mut du,
        }) = saved
        else {
            bail!("frozen mlp: backward without a forward, or a second one");
        };
        let dh = with_f32([h, dy], self.name(), |[h, dy]| {
            let dp = self.mlp.down.weight.backward(dy)?;
            gated_grads_in_place(&mut dg, &mut du, &dp);
            drop(dp);
            let mut dn = self.mlp.gate.backward(&dg)?;
            drop(dg);
            let dn_up = self.mlp.up.backward(&du)?;
            drop(du);
            dn.par_iter_mut()
                .zip(dn_up.par_iter())
                .for_each(|(a, b)| *a += b);
            drop(dn_up);
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

    /// The separate ops the model ran before: the two normed products and
    /// `swiglu_down`.
    fn separate(h: &Tensor, norm: &InputNorm, mlp: &FrozenMlp) -> Result<Tensor> {
        let gate = normed_frozen_product(h, norm, &mlp.gate)?;
        let up = normed_frozen_product(h, norm, &mlp.up)?;
        swiglu_down(&gate, &up, h, &mlp.down)
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
            // differences: the same numbers as the separate ops, but for
            // the order of the sums of `h`'s gradient.
            assert_close(
                &fused(&inputs).unwrap(),
                &reference(&inputs).unwrap(),
                1e-5,
                "bf16 output",
            );
            for (a, b) in grads(&inputs, &fused)
                .iter()
                .zip(&grads(&inputs, &reference))
            {
                assert_close(a, b, 1e-4, "bf16 gradient");
            }
        }
    }

    #[test]
    fn a_second_backward_over_one_forward_is_an_error() {
        let (c, inner) = (16, 24);
        let w = |r, k, seed| FrozenWeight::Dense(random(&[r, k], seed, 0.3));
        let mlp = FrozenMlp {
            gate: w(inner, c, 1),
            up: w(inner, c, 2),
            down: FrozenLinear {
                weight: w(c, inner, 3),
                bias: None,
            },
        };
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
        let good = FrozenMlp {
            gate: w(inner, c, 1),
            up: w(inner, c, 2),
            down: FrozenLinear {
                weight: w(c, inner, 3),
                bias: None,
            },
        };
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
