//! The SwiGLU gate of Llama's MLP (Shazeer 2020, arXiv 2002.05202):
//! `y = silu(g) ∘ u` with `silu(g) = g·σ(g)`. Backward:
//! `dg = dy ∘ u ∘ σ(g)(1 + g(1 − σ(g)))`, `du = dy ∘ silu(g)`, one pass
//! over memory instead of the composed op's four intermediates.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::bf16::{from_bf16, round_into};
use crate::storage::{slice, tensor, with_f32, zeros};
use crate::vec::{exp, multiversion};

/// Elements per parallel task.
const BLOCK: usize = 1 << 14;

struct SwiGlu;

multiversion! {
    fn forward_block(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((yv, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
            *yv = gv / (1.0 + exp(-gv)) * uv;
        }
    }
}

/// `(dg, du)` of one element for the output gradient `d`.
#[inline(always)]
fn element_grads(gv: f32, uv: f32, d: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-gv));
    (d * uv * s * (1.0 + gv * (1.0 - s)), d * gv * s)
}

multiversion! {
    fn backward_block(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dgv, duv), &gv), &uv), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            (*dgv, *duv) = element_grads(gv, uv, d);
        }
    }
}

multiversion! {
    fn backward_block_in_place(g: &mut [f32], u: &mut [f32], dy: &[f32]) {
        for ((gp, up), &d) in g.iter_mut().zip(u.iter_mut()).zip(dy) {
            (*gp, *up) = element_grads(*gp, *up, d);
        }
    }
}

multiversion! {
    fn backward_block_bf16(g: &[u16], u: &[u16], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dgv, duv), &gv), &uv), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            (*dgv, *duv) = element_grads(from_bf16(gv), from_bf16(uv), d);
        }
    }
}

/// `silu(g) ∘ u` of one row, written over `y`.
pub(crate) fn gated_row(g: &[f32], u: &[f32], y: &mut [f32]) {
    forward_block(g, u, y)
}

/// [`gated_grads_in_place`] for one row kept in bf16 (`g`, `u`): the
/// gradients made in f32 from the bf16 values, in `scratch` (at least
/// twice the row's length), then rounded over `g` and `u`.
pub(crate) fn gated_grads_rounded_row(
    g: &mut [u16],
    u: &mut [u16],
    dy: &[f32],
    scratch: &mut [f32],
) {
    let (dg, du) = scratch[..2 * g.len()].split_at_mut(g.len());
    backward_block_bf16(g, u, dy, dg, du);
    round_into(dg, g);
    round_into(du, u);
}

/// `silu(g) ∘ u`, over threads.
pub(crate) fn gated(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    y.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK).zip(u.par_chunks(BLOCK)))
        .for_each(|(y, (g, u))| forward_block(g, u, y));
    y
}

/// `(dg, du)` of `silu(g) ∘ u` for the output gradient `dy`, over threads.
pub(crate) fn gated_grads(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (zeros(g.len()), zeros(g.len()));
    dg.par_chunks_mut(BLOCK)
        .zip(du.par_chunks_mut(BLOCK))
        .zip(g.par_chunks(BLOCK).zip(u.par_chunks(BLOCK)))
        .zip(dy.par_chunks(BLOCK))
        .for_each(|(((dg, du), (g, u)), dy)| backward_block(g, u, dy, dg, du));
    (dg, du)
}

/// [`gated_grads`] written over its inputs, the same bits: `g` then
/// holds `dg` and `u` holds `du`, with no buffers made or zeroed.
pub(crate) fn gated_grads_in_place(g: &mut [f32], u: &mut [f32], dy: &[f32]) {
    g.par_chunks_mut(BLOCK)
        .zip(u.par_chunks_mut(BLOCK))
        .zip(dy.par_chunks(BLOCK))
        .for_each(|((g, u), dy)| backward_block_in_place(g, u, dy));
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        let g = slice(gs, gl, self.name())?;
        let u = slice(us, ul, self.name())?;
        Ok((CpuStorage::F32(gated(g, u)), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32([g, u, dy], self.name(), |[g, u, dy]| {
            Ok(gated_grads(g, u, dy))
        })?;
        Ok((Some(tensor(dg, g.shape())?), Some(tensor(du, u.shape())?)))
    }
}

/// `silu(gate) ∘ up`, fused, with gradients for both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// [`swiglu`]'s values for plain slices of equal length.
pub fn swiglu_rows(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gated(gate, up)
}

/// GeGLU (Gemma's MLP) for plain slices of equal length:
/// `gelu(gate)·up` with the tanh form of GELU, the bits of candle's
/// `gate.gelu()? * up` on the CPU (the same f32 operations in the same
/// order).
pub fn geglu_rows(gate: &[f32], up: &[f32]) -> Vec<f32> {
    #[allow(clippy::excessive_precision)]
    const SQRT_TWO_OVER_PI: f32 = 0.79788456080286535587989211986876373;
    gate.iter()
        .zip(up)
        .map(|(&v, &u)| {
            let gelu = 0.5 * v * (1.0 + f32::tanh(SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)));
            gelu * u
        })
        .collect()
}

/// The same from composed candle ops (the reference the fused op is tested
/// against).
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_op, random};

    #[test]
    fn matches_composed_and_finite_differences() {
        for (shape, seed) in [(vec![7], 1u64), (vec![2, 3, 50], 2), (vec![40_000], 3)] {
            let g = random(&shape, seed, 6.0);
            let u = random(&shape, seed + 1, 2.0);
            check_op(
                &[g, u],
                &|a| swiglu(&a[0], &a[1]),
                &|a| swiglu_composed(&a[0], &a[1]),
                1e-5,
            );
        }
    }

    #[test]
    fn gradients_in_place_are_the_same_bits() {
        let n = 3 * BLOCK + 77;
        let values = |seed, scale| random(&[n], seed, scale).to_vec1::<f32>().unwrap();
        let (g, u, dy) = (values(7, 6.0), values(8, 2.0), values(9, 1.0));
        let (dg, du) = gated_grads(&g, &u, &dy);
        let (mut gi, mut ui) = (g.clone(), u.clone());
        gated_grads_in_place(&mut gi, &mut ui, &dy);
        assert_eq!(gi, dg);
        assert_eq!(ui, du);
    }

    #[test]
    fn geglu_rows_are_candles_gelu_times_up_to_the_bit() {
        let g = random(&[3000], 5, 6.0);
        let u = random(&[3000], 6, 2.0);
        let want = (g.gelu().unwrap() * &u).unwrap().to_vec1::<f32>().unwrap();
        let got = geglu_rows(&g.to_vec1::<f32>().unwrap(), &u.to_vec1::<f32>().unwrap());
        assert_eq!(got, want);
    }
}
