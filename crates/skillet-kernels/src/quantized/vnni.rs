//! The int8 products of `int8.rs` for a few input rows on AVX512-VNNI
//! (`vpdpbusd`: 64 byte products summed by fours into 16 int32 lanes per
//! instruction), where AMX's groups of 16 input rows would be mostly
//! padding. Lane `o` of a register is output row `o` of a stripe of 16:
//! four blocks of each of the 16 rows are loaded as one line each and
//! transposed in registers, so every 4 bytes of a Q4_1 block (8 nibbles)
//! land in their row's lane, against an input row's 4 bytes broadcast to
//! every lane. The block sums are scaled and added in block order with
//! fused multiply-adds, as `int8::rows_portable` does, so the bits are the
//! same.

// Every function here is a kernel whose safety is the caller's check of
// `available()` plus the length checks in `q4_1_rows`.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::QuantKind;
use super::int8::{GROUP_BLOCK, Int8Rows, LANES, WeightRows};

/// Output rows per register.
pub(super) const STRIPE: usize = 16;

/// The most input rows this kernel takes: beyond, AMX (where there is one)
/// runs the product faster.
pub(super) const MAX_ROWS: usize = 4;

/// Whether the CPU has the instructions.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// `out[o·t + r]` for the Q4_1 output rows `0..stripes·16` of `w` and each
/// of the `t ≤ MAX_ROWS` input rows `r` (equal, bit for bit, to
/// `int8::rows_portable`).
///
/// # Safety
/// `available()` must be true.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn q4_1_rows(w: &WeightRows, x: &Int8Rows, stripes: usize, out: &mut [f32]) {
    let (nb, t) = (x.nb, x.t);
    let rows = stripes * STRIPE;
    assert!(w.kind == QuantKind::Q4_1 && t <= MAX_ROWS);
    assert!(w.quants.len() >= rows * nb * 16 && w.scales.len() >= rows * nb);
    assert!(w.mins.len() >= rows * nb && out.len() >= rows * t);
    assert!(x.lanes == LANES && x.q.len() >= nb * GROUP_BLOCK && x.d.len() >= nb * LANES);
    // Row o's scale of block b is at `o · nb + b`.
    let lanes = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(nb as i32),
    );
    let nibble = _mm512_set1_epi8(15);
    for s in 0..stripes {
        let o0 = s * STRIPE;
        let mut acc = [_mm512_setzero_ps(); MAX_ROWS];
        for b0 in (0..nb).step_by(4) {
            let blocks = (nb - b0).min(4);
            // Row l's blocks b0.. (16 bytes each) as line l, then lines
            // transposed: line 4i + j holds bytes 4j..4j + 4 of block
            // b0 + i of every row.
            let mask = ((1u32 << (4 * blocks)) - 1) as u16;
            let mut lines = [_mm512_setzero_si512(); STRIPE];
            for (l, line) in lines.iter_mut().enumerate() {
                let at = ((o0 + l) * nb + b0) * 16;
                *line = _mm512_maskz_loadu_epi32(mask, w.quants.as_ptr().add(at) as *const i32);
            }
            crate::bf16::transpose16(&mut lines);
            for i in 0..blocks {
                let b = b0 + i;
                // Values 4j.. are the low nibbles of bytes 4j.., values
                // 16 + 4j.. their high nibbles.
                let mut weights = [_mm512_setzero_si512(); 8];
                for j in 0..4 {
                    let v = lines[4 * i + j];
                    weights[j] = _mm512_and_si512(v, nibble);
                    weights[4 + j] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                }
                let at_w = o0 * nb + b;
                let scale = _mm512_i32gather_ps::<4>(lanes, w.scales.as_ptr().add(at_w));
                let min = _mm512_i32gather_ps::<4>(lanes, w.mins.as_ptr().add(at_w));
                for (r, acc) in acc.iter_mut().enumerate().take(t) {
                    // Row r's 4 rounded values kk·4.. of block b (see
                    // `Int8Rows::q`); every row here is in group 0.
                    let xq = x.q.as_ptr().add(b * GROUP_BLOCK + r * 4) as *const i32;
                    let mut sum = _mm512_setzero_si512();
                    for (kk, wk) in weights.iter().enumerate() {
                        let xk = _mm512_set1_epi32(xq.add(kk * LANES).read_unaligned());
                        sum = _mm512_dpbusd_epi32(sum, *wk, xk);
                    }
                    let at = b * LANES + r;
                    let s = _mm512_mul_ps(_mm512_set1_ps(x.d[at]), scale);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, *acc);
                    *acc = _mm512_fmadd_ps(min, _mm512_set1_ps(x.sums[at]), *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(t) {
            let mut v = [0f32; STRIPE];
            _mm512_storeu_ps(v.as_mut_ptr(), *acc);
            for (l, &y) in v.iter().enumerate() {
                out[(o0 + l) * t + r] = y;
            }
        }
    }
}
