//! RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467) as transformers'
//! `LlamaRMSNorm` computes it in f32: `y = x · r · w` with
//! `r = 1 / sqrt(mean(x²) + eps)` per row. Backward, with `g = dy ∘ w`:
//! `dx = r·g − x · r³ · (g·x) / C` and `dw = Σ_rows dy ∘ x · r`.
//! Nothing but the inputs is kept for backward; `r` is recomputed.
//!
//! [`InputNorm`] is the same norm run inside a projection's op on its
//! input, so that the normed rows are made again in backward instead of
//! kept.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::storage::{slice, tensor, with_f32};
use crate::vec::{dot, multiversion};

/// Rows per parallel task.
const ROWS: usize = 16;

struct RmsNorm {
    eps: f32,
}

multiversion! {
    fn forward_rows(x: &[f32], w: &[f32], y: &mut [f32], eps: f32) {
        let c = w.len();
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            let r = 1.0 / (dot(xr, xr) / c as f32 + eps).sqrt();
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = xv * r * wv;
            }
        }
    }
}

multiversion! {
    /// `dx` for the rows, adding each row's `dy ∘ x · r` into `dw` when given.
    fn backward_rows(x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw: Option<&mut [f32]>, eps: f32) {
        let c = w.len();
        let mut dw = dw;
        for ((xr, dyr), dxr) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            let r = 1.0 / (dot(xr, xr) / c as f32 + eps).sqrt();
            let mut gx = 0f32;
            for ((xv, dyv), wv) in xr.iter().zip(dyr).zip(w) {
                gx += dyv * wv * xv;
            }
            let k = r * r * r * gx / c as f32;
            for (((dxv, xv), dyv), wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                *dxv = r * dyv * wv - xv * k;
            }
            if let Some(dw) = dw.as_deref_mut() {
                for ((d, xv), dyv) in dw.iter_mut().zip(xr).zip(dyr) {
                    *d += dyv * xv * r;
                }
            }
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
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
        let c = w.len();
        if xl.dims().last() != Some(&c) {
            bail!(
                "rms-norm: input {:?} does not end in the weight's width {c}",
                xl.dims()
            );
        }
        Ok((
            CpuStorage::F32(forward_par(x, w, self.eps)),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_dw = w.track_op();
        let (dx, dw) = with_f32([x, w, dy], self.name(), |[x, w, dy]| {
            Ok(backward_par(x, w, dy, self.eps, want_dw))
        })?;
        let dx = tensor(dx, x.shape())?;
        let dw = dw.map(|d| tensor(d, w.shape())).transpose()?;
        Ok((Some(dx), dw))
    }
}

/// The norm of rows `x` of `w.len()`, on the thread pool.
fn forward_par(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .for_each(|(y, x)| forward_rows(x, w, y, eps));
    y
}

/// `dx` for rows `x` of `w.len()` given `dy`, on the thread pool, and
/// `dw` where `want_dw`.
fn backward_par(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    want_dw: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let c = w.len();
    let mut dx = vec![0f32; x.len()];
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c).zip(dy.par_chunks(ROWS * c)))
        .map(|(dx, (x, dy))| {
            let mut dw = vec![0f32; if want_dw { c } else { 0 }];
            let slot = want_dw.then_some(dw.as_mut_slice());
            backward_rows(x, w, dy, dx, slot, eps);
            dw
        })
        .collect();
    let dw = want_dw.then(|| {
        let mut sum = vec![0f32; c];
        for p in &partials {
            sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        sum
    });
    (dx, dw)
}

/// An RMSNorm with a frozen weight, applied by a projection's op to its
/// input `x` (the rows before the norm): forward norms the rows for the
/// product, backward norms them again where the op needs them and turns
/// the gradient of the normed rows into `x`'s. The graph then holds `x`,
/// which the residual stream holds anyway, instead of a normed copy too.
#[derive(Debug, Clone)]
pub struct InputNorm {
    weight: Arc<[f32]>,
    eps: f32,
}

impl InputNorm {
    /// The norm with weight values `weight` (`[C]`, as multiplied by).
    pub fn new(weight: Vec<f32>, eps: f64) -> Self {
        Self {
            weight: weight.into(),
            eps: eps as f32,
        }
    }

    /// `C`.
    pub(crate) fn width(&self) -> usize {
        self.weight.len()
    }

    /// The normed rows of `x` (the same bits as [`rms_norm`]).
    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        forward_par(x, &self.weight, self.eps)
    }

    /// The gradient of rows `x` given `dy`, the gradient of their normed
    /// rows.
    pub(crate) fn backward(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        backward_par(x, &self.weight, dy, self.eps, false).0
    }
}

/// RMSNorm of `x` (`[..., C]`) with weight `w` (`[C]`), fused, with
/// gradients for `x` and, when it is trainable, `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// [`rms_norm`]'s values for plain rows (`x` rows of `w.len()`), on the
/// calling thread: the same bits.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let mut y = Vec::new();
    rms_norm_rows_into(x, w, eps, &mut y);
    y
}

/// [`rms_norm_rows`] into `y`, in the room it has.
pub fn rms_norm_rows_into(x: &[f32], w: &[f32], eps: f64, y: &mut Vec<f32>) {
    y.clear();
    y.resize(x.len(), 0.0);
    forward_rows(x, w, y, eps as f32);
}

/// The same from composed candle ops (the reference the fused op is tested
/// against).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_op, random};

    #[test]
    fn matches_composed_and_finite_differences() {
        for (shape, seed) in [(vec![3, 8], 1), (vec![2, 5, 37], 2), (vec![1, 1, 64], 3)] {
            let c = *shape.last().unwrap();
            let x = random(&shape, seed, 2.0);
            let w = (random(&[c], seed + 10, 0.5) + 1.0).unwrap();
            check_op(
                &[x, w],
                &|a| rms_norm(&a[0], &a[1], 1e-5),
                &|a| rms_norm_composed(&a[0], &a[1], 1e-5),
                2e-5,
            );
        }
    }
}
