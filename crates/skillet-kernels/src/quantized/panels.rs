//! The tile kernel's 16-column blocks of a quantized `W` (or `Wᵀ`) made
//! with AVX-512: each block of 32 weights is dequantized in registers
//! (bytes widened, scaled, offset) and rounded to bf16 with one
//! `vcvtne2ps2bf16`, never passing through memory as f32; for `Wᵀ`, 16
//! rows' blocks are transposed in registers and stored a line at a time. The layout is
//! the one `QuantPanels` writes with scalar code (see there).
// Intrinsics inside `unsafe fn`s whose contract covers them, as in the
// tile kernels.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::nf4::NF4_LEVELS;
use super::{BLOCK, QuantKind, QuantMatrix};
use crate::bf16::{interleave_pairs, transpose16 as transpose};

/// Columns per panel (the tile width).
const TILE: usize = 16;

/// Whether [`quant_panel`] can run here.
pub(super) fn vectorized() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Half `half` (0: weights 0–15, 1: weights 16–31) of block `b`, in f32.
///
/// # Safety
/// The CPU must have AVX-512 F and `b` must be a block of `w`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn half_block(w: &QuantMatrix, b: usize, half: usize) -> __m512 {
    let d = _mm512_set1_ps(w.scales[w.kind.scale_index(b, half)]);
    // Block `b` has 16 (Q4_1, NF4) or 32 (Q8_0, Q8_16) bytes at these offsets.
    match w.kind {
        QuantKind::Q4_1 => {
            let q =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(w.quants.as_ptr().add(b * 16) as *const _));
            let q = if half == 0 {
                _mm512_and_si512(q, _mm512_set1_epi32(15))
            } else {
                _mm512_srli_epi32::<4>(q)
            };
            _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(q), _mm512_set1_ps(w.mins[b]))
        }
        QuantKind::Q8_0 | QuantKind::Q8_16 => {
            let p = w.quants.as_ptr().add(b * 32 + 16 * half);
            _mm512_mul_ps(
                d,
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const _))),
            )
        }
        QuantKind::Nf4 => {
            let q =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(w.quants.as_ptr().add(b * 16) as *const _));
            let q = if half == 0 {
                _mm512_and_si512(q, _mm512_set1_epi32(15))
            } else {
                _mm512_srli_epi32::<4>(q)
            };
            // The code picks its level out of one register.
            let levels = _mm512_loadu_ps(NF4_LEVELS.as_ptr());
            _mm512_mul_ps(_mm512_permutexvar_ps(q, levels), d)
        }
    }
}

/// Column block `j` of `B` = `Wᵀ` (`forward`) or `W` into `panel`, which
/// is at least `padded(k) · 16` long (the `Panels` contract: its padding
/// past `k` arrives zeroed).
///
/// # Safety
/// [`vectorized`] must be true.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn quant_panel(w: &QuantMatrix, forward: bool, j: usize, panel: &mut [u16]) {
    // Every write lands inside `panel` (asserted lengths: scatters reach
    // 32-bit element `(cols / 2 - 1) · 16 + 15`, lines end at
    // `rows.div_ceil(2) · 32` values).
    let nb = w.cols / BLOCK;
    if forward {
        // Weight row 16j + c is column c: a block of each of the 16 rows
        // gives 16 pairs per row; transposed in registers, pair p of all
        // 16 rows is one 64-byte line at 32-bit element p · 16.
        assert!(panel.len() >= w.cols * TILE);
        let valid = TILE.min(w.rows - TILE * j);
        let dst = panel.as_mut_ptr() as *mut __m512i;
        for b in 0..nb {
            // Rows past the weight's last stay zero.
            let mut r = [_mm512_setzero_si512(); TILE];
            for (c, row) in r.iter_mut().enumerate().take(valid) {
                let blk = (TILE * j + c) * nb + b;
                let (lo, hi) = (half_block(w, blk, 0), half_block(w, blk, 1));
                *row = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            }
            transpose(&mut r);
            for (p, line) in r.iter().enumerate() {
                _mm512_storeu_si512(dst.add(b * BLOCK / 2 + p), *line);
            }
        }
    } else {
        // Columns 16j.. are half j % 2 of block j / 2 of every row; rows
        // 2p and 2p + 1 interleaved make one 64-byte line per pair.
        assert!(panel.len() >= w.rows.div_ceil(2) * 2 * TILE);
        let (b, half) = (j / 2, j % 2);
        let mut o = 0;
        while o < w.rows {
            let even = half_block(w, o * nb + b, half);
            let odd = if o + 1 < w.rows {
                half_block(w, (o + 1) * nb + b, half)
            } else {
                _mm512_setzero_ps()
            };
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
            let line = interleave_pairs(v);
            _mm512_storeu_si512(panel.as_mut_ptr().add(o / 2 * 2 * TILE) as *mut _, line);
            o += 2;
        }
    }
}
