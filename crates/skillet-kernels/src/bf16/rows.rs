//! A frozen `[out, in]` weight held in bf16, row-major: half the bytes of
//! the f32 weight, for a base that only ever multiplies in bf16 (training
//! in bf16 rounds every frozen weight to bf16 in each product anyway, so
//! keeping the f32 values buys nothing). The tile kernel's 16-column blocks
//! are made from these rows in each product, both ways, with no rounding
//! left to do.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{Bf16Matrix, Panels, TILE, bf16_accelerated, from_bf16, matmul_bf16, round_into};
use crate::storage::with_f32;

/// `[rows, cols]` bf16 values (bits), row-major.
#[derive(Clone)]
pub struct Bf16Rows {
    rows: usize,
    cols: usize,
    data: Vec<u16>,
}

impl std::fmt::Debug for Bf16Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Rows({}×{})", self.rows, self.cols)
    }
}

impl Bf16Rows {
    /// `w` (`[out, in]` f32) rounded to bf16 (nearest, ties to even, as the
    /// products round a dense f32 weight).
    pub fn new(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        with_f32([w], "bf16 rows", |[w]| {
            let mut data = vec![0u16; rows * cols];
            data.par_chunks_mut(cols.max(1))
                .zip(w.par_chunks(cols.max(1)))
                .for_each(|(dst, src)| round_into(src, dst));
            Ok(Self { rows, cols, data })
        })
    }

    /// Output width (rows of `W`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width (columns of `W`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The values in f32 (exact), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.par_iter().map(|&h| from_bf16(h)).collect()
    }

    /// The tile kernel's column blocks of `Wᵀ` (`forward`) or `W`.
    pub(crate) fn panels(&self, forward: bool) -> impl Panels + '_ {
        RowPanels { w: self, forward }
    }

    /// `a Wᵀ` (`forward`, `a`: `[t, cols]`) or `a W` (`a`: `[t, rows]`)
    /// on the tiles, into a new vector. Only where [`bf16_accelerated`].
    pub(crate) fn product_new(&self, a: &[f32], forward: bool) -> Vec<f32> {
        let k = if forward { self.cols } else { self.rows };
        let panels = RowPanels { w: self, forward };
        super::matmul_panels_new(a, a.len() / k.max(1), &panels)
    }

    /// `a Wᵀ` (`forward`, `a`: `[t, cols]`) or `a W` (`a`: `[t, rows]`),
    /// in bf16 with f32 accumulation, written over `y`.
    pub(crate) fn product_into(&self, a: &[f32], forward: bool, y: &mut [f32]) {
        let k = if forward { self.cols } else { self.rows };
        let t = a.len() / k.max(1);
        if bf16_accelerated() {
            super::matmul_panels(a, t, &RowPanels { w: self, forward }, y);
        } else {
            // The same values through the f32 GEMM.
            let w = self.to_f32();
            let b = Bf16Matrix::pack_for(&w, self.rows, self.cols, forward, false);
            matmul_bf16(a, t, &b, y);
        }
    }
}

/// Column blocks of `B` = `Wᵀ` (`forward`) or `W` from bf16 rows.
struct RowPanels<'a> {
    w: &'a Bf16Rows,
    forward: bool,
}

impl Panels for RowPanels<'_> {
    fn k(&self) -> usize {
        if self.forward {
            self.w.cols
        } else {
            self.w.rows
        }
    }

    fn n(&self) -> usize {
        if self.forward {
            self.w.rows
        } else {
            self.w.cols
        }
    }

    fn panel<'a>(&'a self, j: usize, scratch: &'a mut [u16]) -> &'a [u16] {
        let Bf16Rows { rows, cols, data } = self.w;
        #[cfg(target_arch = "x86_64")]
        if super::amx::panels_vectorized() {
            // SAFETY: the CPU has the features (checked), and the scratch
            // is as long as the layout needs (the trait's contract).
            unsafe { super::amx::rows_panel(data, *rows, *cols, self.forward, j, scratch) };
            return scratch;
        }
        scalar_panel(data, *rows, *cols, self.forward, j, scratch);
        scratch
    }

    fn computed(&self) -> bool {
        true
    }
}

