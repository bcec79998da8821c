//! A frozen `[out, in]` weight held in bf16, packed once in the kernel's
//! 16-column blocks of `Wᵀ`: half the bytes of the f32 weight, for a base
//! that only ever multiplies in bf16 (training in bf16 rounds every frozen
//! weight to bf16 in each product anyway, so keeping the f32 values buys
//! nothing). Forward products (`x Wᵀ`) read the blocks where they lie;
//! backward products (`dy W`) make each block of `W` from the held ones,
//! one 16 × 16 square (512 contiguous bytes) at a time. Made from
//! row-major bf16 in each product instead, the forward blocks cost a
//! gather of 16 rows and the backward ones a 32-byte read per row, and
//! both stalled on memory: about 6% of a short-example SFT step on an AMD
//! EPYC Zen 4.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{
    Bf16Matrix, DensePanels, Panels, Stored, TILE, bf16_accelerated, from_bf16, matmul_bf16, padded,
};
use crate::storage::with_f32;

/// `[rows, cols]` bf16 values (bits) as the blocks of `Wᵀ` in the tile
/// layout (see `Layout::Tiles`): block `b` holds weight rows `16b..16b +
/// 16`, its line `q` the pairs `(W[16b + r][2q], W[16b + r][2q + 1])` for
/// `r` in `0..16`; rows past `rows` and columns past `cols` are zeros.
#[derive(Clone)]
pub struct Bf16Blocks {
    rows: usize,
    cols: usize,
    /// `cols` padded for the tiles: each block holds `kp · 16` values.
    kp: usize,
    data: Vec<u16>,
}

impl std::fmt::Debug for Bf16Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Blocks({}×{})", self.rows, self.cols)
    }
}

impl Bf16Blocks {
    /// `w` (`[out, in]` f32) rounded to bf16 (nearest, ties to even) and
    /// packed by the very code that packs a dense f32 weight in each of its
    /// bf16 products, so the values are the same.
    pub fn new(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let kp = padded(cols);
        with_f32([w], "bf16 blocks", |[w]| {
            let panels = DensePanels::new(w, rows, cols, true);
            let mut data = vec![0u16; rows.div_ceil(TILE) * kp * TILE];
            data.par_chunks_mut(kp * TILE)
                .enumerate()
                .for_each(|(b, block)| {
                    panels.panel(b, block);
                });
            Ok(Self {
                rows,
                cols,
                kp,
                data,
            })
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

    /// Bytes held (the padding of both widths included).
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Where `W[o][i]` is held.
    fn at(&self, o: usize, i: usize) -> usize {
        (o / TILE) * self.kp * TILE + (i / 2) * 2 * TILE + (o % TILE) * 2 + i % 2
    }

    /// The values in f32 (exact), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(o, row)| {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = from_bf16(self.data[self.at(o, i)]);
                }
            });
        out
    }

    /// The tile kernel's column blocks of `Wᵀ` (`forward`) or `W`.
    pub(crate) fn panels(&self, forward: bool) -> BlockPanels<'_> {
        if forward {
            BlockPanels::Held(Stored {
                k: self.cols,
                n: self.rows,
                kp: self.kp,
                data: &self.data,
            })
        } else {
            BlockPanels::Made(self)
        }
    }

    /// `a Wᵀ` (`forward`, `a`: `[t, cols]`) or `a W` (`a`: `[t, rows]`)
    /// on the tiles, into a new vector. Only where [`bf16_accelerated`].
    pub(crate) fn product_new(&self, a: &[f32], forward: bool) -> Vec<f32> {
        let k = if forward { self.cols } else { self.rows };
        super::matmul_panels_new(a, a.len() / k.max(1), &self.panels(forward))
    }

    /// `a Wᵀ` (`forward`, `a`: `[t, cols]`) or `a W` (`a`: `[t, rows]`),
    /// in bf16 with f32 accumulation, written over `y`.
    pub(crate) fn product_into(&self, a: &[f32], forward: bool, y: &mut [f32]) {
        let k = if forward { self.cols } else { self.rows };
        let t = a.len() / k.max(1);
        if bf16_accelerated() {
            super::matmul_panels(a, t, &self.panels(forward), y);
        } else {
            // The same values through the f32 GEMM.
            let w = self.to_f32();
            let b = Bf16Matrix::pack_for(&w, self.rows, self.cols, forward, false);
            matmul_bf16(a, t, &b, y);
        }
    }

    /// Column block `j` of `W` (columns `16j..16j + 16`; its line `p` the
    /// pairs `(W[2p][c], W[2p + 1][c])`) into `panel`: each held block's
    /// lines `8j..8j + 8` are a 16 × 16 square of `W`, whose pairs run
    /// along the other side.
    fn backward_panel(&self, j: usize, panel: &mut [u16]) {
        assert!(panel.len() >= padded(self.rows) * TILE && TILE * j < self.kp);
        #[cfg(target_arch = "x86_64")]
        if super::amx::panels_vectorized() {
            for b in 0..self.rows.div_ceil(TILE) {
                let from = b * self.kp * TILE + j * TILE * TILE;
                // SAFETY: the features are checked; `from` leaves 256 values
                // in the block (16j + 16 ≤ kp), and the panel holds lines
                // 8b..8b + 8 (16 · blocks ≤ padded rows).
                unsafe {
                    square_pairs_across(
                        self.data[from..][..TILE * TILE].as_ptr(),
                        panel[b * TILE * TILE..][..TILE * TILE].as_mut_ptr(),
                    )
                };
            }
            return;
        }
        self.backward_panel_scalar(j, panel);
    }

    /// [`Bf16Blocks::backward_panel`] a value at a time (the held zeros
    /// past the weight's rows and columns copied as they are).
    fn backward_panel_scalar(&self, j: usize, panel: &mut [u16]) {
        for p in 0..self.rows.div_ceil(TILE) * TILE / 2 {
            for c in 0..TILE {
                for e in 0..2 {
                    panel[(p * TILE + c) * 2 + e] = self.data[self.at(2 * p + e, TILE * j + c)];
                }
            }
        }
    }
}

