//! One AdamW update (Loshchilov & Hutter 2019, arXiv 1711.05101) written
//! into the parameter's own memory: one pass over parameter, gradient and
//! both moments, no temporary copies. The arithmetic is PyTorch's
//! `torch.optim.AdamW` (single-tensor path) operation for operation, so
//! results match it bit for bit on the same inputs.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, bail};
use rayon::prelude::*;

use crate::storage::slice;
use crate::vec::multiversion;

/// Elements per parallel task.
const BLOCK: usize = 1 << 15;

/// The step's scalars, computed once per step by the optimizer.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `sqrt(1 − β₂ᵗ)`.
    pub bias2_sqrt: f32,
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
}

struct Update<'a> {
    h: AdamWStep,
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
}

multiversion! {
    fn update_block(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p *= h.decay;
            *m = h.beta1 * *m + (1.0 - h.beta1) * g;
            *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
            let denom = v.sqrt() / h.bias2_sqrt + h.eps;
            *p -= h.step_size * *m / denom;
        }
    }
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let CpuStorage::F32(p) = ps else {
            bail!("adamw: the parameter must be f32");
        };
        let Some((start, end)) = pl.contiguous_offsets() else {
            bail!("adamw: the parameter must be contiguous");
        };
        let p = &mut p[start..end];
        let g = slice(gs, gl, "adamw")?;
        let (Ok(mut m), Ok(mut v)) = (self.m.lock(), self.v.lock()) else {
            bail!("adamw: moments poisoned");
        };
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            bail!(
                "adamw: {} parameters, {} gradients, {}/{} moments",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            );
        }
        let h = self.h;
        p.par_chunks_mut(BLOCK)
            .zip(g.par_chunks(BLOCK))
            .zip(m.par_chunks_mut(BLOCK).zip(v.par_chunks_mut(BLOCK)))
            .for_each(|((p, g), (m, v))| update_block(p, g, m, v, h));
        Ok(())
    }
}

/// Updates `param` in place from `grad` and the moments `m`, `v` (updated
/// too), as one AdamW step with the scalars `h`.
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    h: AdamWStep,
) -> Result<()> {
    let update = Update {
        h,
        m: Mutex::new(m),
        v: Mutex::new(v),
    };
    param.inplace_op2(&grad.contiguous()?, &update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random;

    #[test]
    fn in_place_update_equals_the_scalar_formula_bit_for_bit() {
        let n = 70_000;
        let p = random(&[n], 1, 1.0);
        let g = random(&[n], 2, 0.1);
        let before = p.to_vec1::<f32>().unwrap();
        let grad = g.to_vec1::<f32>().unwrap();
        let var = candle_core::Var::from_tensor(&p).unwrap();
        let mut m: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 1e-3).collect();
        let mut v: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 1e-4).collect();
        let (m0, v0) = (m.clone(), v.clone());
        let h = AdamWStep {
            step_size: 1e-2,
            bias2_sqrt: 0.3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decay: 0.999,
        };
        adamw_step(var.as_tensor(), &g, &mut m, &mut v, h).unwrap();
        let after = var.as_tensor().to_vec1::<f32>().unwrap();
        for j in [0, 1, n / 2, n - 1] {
            let mut pj = before[j] * h.decay;
            let mj = h.beta1 * m0[j] + (1.0 - h.beta1) * grad[j];
            let vj = h.beta2 * v0[j] + (1.0 - h.beta2) * grad[j] * grad[j];
            pj -= h.step_size * mj / (vj.sqrt() / h.bias2_sqrt + h.eps);
            assert_eq!(after[j].to_bits(), pj.to_bits());
            assert_eq!(m[j].to_bits(), mj.to_bits());
            assert_eq!(v[j].to_bits(), vj.to_bits());
        }
    }
}
