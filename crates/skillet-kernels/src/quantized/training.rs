//! Products over many rows (training on a quantized base, QLoRA) without a
//! dense copy of `W` kept: in bf16, the tile kernel gets each 16-column
//! block of its right operand dequantized and rounded on the fly, once per
//! product; in f32, a slab at a time into the f32 GEMM (see `slabs.rs`).
//! (The op is [`crate::frozen_product`].)

use rayon::prelude::*;

use super::{BLOCK, QuantKind, QuantMatrix};
use crate::bf16::{
    Bf16Matrix, Panels, bf16_accelerated, matmul_bf16, matmul_panels, matmul_panels_new, round_into,
};

/// How the products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    /// bf16 operands, f32 sums (on AMX tiles where the CPU has them).
    Bf16,
    /// The f32 GEMM over slabs of the dequantized weight.
    F32,
}

impl QuantMatrix {
    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The dense `[rows, cols]` values, rows spread over threads.
    fn dequantize_parallel(&self) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(o, row)| {
                let mut values = [0f32; BLOCK];
                for (b, dst) in row.chunks_exact_mut(BLOCK).enumerate() {
                    self.block(o * nb + b, &mut values);
                    dst.copy_from_slice(&values);
                }
            });
        out
    }

    /// The 32 weights of block `b` (blocks in row-major order).
    #[inline(always)]
    pub(super) fn block(&self, b: usize, out: &mut [f32; BLOCK]) {
        let d = self.scales[self.kind.scale_index(b, 0)];
        match self.kind {
            QuantKind::Q4_1 => {
                let m = self.mins[b];
                let q: &[u8; 16] = self.quants[b * 16..b * 16 + 16]
                    .try_into()
                    .expect("16 bytes");
                for i in 0..16 {
                    out[i] = d * (q[i] & 15) as f32 + m;
                    out[i + 16] = d * (q[i] >> 4) as f32 + m;
                }
            }
            QuantKind::Q8_0 | QuantKind::Q8_16 => {
                let q: &[u8; 32] = self.quants[b * 32..b * 32 + 32]
                    .try_into()
                    .expect("32 bytes");
                let dh = self.scales[self.kind.scale_index(b, 1)];
                for i in 0..16 {
                    out[i] = d * q[i] as i8 as f32;
                    out[i + 16] = dh * q[i + 16] as i8 as f32;
                }
            }
            QuantKind::Nf4 => {
                let (lo, hi) = super::nf4::nf4_scaled(&self.quants[b * 16..b * 16 + 16], d);
                out[..16].copy_from_slice(&lo);
                out[16..].copy_from_slice(&hi);
            }
        }
    }

    /// `x Wᵀ` (`forward`, rows of width `cols`) or `dy W` (rows of width
    /// `rows`) in bf16, written over `out`: on the tiles with each column
    /// block dequantized once, else through a transient rounded copy.
    pub(crate) fn product_bf16_into(&self, x: &[f32], forward: bool, out: &mut [f32]) {
        self.product_into(x, Orient::of(forward), Precision::Bf16, out)
    }

    /// The tile kernel's column blocks of `Wᵀ` (`forward`) or `W`, each
    /// dequantized as the kernel asks for it.
    pub(crate) fn panels_bf16(&self, forward: bool) -> impl Panels + '_ {
        QuantPanels {
            w: self,
            orient: Orient::of(forward),
        }
    }

    /// [`QuantMatrix::product_bf16_into`] on the tiles into a new vector.
    /// Only where [`bf16_accelerated`].
    pub(crate) fn product_bf16_new(&self, x: &[f32], forward: bool) -> Vec<f32> {
        let orient = Orient::of(forward);
        let k = if forward { self.cols } else { self.rows };
        matmul_panels_new(x, x.len() / k.max(1), &QuantPanels { w: self, orient })
    }

    /// [`QuantMatrix::product_bf16_into`] in f32, through the weight
    /// dequantized a slab at a time.
    pub(crate) fn product_f32_into(&self, x: &[f32], forward: bool, out: &mut [f32]) {
        self.product_into(x, Orient::of(forward), Precision::F32, out)
    }

    /// The dense rows `ids` (each `< rows`), one after another: an
    /// embedding lookup that reads only the blocks it needs.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let mut out = vec![0f32; ids.len() * self.cols];
        let mut values = [0f32; BLOCK];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.cols.max(1))) {
            assert!((id as usize) < self.rows, "row {id} of {}", self.rows);
            for (b, dst) in row.chunks_exact_mut(BLOCK).enumerate() {
                self.block(id as usize * nb + b, &mut values);
                dst.copy_from_slice(&values);
            }
        }
        out
    }

    /// `out = x Wᵀ` (`x`: `[t, cols]`) or `out = dy W` (`dy`: `[t, rows]`).
    fn product_into(&self, x: &[f32], orient: Orient, precision: Precision, out: &mut [f32]) {
        let (k, n) = match orient {
            Orient::Transposed => (self.cols, self.rows),
            Orient::AsStored => (self.rows, self.cols),
        };
        let t = x.len() / k.max(1);
        assert_eq!(out.len(), t * n, "quantized product: output size");
        match precision {
            Precision::Bf16 if bf16_accelerated() => {
                matmul_panels(x, t, &QuantPanels { w: self, orient }, out);
            }
            Precision::Bf16 => {
                let w = self.dequantize_parallel();
                let transposed = orient == Orient::Transposed;
                let b = Bf16Matrix::pack_for(&w, self.rows, self.cols, transposed, false);
                matmul_bf16(x, t, &b, out);
            }
            Precision::F32 => {
                let transposed = orient == Orient::Transposed;
                super::slabs::product(self, x, transposed, out, super::slabs::SLAB);
            }
        }
    }
}

