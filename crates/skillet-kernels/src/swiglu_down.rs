//! The end of Llama's MLP in one op: `h + (silu(g) ∘ u) Wᵀ (+ b)` for a
//! frozen down projection `W` (`[out, in]`) and the residual stream `h`.
//! The gated product `p = silu(g) ∘ u`, the MLP's widest activation, is
//! made for the forward product and again in backward, and never kept;
//! the projection is added to the residual in place. Composed, the graph
//! keeps `p` and the projection's output until backward (`in + out` floats
//! per token and layer). Backward: `dh = dy`, `dp = dy W` in the weight's
//! precision, then `dg`, `du` from `dp` as in [`crate::swiglu`].

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::lora_linear::FrozenLinear;
use crate::storage::{slice, tensor, with_f32};
use crate::swiglu::{gated, gated_grads};

struct SwiGluDown {
    down: FrozenLinear,
}

impl CustomOp3 for SwiGluDown {
    fn name(&self) -> &'static str {
        "swiglu-down"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = self.down.weight.dims()?;
        let (gd, hd) = (gl.dims(), hl.dims());
        let rows = gl.shape().elem_count() / inp.max(1);
        if gd != ul.dims()
            || gd.last() != Some(&inp)
            || hd.last() != Some(&out)
            || gd[..gd.len() - 1] != hd[..hd.len() - 1]
        {
            bail!(
                "swiglu-down: gate {gd:?}, up {:?}, residual {hd:?}, weight [{out}, {inp}]",
                ul.dims()
            );
        }
        let (g, u, h) = (
            slice(gs, gl, self.name())?,
            slice(us, ul, self.name())?,
            slice(hs, hl, self.name())?,
        );
        let p = gated(g, u);
        let mut y = self.down.weight.forward(&p)?;
        drop(p);
        add_residual(&mut y, h, self.down.bias.as_ref(), out)?;
        debug_assert_eq!(y.len(), rows * out);
        Ok((CpuStorage::F32(y), hl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _h: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32([g, u, dy], self.name(), |[g, u, dy]| {
            let dp = self.down.weight.backward(dy)?;
            Ok(gated_grads(g, u, &dp))
        })?;
        Ok((
            Some(tensor(dg, g.shape())?),
            Some(tensor(du, u.shape())?),
            Some(dy.clone()),
        ))
    }
}

/// `residual + (silu(gate) ∘ up) Wᵀ (+ b)` for the frozen `down`, with
/// gradients for `gate`, `up` and `residual`; `gate` and `up` are
/// `[..., in]`, `residual` `[..., out]`.
pub fn swiglu_down(
    gate: &Tensor,
    up: &Tensor,
    residual: &Tensor,
    down: &FrozenLinear,
) -> Result<Tensor> {
    gate.contiguous()?.apply_op3(
        &up.contiguous()?,
        &residual.contiguous()?,
        SwiGluDown { down: down.clone() },
    )
}

/// `y += h + bias` for rows of width `out`, over threads: the end of an
/// MLP block, its residual added in place.
pub(crate) fn add_residual(
    y: &mut [f32],
    h: &[f32],
    bias: Option<&Tensor>,
    out: usize,
) -> Result<()> {
    let bias = match bias {
        Some(b) => Some(b.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    y.par_chunks_mut(out.max(1))
        .zip(h.par_chunks(out.max(1)))
        .for_each(|(y, h)| match &bias {
            Some(b) => y
                .iter_mut()
                .zip(h)
                .zip(b)
                .for_each(|((y, h), b)| *y += h + b),
            None => y.iter_mut().zip(h).for_each(|(y, h)| *y += h),
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{assert_close, check_op, grads, quant_matrices, random};
    use crate::{Bf16Weight, FrozenWeight, frozen_matmul_bf16, frozen_product, swiglu};

    /// The composed reference: the gated product, the frozen product, the
    /// bias and the residual as separate ops.
    fn composed(a: &[Tensor], down: &FrozenLinear) -> Result<Tensor> {
        let y = frozen_product(&swiglu(&a[0], &a[1])?, &down.weight)?;
        let y = match &down.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        &a[2] + y
    }

    #[test]
    fn matches_the_composed_ops_over_dense_and_quantized_weights() {
        let (inp, out) = (64, 48);
        let w = random(&[out, inp], 7, 0.3);
        let mut downs = vec![
            FrozenLinear {
                weight: FrozenWeight::Dense(w.clone()),
                bias: None,
            },
            FrozenLinear {
                weight: FrozenWeight::Dense(w.clone()),
                bias: Some(random(&[out], 8, 1.0)),
            },
            FrozenLinear {
                weight: FrozenWeight::DenseBf16(w.clone()),
                bias: None,
            },
        ];
        for q in quant_matrices(out, inp) {
            downs.push(FrozenLinear {
                weight: FrozenWeight::QuantBf16(q.clone()),
                bias: None,
            });
            downs.push(FrozenLinear {
                weight: FrozenWeight::QuantF32(q),
                bias: None,
            });
        }
        let inputs = [
            random(&[2, 5, inp], 1, 3.0),
            random(&[2, 5, inp], 2, 1.0),
            random(&[2, 5, out], 3, 1.0),
        ];
        for down in &downs {
            let fused = |a: &[Tensor]| swiglu_down(&a[0], &a[1], &a[2], down);
            let reference = |a: &[Tensor]| composed(a, down);
            match down.weight {
                // f32 products: gradients against finite differences too.
                FrozenWeight::Dense(_) | FrozenWeight::QuantF32(_) => {
                    check_op(&inputs, &fused, &reference, 1e-4)
                }
                // bf16 products round their inputs, too coarse for finite
                // differences: the same numbers as the composed ops.
                _ => {
                    assert_close(
                        &fused(&inputs).unwrap(),
                        &reference(&inputs).unwrap(),
                        1e-5,
                        "bf16",
                    );
                    for (a, b) in grads(&inputs, &fused)
                        .iter()
                        .zip(&grads(&inputs, &reference))
                    {
                        assert_close(a, b, 1e-5, "bf16 gradient");
                    }
                }
            }
        }
        // bf16 products round: the packed reference gives the same numbers.
        let packed = Arc::new(Bf16Weight::new(&w).unwrap());
        let (g, u, h) = (
            random(&[3, inp], 4, 3.0),
            random(&[3, inp], 5, 1.0),
            random(&[3, out], 6, 1.0),
        );
        let fused = swiglu_down(&g, &u, &h, &downs[2]).unwrap();
        let want = (&h + frozen_matmul_bf16(&swiglu(&g, &u).unwrap(), &packed).unwrap()).unwrap();
        assert_close(&fused, &want, 1e-5, "bf16 swiglu-down");
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let down = FrozenLinear {
            weight: FrozenWeight::Dense(random(&[8, 16], 1, 1.0)),
            bias: None,
        };
        let (g, u) = (random(&[3, 16], 2, 1.0), random(&[3, 16], 3, 1.0));
        assert!(swiglu_down(&g, &u, &random(&[3, 16], 4, 1.0), &down).is_err());
        assert!(
            swiglu_down(
                &g,
                &random(&[3, 8], 5, 1.0),
                &random(&[3, 8], 4, 1.0),
                &down
            )
            .is_err()
        );
        assert!(swiglu_down(&g, &u, &random(&[3, 8], 4, 1.0), &down).is_ok());
    }
}
