//! `y = x Wᵀ` for a frozen weight, as a custom op whose backward returns
//! only the input gradient `dy W`. candle's own matmul backward always
//! computes the weight gradient too (as much work as the forward pass, and
//! a full-size tensor per layer) even when the weight is not trainable.
//! Both products run straight on the tensors' memory, without copies.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};

use crate::gemm::{Out, View, matmul};
use crate::storage::{slice, tensor, with_f32};

struct FrozenMatmul {
    /// `[out, in]`, dense f32.
    weight: Tensor,
}

impl FrozenMatmul {
    fn dims(&self) -> Result<(usize, usize)> {
        self.weight.dims2()
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let (out, inp) = self.dims()?;
        let dims = layout.dims();
        if dims.last() != Some(&inp) {
            bail!("frozen matmul: input {dims:?} does not end in {inp}");
        }
        let rows = x.len() / inp;
        let mut y = vec![0f32; rows * out];
        with_f32(&self.weight, self.name(), |w| {
            matmul(
                rows,
                out,
                inp,
                View::rows(x, inp),
                View::rows(w, inp).t(),
                Out::new(&mut y, out),
                true,
            );
            Ok(())
        })?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out, inp) = self.dims()?;
        let dx = with_f32(grad, self.name(), |g| {
            with_f32(&self.weight, self.name(), |w| {
                let rows = g.len() / out;
                let mut dx = vec![0f32; rows * inp];
                matmul(
                    rows,
                    inp,
                    out,
                    View::rows(g, out),
                    View::rows(w, inp),
                    Out::new(&mut dx, inp),
                    true,
                );
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, arg.shape())?))
    }
}

/// `x Wᵀ` for `x` of shape `[..., in]` and a frozen dense `[out, in]` f32
/// weight; the backward pass gives `x` its gradient and `W` none.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.contiguous()?.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_op, grads, random};

    #[test]
    fn matches_matmul_and_gives_the_weight_no_gradient() {
        let w = random(&[6, 5], 1, 1.0);
        let x = random(&[2, 3, 5], 2, 1.0);
        let wt = w.t().unwrap();
        check_op(
            std::slice::from_ref(&x),
            &|a| frozen_matmul(&a[0], &w),
            &|a| a[0].broadcast_matmul(&wt),
            1e-5,
        );
        let g = grads(&[x, w], &|a| frozen_matmul(&a[0], &a[1]));
        let zero = g[1]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(zero, 0.0, "the frozen weight got a gradient");
    }
}