/// Which product the right operand serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Orient {
    /// `B = Wᵀ` (`[cols, rows]`): the forward `x Wᵀ`.
    Transposed,
    /// `B = W` (`[rows, cols]`): the input gradient `dy W`.
    AsStored,
}

impl Orient {
    fn of(forward: bool) -> Self {
        if forward {
            Orient::Transposed
        } else {
            Orient::AsStored
        }
    }
}

/// The tile kernel's column blocks of `B`, made from the blocks.
struct QuantPanels<'a> {
    w: &'a QuantMatrix,
    orient: Orient,
}

impl Panels for QuantPanels<'_> {
    fn k(&self) -> usize {
        match self.orient {
            Orient::Transposed => self.w.cols,
            Orient::AsStored => self.w.rows,
        }
    }

    fn n(&self) -> usize {
        match self.orient {
            Orient::Transposed => self.w.rows,
            Orient::AsStored => self.w.cols,
        }
    }

    fn panel<'a>(&'a self, j: usize, scratch: &'a mut [u16]) -> &'a [u16] {
        #[cfg(target_arch = "x86_64")]
        if super::panels::vectorized() {
            let forward = self.orient == Orient::Transposed;
            // SAFETY: the CPU has the features (checked); the scratch is as
            // long as the layout needs (the trait's contract).
            unsafe { super::panels::quant_panel(self.w, forward, j, scratch) };
            return scratch;
        }
        self.scalar_panel(j, scratch);
        scratch
    }

    fn computed(&self) -> bool {
        true
    }
}

/// Positions of a panel per pair of the shared dimension: 16 columns × 2.
const PAIR: usize = 32;