/// A 16 × 16 square of bf16 values held as 8 lines of pairs along its
/// columns (line `q`, 32-bit element `r`: `(S[r][2q], S[r][2q + 1])`)
/// rewritten as 8 lines of pairs along its rows (line `p`, element `c`:
/// `(S[2p][c], S[2p + 1][c])`). Line `p`'s four values from line `q`
/// are that line's 64-bit element `p`, so an 8 × 8 transpose of 64-bit
/// elements gathers them, and a shuffle inside each 64-bit element
/// orders them.
///
/// # Safety
/// The CPU has AVX512-F and BW; `src` and `dst` hold 256 values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn square_pairs_across(src: *const u16, dst: *mut u16) {
    use std::arch::x86_64::*;
    let src = src as *const __m512i;
    let dst = dst as *mut __m512i;
    let r: [__m512i; 8] = std::array::from_fn(|q| unsafe { _mm512_loadu_si512(src.add(q)) });
    // Stage 1: lines 2i and 2i + 1 interleaved by 64-bit element.
    let s: [__m512i; 8] = std::array::from_fn(|x| {
        let (a, b) = (r[x & !1], r[x | 1]);
        if x % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // Stage 2: pairs of elements from four lines.
    let lo2 = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    let hi2 = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    let u = [
        _mm512_permutex2var_epi64(s[0], lo2, s[2]),
        _mm512_permutex2var_epi64(s[0], hi2, s[2]),
        _mm512_permutex2var_epi64(s[1], lo2, s[3]),
        _mm512_permutex2var_epi64(s[1], hi2, s[3]),
        _mm512_permutex2var_epi64(s[4], lo2, s[6]),
        _mm512_permutex2var_epi64(s[4], hi2, s[6]),
        _mm512_permutex2var_epi64(s[5], lo2, s[7]),
        _mm512_permutex2var_epi64(s[5], hi2, s[7]),
    ];
    // Stage 3: halves from the first four lines and the last four.
    let lo3 = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0);
    let hi3 = _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4);
    // u[0]: elements 0 and 4 of lines 0-3; u[1]: 2 and 6; u[2]: 1 and 5; u[3]: 3 and 7.
    let cols = [
        (0, u[0], u[4], lo3),
        (4, u[0], u[4], hi3),
        (2, u[1], u[5], lo3),
        (6, u[1], u[5], hi3),
        (1, u[2], u[6], lo3),
        (5, u[2], u[6], hi3),
        (3, u[3], u[7], lo3),
        (7, u[3], u[7], hi3),
    ];
    // (S[2p][2q], S[2p][2q + 1], S[2p + 1][2q], S[2p + 1][2q + 1]) →
    // (S[2p][2q], S[2p + 1][2q], S[2p][2q + 1], S[2p + 1][2q + 1]).
    let order = _mm512_set4_epi32(0x0f0e_0b0a, 0x0d0c_0908, 0x0706_0302, 0x0504_0100);
    for (p, a, b, idx) in cols {
        let line = _mm512_permutex2var_epi64(a, idx, b);
        // SAFETY: `dst` holds 8 lines (the caller's promise).
        unsafe { _mm512_storeu_si512(dst.add(p), _mm512_shuffle_epi8(line, order)) };
    }
}