/// Column block `j` of `B` = `Wᵀ` (`forward`) or `W` for bf16 rows `w`
/// (`[rows, cols]`), one value at a time.
fn scalar_panel(w: &[u16], rows: usize, cols: usize, forward: bool, j: usize, panel: &mut [u16]) {
    if forward {
        // Column c is weight row 16j + c; its pair p is (W[o][2p], W[o][2p + 1]).
        for c in 0..TILE.min(rows - TILE * j) {
            let row = &w[(TILE * j + c) * cols..][..cols];
            for (kk, &v) in row.iter().enumerate() {
                panel[((kk / 2) * TILE + c) * 2 + kk % 2] = v;
            }
        }
    } else {
        // Pair p of column c is (W[2p][16j + c], W[2p + 1][16j + c]).
        let (c0, width) = (TILE * j, TILE.min(cols - TILE * j));
        for o in 0..rows {
            let base = (o / 2) * TILE * 2 + o % 2;
            for (c, &v) in w[o * cols + c0..][..width].iter().enumerate() {
                panel[base + 2 * c] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bf16::padded;
    use crate::testing::{assert_same_product, random};
    use crate::{FrozenWeight, frozen_product};

    #[test]
    fn products_equal_those_of_the_f32_weight_in_bf16() {
        // The same rounded operands and kernel as a dense f32 weight's bf16
        // products: the same values, both ways, on shapes off the tiles
        // (odd widths, outputs off 16, an odd shared dimension backward).
        for (t, out, inp) in [(37, 40, 70), (300, 33, 64), (5, 16, 17), (20, 7, 100)] {
            let w = random(&[out, inp], 1, 1.0);
            let x = random(&[t, inp], 2, 1.0);
            let dy = random(&[t, out], 3, 1.0);
            let rows = Arc::new(Bf16Rows::new(&w).unwrap());
            assert_eq!(rows.bytes(), out * inp * 2);
            assert_same_product(
                |x| frozen_product(x, &FrozenWeight::Bf16(rows.clone())),
                |x| frozen_product(x, &FrozenWeight::DenseBf16(w.clone())),
                &x,
                &dy,
                0.0,
                &format!("{t}×{inp}→{out}"),
            );
        }
    }

    #[test]
    fn vectorized_panels_equal_the_scalar_ones() {
        #[cfg(target_arch = "x86_64")]
        if super::super::amx::panels_vectorized() {
            for (rows, cols) in [(40, 70), (33, 64), (16, 17), (7, 100), (3, 1)] {
                let w = random(&[rows, cols], 4, 1.0);
                let r = Bf16Rows::new(&w).unwrap();
                for forward in [true, false] {
                    let (k, n) = if forward { (cols, rows) } else { (rows, cols) };
                    let size = padded(k) * TILE;
                    // Scratch as the kernel hands it over: stale values
                    // (NaNs here), with the pairs from k / 2 on zeroed.
                    let stale = || {
                        let mut s = vec![0x7fc0u16; size];
                        s[(k / 2) * TILE * 2..].fill(0);
                        s
                    };
                    for j in 0..n.div_ceil(TILE) {
                        let mut want = stale();
                        scalar_panel(&r.data, rows, cols, forward, j, &mut want);
                        let mut got = stale();
                        // SAFETY: the features are checked above; `got` is
                        // as long as the layout needs.
                        unsafe {
                            super::super::amx::rows_panel(&r.data, rows, cols, forward, j, &mut got)
                        };
                        // Columns past `n` may hold anything; the valid ones
                        // hold the weight below k and zeros from k on, with
                        // no stale value left.
                        for p in 0..size / (2 * TILE) {
                            for c in 0..TILE.min(n - TILE * j) {
                                for e in 0..2 {
                                    let at = (p * TILE + c) * 2 + e;
                                    let what = format!(
                                        "{rows}×{cols} {forward} block {j} pair {p} col {c}"
                                    );
                                    let (kk, col) = (2 * p + e, TILE * j + c);
                                    let value = match (kk < k, forward) {
                                        (false, _) => 0,
                                        (true, true) => r.data[col * cols + kk],
                                        (true, false) => r.data[kk * cols + col],
                                    };
                                    assert_eq!(want[at], value, "scalar {what}");
                                    assert_eq!(got[at], value, "vectorized {what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_f32_values_are_the_rounded_weight() {
        let w = random(&[9, 33], 5, 1.0);
        let r = Bf16Rows::new(&w).unwrap();
        let back = r.to_f32();
        let want: Vec<f32> = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (b, x) in back.iter().zip(&want) {
            assert_eq!(*b, from_bf16(super::super::to_bf16(*x)));
        }
    }
}