impl QuantPanels<'_> {
    /// Column block `j` without vector extensions.
    fn scalar_panel(&self, j: usize, panel: &mut [u16]) {
        match self.orient {
            Orient::Transposed => self.rows_panel(j, panel),
            Orient::AsStored => self.columns_panel(j, panel),
        }
    }

    /// `B = Wᵀ`, columns `16j..`: weight rows `16j..16j + 16`, each a
    /// column whose pair `p` is `(W[o][2p], W[o][2p + 1])`.
    fn rows_panel(&self, j: usize, panel: &mut [u16]) {
        let w = self.w;
        let nb = w.cols / BLOCK;
        let mut values = [0f32; BLOCK];
        let mut rounded = [0u16; BLOCK];
        for c in 0..16.min(w.rows - 16 * j) {
            let o = 16 * j + c;
            for b in 0..nb {
                w.block(o * nb + b, &mut values);
                round_into(&values, &mut rounded);
                for e in 0..BLOCK / 2 {
                    let at = (b * BLOCK / 2 + e) * PAIR + 2 * c;
                    panel[at] = rounded[2 * e];
                    panel[at + 1] = rounded[2 * e + 1];
                }
            }
        }
    }

    /// `B = W`, columns `16j..16j + 16` (half of a block): pair `p` of
    /// column `c` is `(W[2p][16j + c], W[2p + 1][16j + c])`.
    fn columns_panel(&self, j: usize, panel: &mut [u16]) {
        let w = self.w;
        let nb = w.cols / BLOCK;
        let (b, half) = (j / 2, (j % 2) * 16);
        let mut values = [0f32; BLOCK];
        let mut rounded = [0u16; BLOCK];
        for o in 0..w.rows {
            w.block(o * nb + b, &mut values);
            round_into(&values[half..half + 16], &mut rounded[..16]);
            let base = (o / 2) * PAIR + o % 2;
            for c in 0..16 {
                panel[base + 2 * c] = rounded[c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::tensor;
    use crate::testing::{
        assert_same_product, max_abs_diff, output_and_input_grad, quant_matrices, random,
    };
    use crate::{Bf16Weight, FrozenWeight, frozen_matmul, frozen_matmul_bf16, frozen_product};

    #[test]
    fn bf16_products_equal_the_dense_packed_ones() {
        // Rows off the tile sizes (and more rows than one task of the
        // stored kernel), outputs off 16 and an odd number of blocks.
        for (t, rows, cols) in [
            (37, 40, 96),
            (300, 80, 64),
            (5, 16, 32),
            (9, 37, 128),
            (6, 16, 256),
        ] {
            for w in quant_matrices(rows, cols) {
                let dense = tensor(w.dequantize(), (rows, cols)).unwrap();
                let packed = Arc::new(Bf16Weight::new(&dense).unwrap());
                let x = random(&[t, cols], 1, 1.0);
                let dy = random(&[t, rows], 2, 1.0);
                // Same rounded operands; only the order of f32 sums may differ.
                assert_same_product(
                    |x| frozen_product(x, &FrozenWeight::QuantBf16(w.clone())),
                    |x| frozen_matmul_bf16(x, &packed),
                    &x,
                    &dy,
                    1e-5,
                    &format!("{:?} {t}×{cols}→{rows}", w.kind),
                );
            }
        }
    }

    #[test]
    fn parallel_dequantizing_equals_the_serial_one() {
        for w in quant_matrices(40, 192) {
            assert_eq!(w.dequantize_parallel(), w.dequantize());
        }
    }

    #[test]
    fn dequantized_products_equal_the_dense_ones() {
        for w in quant_matrices(48, 64) {
            let dense = tensor(w.dequantize(), (48, 64)).unwrap();
            let x = random(&[3, 7, 64], 3, 1.0);
            let dy = random(&[3, 7, 48], 4, 1.0);
            let (y, gx) = output_and_input_grad(
                |x| frozen_product(x, &FrozenWeight::QuantF32(w.clone())),
                &x,
                &dy,
            );
            let (want_y, want_gx) = output_and_input_grad(|x| frozen_matmul(x, &dense), &x, &dy);
            assert!(max_abs_diff(&y, &want_y) < 1e-5);
            assert!(max_abs_diff(&gx, &want_gx) < 1e-5);
        }
    }

    #[test]
    fn dequantized_rows_are_the_rows_of_the_dense_matrix() {
        for w in quant_matrices(48, 64) {
            let dense = w.dequantize();
            let ids = [5u32, 0, 47, 5];
            let rows = w.dequantize_rows(&ids);
            for (i, &id) in ids.iter().enumerate() {
                let want = &dense[id as usize * 64..(id as usize + 1) * 64];
                assert_eq!(&rows[i * 64..(i + 1) * 64], want, "row {id}");
            }
        }
    }

    #[test]
    fn vectorized_panels_equal_the_scalar_ones() {
        #[cfg(target_arch = "x86_64")]
        if super::super::panels::vectorized() {
            // Ragged rows (a partial last panel, an odd last pair).
            for (rows, cols) in [(37, 96), (16, 32), (5, 64), (37, 128), (5, 256)] {
                for w in quant_matrices(rows, cols) {
                    for orient in [Orient::Transposed, Orient::AsStored] {
                        let p = QuantPanels { w: &w, orient };
                        let len = crate::bf16::padded(p.k()) * 16;
                        for j in 0..p.n().div_ceil(16) {
                            let mut want = vec![0u16; len];
                            p.scalar_panel(j, &mut want);
                            let mut got = vec![0u16; len];
                            p.panel(j, &mut got);
                            assert_eq!(got, want, "{rows}x{cols} {orient:?} panel {j}");
                        }
                    }
                }
            }
        }
    }
}