/// Column blocks of `B` = `Wᵀ` (held) or `W` (made) from [`Bf16Blocks`].
pub(crate) enum BlockPanels<'a> {
    Held(Stored<'a>),
    Made(&'a Bf16Blocks),
}

impl Panels for BlockPanels<'_> {
    fn k(&self) -> usize {
        match self {
            BlockPanels::Held(s) => s.k(),
            BlockPanels::Made(w) => w.rows,
        }
    }

    fn n(&self) -> usize {
        match self {
            BlockPanels::Held(s) => s.n(),
            BlockPanels::Made(w) => w.cols,
        }
    }

    fn panel<'a>(&'a self, j: usize, scratch: &'a mut [u16]) -> &'a [u16] {
        match self {
            BlockPanels::Held(s) => s.panel(j, scratch),
            BlockPanels::Made(w) => {
                w.backward_panel(j, scratch);
                scratch
            }
        }
    }

    fn computed(&self) -> bool {
        matches!(self, BlockPanels::Made(_))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
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
            let blocks = Arc::new(Bf16Blocks::new(&w).unwrap());
            assert_eq!(blocks.bytes(), out.div_ceil(16) * padded(inp) * 16 * 2);
            assert_same_product(
                |x| frozen_product(x, &FrozenWeight::Bf16(blocks.clone())),
                |x| frozen_product(x, &FrozenWeight::DenseBf16(w.clone())),
                &x,
                &dy,
                0.0,
                &format!("{t}×{inp}→{out}"),
            );
        }
    }

    #[test]
    fn both_orientations_hold_the_rounded_weight_and_zeros_past_it() {
        // Every position of every block, each way: the weight below `k`
        // and inside `n`, zeros from `k` on, nothing stale left from the
        // scratch (NaNs here) where the backward blocks are made.
        for (rows, cols) in [(40, 70), (33, 64), (16, 17), (7, 100), (3, 1), (64, 48)] {
            let w = random(&[rows, cols], 4, 1.0);
            let blocks = Bf16Blocks::new(&w).unwrap();
            let f32s = blocks.to_f32();
            let want = |o: usize, i: usize| super::super::to_bf16(f32s[o * cols + i]);
            for forward in [true, false] {
                let panels = blocks.panels(forward);
                assert_eq!(panels.computed(), !forward);
                let (k, n) = if forward { (cols, rows) } else { (rows, cols) };
                assert_eq!((panels.k(), panels.n()), (k, n));
                let size = padded(k) * TILE;
                for j in 0..n.div_ceil(TILE) {
                    let mut scratch = vec![0x7fc0u16; size];
                    scratch[(k / 2) * TILE * 2..].fill(0);
                    if !forward {
                        // The scalar way, for CPUs without AVX-512.
                        let mut scalar = scratch.clone();
                        blocks.backward_panel_scalar(j, &mut scalar);
                        let got = panels.panel(j, &mut scratch);
                        assert_eq!(got, &scalar[..], "{rows}×{cols} block {j}");
                    }
                    let got = panels.panel(j, &mut scratch);
                    for p in 0..size / (2 * TILE) {
                        for c in 0..TILE.min(n - TILE * j) {
                            for e in 0..2 {
                                let (kk, col) = (2 * p + e, TILE * j + c);
                                let value = match (kk < k, forward) {
                                    (false, _) => 0,
                                    (true, true) => want(col, kk),
                                    (true, false) => want(kk, col),
                                };
                                assert_eq!(
                                    got[(p * TILE + c) * 2 + e],
                                    value,
                                    "{rows}×{cols} {forward} block {j} pair {p} col {c}"
                                );
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
        let r = Bf16Blocks::new(&w).unwrap();
        let back = r.to_f32();
        let want: Vec<f32> = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (b, x) in back.iter().zip(&want) {
            assert_eq!(*b, from_bf16(super::super::to_bf16(*x)));
        }
    }

    #[test]
    fn the_square_is_rewritten_as_the_scalar_reference_does() {
        // The vectorized square against the definition, on values that
        // tell every position apart.
        #[cfg(target_arch = "x86_64")]
        if super::super::amx::panels_vectorized() {
            let src: Vec<u16> = (0..256).map(|v| v as u16 * 7 + 1).collect();
            // S[r][c] held at line c / 2, element r, half c % 2.
            let s = |r: usize, c: usize| src[(c / 2) * 32 + r * 2 + c % 2];
            let mut dst = vec![0u16; 256];
            // SAFETY: the features are checked; both hold 256 values.
            unsafe { square_pairs_across(src.as_ptr(), dst.as_mut_ptr()) };
            for p in 0..8 {
                for c in 0..16 {
                    for e in 0..2 {
                        assert_eq!(dst[p * 32 + c * 2 + e], s(2 * p + e, c), "line {p} col {c}");
                    }
                }
            }
        }
    }
}
