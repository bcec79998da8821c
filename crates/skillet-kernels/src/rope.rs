//! Rotary position embeddings (Su et al. 2021, arXiv 2104.09864) applied
//! in place of the composed `x·cos + rotate(x)·sin`. Two pair layouts:
//! `Half` pairs element `i` with `i + D/2` (transformers' `rotate_half`,
//! GPT-NeoX), `Interleaved` pairs `2i` with `2i + 1` (Meta's original
//! code, GPT-J, llama.cpp's GGUF order). A rotation's gradient is the
//! inverse rotation, so backward is the same op with `sin` negated.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::storage::slice;
use crate::vec::multiversion;

/// Which elements of a head form a rotating pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(i, i + D/2)`: transformers' `rotate_half`.
    Half,
    /// `(2i, 2i + 1)`: the original interleaved layout.
    Interleaved,
}

/// `cos` and `sin` of every (row, frequency) pair: `rows × D/2` each, one
/// row per token (`batch × seq`), shared by all heads.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    rows: usize,
    half: usize,
}

impl RopeTable {
    /// A table from row-major `rows × half` cosines and sines.
    pub fn new(cos: Vec<f32>, sin: Vec<f32>, rows: usize, half: usize) -> Result<Self> {
        if cos.len() != rows * half || sin.len() != rows * half {
            bail!(
                "rope table: {} cos and {} sin values for {rows} × {half}",
                cos.len(),
                sin.len()
            );
        }
        Ok(Self {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            rows,
            half,
        })
    }

    /// Tokens covered.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

struct Rope {
    table: RopeTable,
    layout: RopeLayout,
    inverse: bool,
}

multiversion! {
    fn rotate_rows(x: &[f32], y: &mut [f32], cos: &[f32], sin: &[f32], half: usize, interleaved: bool, sign: f32) {
        let d = 2 * half;
        let heads = x.len() / d / (cos.len() / half);
        for (r, (xr, yr)) in x.chunks_exact(heads * d).zip(y.chunks_exact_mut(heads * d)).enumerate() {
            let c = &cos[r * half..(r + 1) * half];
            let s = &sin[r * half..(r + 1) * half];
            for (xh, yh) in xr.chunks_exact(d).zip(yr.chunks_exact_mut(d)) {
                if interleaved {
                    for i in 0..half {
                        let (a, b) = (xh[2 * i], xh[2 * i + 1]);
                        yh[2 * i] = a * c[i] - sign * b * s[i];
                        yh[2 * i + 1] = b * c[i] + sign * a * s[i];
                    }
                } else {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        y1[i] = x1[i] * c[i] - sign * x2[i] * s[i];
                        y2[i] = x2[i] * c[i] + sign * x1[i] * s[i];
                    }
                }
            }
        }
    }
}

/// `x` (`[batch, seq, heads, head_dim]` row-major, `dims`) rotated by
/// `table`, or by its inverse (the gradient's rotation).
pub(crate) fn rotate(
    x: &[f32],
    dims: &[usize],
    t: &RopeTable,
    layout: RopeLayout,
    inverse: bool,
) -> Result<Vec<f32>> {
    if dims.len() != 4 || dims[0] * dims[1] != t.rows || dims[3] != 2 * t.half {
        bail!(
            "rope: input {dims:?} is not [batch, seq, heads, {}] over {} tokens",
            2 * t.half,
            t.rows
        );
    }
    let row = dims[2] * dims[3];
    let mut y = vec![0f32; x.len()];
    let sign = if inverse { -1.0 } else { 1.0 };
    let rows_per_task = 8;
    y.par_chunks_mut(rows_per_task * row)
        .zip(x.par_chunks(rows_per_task * row))
        .enumerate()
        .for_each(|(k, (y, x))| {
            let r0 = k * rows_per_task;
            let r1 = r0 + x.len() / row;
            rotate_rows(
                x,
                y,
                &t.cos[r0 * t.half..r1 * t.half],
                &t.sin[r0 * t.half..r1 * t.half],
                t.half,
                layout == RopeLayout::Interleaved,
                sign,
            );
        });
    Ok(y)
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let y = rotate(x, layout.dims(), &self.table, self.layout, self.inverse)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            table: self.table.clone(),
            layout: self.layout,
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}

/// Rotates `x` of shape `[batch, seq, heads, head_dim]` by `table`
/// (`batch × seq` rows), fused, with its gradient.
pub fn rope(x: &Tensor, table: &RopeTable, layout: RopeLayout) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        table: table.clone(),
        layout,
        inverse: false,
    })
}

/// [`rope`]'s values for plain rows: `x` is `[rows, heads, head_dim]`
/// row-major, one row per row of `table`.
pub fn rope_rows(
    x: &[f32],
    heads: usize,
    table: &RopeTable,
    layout: RopeLayout,
) -> Result<Vec<f32>> {
    let dims = [1, table.rows, heads, 2 * table.half];
    if x.len() != dims.iter().product::<usize>() {
        bail!("rope: {} values are not {dims:?}", x.len());
    }
    rotate(x, &dims, table, layout, false)
}

/// The same from composed candle ops (the reference the fused op is tested
/// against).
pub fn rope_composed(x: &Tensor, table: &RopeTable, layout: RopeLayout) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    let half = d / 2;
    let dev = x.device();
    let cos = Tensor::from_slice(&table.cos, (b, t, 1, half), dev)?;
    let sin = Tensor::from_slice(&table.sin, (b, t, 1, half), dev)?;
    match layout {
        RopeLayout::Half => {
            let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
            let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        }
        RopeLayout::Interleaved => {
            let h = x.dim(2)?;
            let pairs = x.reshape((b, t, h, half, 2))?;
            let a = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
            let bb = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
            let ya = (a.broadcast_mul(&cos)? - bb.broadcast_mul(&sin)?)?;
            let yb = (bb.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
            Tensor::stack(&[&ya, &yb], D::Minus1)?.reshape((b, t, h, d))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_op, random};

    fn table(rows: usize, half: usize) -> RopeTable {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for r in 0..rows {
            for i in 0..half {
                let angle = (r * 7 % 13) as f32 * 0.3 / (1.0 + i as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable::new(cos, sin, rows, half).unwrap()
    }

    #[test]
    fn matches_composed_and_finite_differences_in_both_layouts() {
        for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
            for (shape, seed) in [([1, 3, 2, 4], 1u64), ([2, 5, 3, 8], 2), ([2, 17, 1, 64], 3)] {
                let x = random(&shape, seed, 1.0);
                let tab = table(shape[0] * shape[1], shape[3] / 2);
                check_op(
                    &[x],
                    &|a| rope(&a[0], &tab, layout),
                    &|a| rope_composed(&a[0], &tab, layout),
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn layouts_differ_and_inverse_undoes() {
        let x = random(&[1, 4, 2, 8], 5, 1.0);
        let tab = table(4, 4);
        let h = rope(&x, &tab, RopeLayout::Half).unwrap();
        let i = rope(&x, &tab, RopeLayout::Interleaved).unwrap();
        let diff = (h - i)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff > 1e-3);
        let back = x
            .apply_op1(Rope {
                table: tab.clone(),
                layout: RopeLayout::Half,
                inverse: false,
            })
            .unwrap()
            .apply_op1(Rope {
                table: tab,
                layout: RopeLayout::Half,
                inverse: true,
            })
            .unwrap();
        crate::testing::assert_close(&back, &x, 1e-6, "inverse");
    }
}
