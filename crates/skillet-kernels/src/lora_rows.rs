//! LoRA updates for a batch whose rows use different adapters, in one
//! pass (the gathered matrix-vector products of Punica's BGMV, Chen et al.
//! 2023, arXiv 2310.18547, and S-LoRA, arXiv 2311.03285): row `i` gets
//! `scale_j · B_j (A_j x_i)` of its own adapter `j`, or nothing. For
//! inference only (no backward); a batch where every row uses the same
//! adapter goes through ordinary matrix products, with gradients.

use candle_core::{Result, Tensor, bail};
use rayon::prelude::*;

use crate::storage::{tensor, with_f32_all};
use crate::vec::{dot, multiversion};

/// One adapter's factors for one layer: `A` `[r, in]`, `B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// Down projection `[r, in]`.
    pub a: Tensor,
    /// Up projection `[out, r]`.
    pub b: Tensor,
    /// `B` transposed (`[r, out]`, contiguous) where the adapter keeps it
    /// (a frozen one): each row's update is then `r` contiguous
    /// multiply-adds over the output instead of `out` short dot products.
    pub b_t: Option<Tensor>,
    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    pub scale: f32,
}

/// Rows per parallel task: below this the work is too small to share.
const ROWS_PER_TASK: usize = 4;

/// The update `[N, out]` for `x` (`[N, in]`): row `i` uses
/// `factors[which[i]]`, or is zero where `which[i]` is `None`.
pub fn lora_rows(x: &Tensor, which: &[Option<u16>], factors: &[LoraFactors]) -> Result<Tensor> {
    let (n, inp) = x.dims2()?;
    if which.len() != n {
        bail!("lora rows: {} row choices for {n} rows", which.len());
    }
    let Some(first) = factors.first() else {
        return tensor(vec![0f32; 0], (n, 0));
    };
    let out = first.b.dim(0)?;
    for f in factors {
        let (r, a_in) = f.a.dims2()?;
        if a_in != inp || f.b.dims2()? != (out, r) {
            bail!(
                "lora rows: A {:?} and B {:?} do not fit input width {inp} and output width {out}",
                f.a.dims(),
                f.b.dims()
            );
        }
    }
    if let Some(j) = which
        .iter()
        .flatten()
        .find(|&&j| j as usize >= factors.len())
    {
        bail!("lora rows: adapter {j} of {}", factors.len());
    }
    let mut ts: Vec<&Tensor> = vec![x];
    for f in factors {
        ts.push(&f.a);
        ts.push(f.b_t.as_ref().unwrap_or(&f.b));
    }
    let y = with_f32_all(&ts, "lora rows", |s| {
        let x = s[0];
        let mut y = vec![0f32; n * out];
        y.par_chunks_mut(out * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, ys)| {
                for (k, yr) in ys.chunks_exact_mut(out).enumerate() {
                    let i = task * ROWS_PER_TASK + k;
                    let Some(j) = which[i] else { continue };
                    let (a, b, f) = (
                        s[1 + 2 * j as usize],
                        s[2 + 2 * j as usize],
                        &factors[j as usize],
                    );
                    let r = a.len() / inp;
                    let xr = &x[i * inp..(i + 1) * inp];
                    let t: Vec<f32> = a
                        .chunks_exact(inp)
                        .map(|ar| dot(ar, xr) * f.scale)
                        .collect();
                    if f.b_t.is_some() {
                        up_transposed(b, &t, yr);
                    } else {
                        for (o, br) in yr.iter_mut().zip(b.chunks_exact(r)) {
                            *o = dot(br, &t);
                        }
                    }
                }
            });
        Ok(y)
    })?;
    tensor(y, (n, out))
}

multiversion! {
    /// `y = Σ_k t_k · bt_k` over the rows `bt_k` of `Bᵀ`.
    fn up_transposed(bt: &[f32], t: &[f32], y: &mut [f32]) {
        let out = y.len();
        y.fill(0.0);
        for (row, &tk) in bt.chunks_exact(out).zip(t) {
            for (y, &b) in y.iter_mut().zip(row) {
                *y = b.mul_add(tk, *y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(shape: (usize, usize), seed: f32) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|i| (i as f32 * 0.37 + seed).sin())
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn each_row_gets_its_own_adapter() {
        let (inp, out) = (20, 12);
        let x = t((5, inp), 0.1);
        let f = |r, seed, scale, transposed: bool| {
            let b = t((out, r), seed + 1.0);
            LoraFactors {
                a: t((r, inp), seed),
                b_t: transposed.then(|| b.t().unwrap().contiguous().unwrap()),
                b,
                scale,
            }
        };
        // One adapter with B as stored, one with its transpose kept.
        let factors = [f(3, 1.0, 0.5, false), f(8, 2.0, 2.0, true)];
        let which = [Some(1), None, Some(0), Some(1), Some(0)];
        let got = lora_rows(&x, &which, &factors)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, w) in which.iter().enumerate() {
            let row = x.narrow(0, i, 1).unwrap();
            let want: Vec<f32> = match w {
                None => vec![0.0; out],
                Some(j) => {
                    let f = &factors[*j as usize];
                    (row.matmul(&f.a.t().unwrap())
                        .unwrap()
                        .matmul(&f.b.t().unwrap())
                        .unwrap()
                        * f.scale as f64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                }
            };
            for (g, w) in got[i].iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "row {i}: {g} vs {w}");
            }
        }
        assert!(lora_rows(&x, &[Some(2); 5], &factors).is_err());
    }
}
