//! `y = x Wᵀ`, the projection of every linear layer. Backward gives `x`
//! its gradient `dy W`, and `W` its gradient `dyᵀ x` only when `W` is
//! trainable: `frozen_matmul` passes a detached weight, so a frozen
//! projection costs no weight gradient. (candle's own matmul backward
//! always computes the weight gradient too: as much work as the forward
//! pass, and a full-size tensor per layer, even for a frozen weight.) All
//! products run straight on the tensors' memory, without copies, through
//! `gemm.rs` (the `gemm` crate, or MKL where present and faster).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

use crate::bf16::{rounded_product, transposed};
use crate::gemm::{Out, View, matmul};
use crate::storage::{slice, tensor, with_f32};

/// The op, its products in f32 or (`bf16`) over bf16-rounded operands with
/// f32 accumulation.
struct LinearOp {
    bf16: bool,
}

impl LinearOp {
    /// `a · B` (`[m, k] · [k, n]`) with `B` = `w` (`[rows, cols]`) or, where
    /// `transposed`, `wᵀ`.
    fn product(
        &self,
        a: &[f32],
        m: usize,
        w: &[f32],
        (rows, cols): (usize, usize),
        transposed: bool,
    ) -> Vec<f32> {
        if self.bf16 {
            return rounded_product(a, m, w, (rows, cols), transposed);
        }
        let (k, n) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let b = View::rows(w, cols);
        let mut y = vec![0f32; m * n];
        matmul(
            m,
            n,
            k,
            View::rows(a, k),
            if transposed { b.t() } else { b },
            Out::new(&mut y, n),
            true,
        );
        y
    }
}

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
        let y = self.product(x, x.len() / inp, w, (out, inp), true);
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
        let (dx, dw) = with_f32([dy, w, x], self.name(), |[dy, w, x]| {
            let rows = dy.len() / out;
            let dx = self.product(dy, rows, w, (out, inp), false);
            // dyᵀ x: in f32 the GEMM reads dy transposed in place; the bf16
            // kernel takes a transposed copy (the shared dimension is the
            // rows).
            let dw = want_dw.then(|| {
                if self.bf16 {
                    self.product(&transposed(dy, rows, out), out, x, (rows, inp), false)
                } else {
                    let mut dw = vec![0f32; out * inp];
                    matmul(
                        out,
                        inp,
                        rows,
                        View::rows(dy, out).t(),
                        View::rows(x, inp),
                        Out::new(&mut dw, inp),
                        true,
                    );
                    dw
                }
            });
            Ok((dx, dw))
        })?;
        let dw = dw.map(|d| tensor(d, w.shape())).transpose()?;
        Ok((Some(tensor(dx, x.shape())?), dw))
    }
}

/// `x Wᵀ` for `x` of shape `[..., in]` and a dense `[out, in]` f32 weight
/// that may be trainable: backward gives `x` its gradient and, when `W`
/// tracks gradients, `W` its own.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, LinearOp { bf16: false })
}

/// [`linear`] for a trained `[out, in]` f32 weight (the master copy) with
/// every product in bf16 and f32 accumulation, PyTorch autocast's
/// semantics for a matmul: forward `x Wᵀ`, and backward `dy W` for `x` and,
/// when `W` tracks gradients, `dyᵀ x` for `W`, each over bf16-rounded
/// operands. Nothing is kept between calls (the weight changes every
/// step): each product rounds its right operand as it goes.
pub fn linear_bf16(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, LinearOp { bf16: true })
}

/// `x Wᵀ` for a frozen weight: the backward pass gives `x` its gradient
/// and `W` none, even when `W` is a variable.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    linear(x, &weight.detach())
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
