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

/// Rows of one adapter per parallel task.
const ROWS_PER_TASK: usize = 8;

/// The update `[N, out]` for `x` (`[N, in]`): row `i` uses
/// `factors[which[i]]`, or is zero where `which[i]` is `None`. With `base`
/// (`[N, out]`), returns `base` plus the update instead, in one pass.
///
/// Rows are grouped by adapter, so each adapter's factors are read once
/// per group rather than once per row; a row's numbers do not depend on
/// which rows share its group.
pub fn lora_rows(
    x: &Tensor,
    which: &[Option<u16>],
    factors: &[LoraFactors],
    base: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, inp) = x.dims2()?;
    if which.len() != n {
        bail!("lora rows: {} row choices for {n} rows", which.len());
    }
    let Some(first) = factors.first() else {
        return match base {
            Some(b) if b.dim(0)? == n => Ok(b.clone()),
            Some(b) => bail!("lora rows: base {:?} for {n} rows", b.dims()),
            None => tensor(vec![0f32; 0], (n, 0)),
        };
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
    if let Some(b) = base
        && b.dims() != [n, out]
    {
        bail!("lora rows: base {:?} for {n} rows of width {out}", b.dims());
    }
    if let Some(j) = which
        .iter()
        .flatten()
        .find(|&&j| j as usize >= factors.len())
    {
        bail!("lora rows: adapter {j} of {}", factors.len());
    }
    // Tasks: up to ROWS_PER_TASK rows of one adapter.
    let mut tasks: Vec<(usize, Vec<usize>)> = Vec::new();
    for j in 0..factors.len() {
        let rows: Vec<usize> = (0..n).filter(|&i| which[i] == Some(j as u16)).collect();
        for chunk in rows.chunks(ROWS_PER_TASK) {
            tasks.push((j, chunk.to_vec()));
        }
    }
    let mut ts: Vec<&Tensor> = vec![x];
    for f in factors {
        ts.push(&f.a);
        ts.push(f.b_t.as_ref().unwrap_or(&f.b));
    }
    if let Some(b) = base {
        ts.push(b);
    }
    let y = with_f32_all(&ts, "lora rows", |s| {
        let x = s[0];
        let parts: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|(j, rows)| {
                let (a, b, f) = (s[1 + 2 * j], s[2 + 2 * j], &factors[*j]);
                let r = a.len() / inp;
                // t = scale · A x, per row.
                let mut t = vec![0f32; rows.len() * r];
                for (k, ak) in a.chunks_exact(inp).enumerate() {
                    for (ri, &i) in rows.iter().enumerate() {
                        t[ri * r + k] = dot(ak, &x[i * inp..(i + 1) * inp]) * f.scale;
                    }
                }
                let mut d = vec![0f32; rows.len() * out];
                if f.b_t.is_some() {
                    up_transposed(b, &t, r, out, &mut d);
                } else {
                    for (dr, tr) in d.chunks_exact_mut(out).zip(t.chunks_exact(r.max(1))) {
                        for (o, br) in dr.iter_mut().zip(b.chunks_exact(r)) {
                            *o = dot(br, tr);
                        }
                    }
                }
                d
            })
            .collect();
        let mut y = match base {
            Some(_) => s[ts.len() - 1].to_vec(),
            None => vec![0f32; n * out],
        };
        for ((_, rows), d) in tasks.iter().zip(&parts) {
            for (&i, dr) in rows.iter().zip(d.chunks_exact(out)) {
                let yr = &mut y[i * out..(i + 1) * out];
                if base.is_some() {
                    add(yr, dr);
                } else {
                    yr.copy_from_slice(dr);
                }
            }
        }
        Ok(y)
    })?;
    tensor(y, (n, out))
}

multiversion! {
    /// Each row of `d` (`[rows, out]`, zeroed) becomes `Σ_k t_k · bt_k`
    /// over the rows `bt_k` of `Bᵀ` (`[r, out]`), `k` in order, with its
    /// own `t` (`[rows, r]`): each `bt_k` is read once for all rows.
    fn up_transposed(bt: &[f32], t: &[f32], r: usize, out: usize, d: &mut [f32]) {
        if r == 0 || out == 0 {
            return;
        }
        for (k, row) in bt.chunks_exact(out).enumerate() {
            for (y, tr) in d.chunks_exact_mut(out).zip(t.chunks_exact(r)) {
                let tk = tr[k];
                for (y, &b) in y.iter_mut().zip(row) {
                    *y = b.mul_add(tk, *y);
                }
            }
        }
    }
}

multiversion! {
    /// `y += d`.
    fn add(y: &mut [f32], d: &[f32]) {
        for (y, &d) in y.iter_mut().zip(d) {
            *y += d;
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
        let got = lora_rows(&x, &which, &factors, None)
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
        assert!(lora_rows(&x, &[Some(2); 5], &factors, None).is_err());
        // With a base: base plus the update, in one pass.
        let base = t((5, out), 3.0);
        let sum = lora_rows(&x, &which, &factors, Some(&base)).unwrap();
        let want = (&base + Tensor::new(got.clone(), &Device::Cpu).unwrap()).unwrap();
        assert_eq!(
            sum.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        // A row alone gets the same bits as in its group of rows.
        for (i, w) in which.iter().enumerate() {
            let alone = lora_rows(&x.narrow(0, i, 1).unwrap(), &[*w], &factors, None).unwrap();
            assert_eq!(alone.to_vec2::<f32>().unwrap()[0], got[i], "row {i}");
        }
    }
}
