//! `y = x Wᵀ`, the projection of every linear layer, in two ops.
//! `frozen_matmul` holds a frozen weight outside the graph: its backward
//! returns only the input gradient `dy W`. (candle's own matmul backward
//! always computes the weight gradient too: as much work as the forward
//! pass, and a full-size tensor per layer, even for a frozen weight.)
//! `linear` takes a trainable weight as an argument and also returns
//! `dW = dyᵀ x`. All products run straight on the tensors' memory through
//! the `gemm` crate, without copies.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};

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
                Ok(input_grad(g, w, out, inp))
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

/// `dx = dy W` for `dy` of `rows × out` and `W` of `out × inp`.
fn input_grad(dy: &[f32], w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let rows = dy.len() / out;
    let mut dx = vec![0f32; rows * inp];
    matmul(
        rows,
        inp,
        out,
        View::rows(dy, out),
        View::rows(w, inp),
        Out::new(&mut dx, inp),
        true,
    );
    dx
}

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let (out, inp) = wl.shape().dims2()?;
        let dims = xl.dims();
        if dims.last() != Some(&inp) {
            bail!("linear: input {dims:?} does not end in {inp}");
        }
        let rows = x.len() / inp;
        let mut y = vec![0f32; rows * out];
        matmul(
            rows,
            out,
            inp,
            View::rows(x, inp),
            View::rows(w, inp).t(),
            Out::new(&mut y, out),
            true,
        );
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let want_dw = w.track_op();
        let (dx, dw) = with_f32(dy, self.name(), |dy| {
            with_f32(w, self.name(), |wd| {
                let dx = input_grad(dy, wd, out, inp);
                let dw = if want_dw {
                    with_f32(x, self.name(), |xd| {
                        let rows = xd.len() / inp;
                        let mut dw = vec![0f32; out * inp];
                        matmul(
                            out,
                            inp,
                            rows,
                            View::rows(dy, out).t(),
                            View::rows(xd, inp),
                            Out::new(&mut dw, inp),
                            true,
                        );
                        Ok(Some(dw))
                    })?
                } else {
                    None
                };
                Ok((dx, dw))
            })
        })?;
        let dw = dw.map(|d| tensor(d, w.shape())).transpose()?;
        Ok((Some(tensor(dx, x.shape())?), dw))
    }
}

/// `x Wᵀ` for `x` of shape `[..., in]` and a dense `[out, in]` f32 weight
/// that may be trainable: backward gives `x` its gradient and, when `W`
/// tracks gradients, `W` its own.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, LinearOp)
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

    #[test]
    fn linear_gives_both_gradients() {
        let w = random(&[6, 5], 3, 1.0);
        let x = random(&[2, 3, 5], 4, 1.0);
        check_op(
            &[x, w],
            &|a| linear(&a[0], &a[1]),
            &|a| a[0].broadcast_matmul(&a[1].t()?),
            1e-5,
        );
    }
}
