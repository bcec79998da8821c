//! The stripes' int8 products on AVX2 (with FMA and F16C), for CPUs
//! without AVX512-VNNI (AMD Zen 2 and 3, Intel before Ice Lake). AVX2 has
//! no 4-byte dot product: `vpmaddubsw` multiplies unsigned by signed bytes
//! and adds neighbours into 16-bit lanes, and `vpmaddwd` against ones adds
//! those pairs into the 32-bit lane of each output row. A 64-byte line
//! of a record is two registers here: output rows 0–7, then 8–15.
//!
//! The 16-bit sums stay exact. A Q4_1 nibble times a rounded input is at
//! most `15·127`, so a pair is at most 3 810 and the eight pairs of a
//! block's 32 values at most 30 480: they are added in 16 bits before
//! widening. Q8_0's bytes, stored plus 128 for VNNI, are signed again here
//! and multiplied as `|w|` by the input with `w`'s sign (llama.cpp's way):
//! a pair is then at most `2·128·127`, which fits, and is widened at once.
//! Block sums are scaled and added in block order with fused
//! multiply-adds, as `int8::rows_portable` does: the same bits.

// Every function here is a kernel whose safety is the caller's check of
// `available()` plus the length checks in `rows`.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::super::BLOCK;
use super::super::int8::Int8Rows;
use super::{STRIPE, Striped};

/// Whether the CPU has the instructions.
pub(in crate::quantized) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Output rows per register.
const HALF: usize = STRIPE / 2;

/// As `super::rows`, on AVX2.
///
/// # Safety
/// `available()` must be true.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows(
    w: &Striped,
    x: &Int8Rows,
    stripes: std::ops::Range<usize>,
    out: &mut [f32],
) {
    super::each_group(w, x, stripes, out, &GROUPS);
}

/// The AVX2 kernel's passes.
const GROUPS: super::Groups = passes!(group);

/// Stripe `s` against input rows `r0..r0 + G`: `Q4` for Q4_1 records,
/// else Q8_0's.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const G: usize, const Q4: bool>(
    w: &Striped,
    x: &Int8Rows,
    s: usize,
    r0: usize,
    out: &mut [f32],
) {
    let (nb, t) = (w.nb, x.t);
    let record = Striped::record(w.kind);
    let sums = x.min_sums(w.exact_min_sums);
    let nibble = _mm256_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    // Per input row, output rows 0–7 and 8–15.
    let mut acc = [[_mm256_setzero_ps(); 2]; G];
    let lanes = x.lanes;
    let xq: [*const i8; G] = std::array::from_fn(|i| x.q.as_ptr().wrapping_add(x.value(r0 + i, 0)));
    for b in 0..nb {
        let rec = w.lines.as_ptr().add((s * nb + b) * record) as *const u8;
        let last = rec.add(64 * if Q4 { 4 } else { 8 });
        for h in 0..2 {
            // This half's values 4kk..4kk + 4 of each output row.
            let mut weights = [_mm256_setzero_si256(); 8];
            if Q4 {
                for j in 0..4 {
                    let v = _mm256_load_si256(rec.add(64 * j + 32 * h) as *const __m256i);
                    weights[j] = _mm256_and_si256(v, nibble);
                    weights[4 + j] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                }
            } else {
                let flip = _mm256_set1_epi8(i8::MIN);
                for (j, wj) in weights.iter_mut().enumerate() {
                    let v = _mm256_load_si256(rec.add(64 * j + 32 * h) as *const __m256i);
                    *wj = _mm256_xor_si256(v, flip);
                }
            }
            let (scale, min) = if Q4 {
                (
                    _mm256_cvtph_ps(_mm_load_si128(last.add(16 * h) as *const __m128i)),
                    _mm256_cvtph_ps(_mm_load_si128(last.add(32 + 16 * h) as *const __m128i)),
                )
            } else {
                (
                    _mm256_load_ps(last.add(32 * h) as *const f32),
                    _mm256_setzero_ps(),
                )
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                let xb = xq[i].add(b * BLOCK * lanes);
                let sum = if Q4 {
                    let mut pairs = _mm256_maddubs_epi16(weights[0], four(xb, lanes, 0));
                    for (kk, wk) in weights.iter().enumerate().skip(1) {
                        pairs =
                            _mm256_add_epi16(pairs, _mm256_maddubs_epi16(*wk, four(xb, lanes, kk)));
                    }
                    _mm256_madd_epi16(pairs, ones)
                } else {
                    // Two partial sums, so the additions do not wait on
                    // each other (integer sums: the order does not change
                    // them).
                    let mut part = [_mm256_setzero_si256(); 2];
                    for (kk, wk) in weights.iter().enumerate() {
                        let signed = _mm256_sign_epi8(four(xb, lanes, kk), *wk);
                        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(*wk), signed);
                        part[kk % 2] =
                            _mm256_add_epi32(part[kk % 2], _mm256_madd_epi16(pairs, ones));
                    }
                    _mm256_add_epi32(part[0], part[1])
                };
                let at = x.at(r0 + i, b);
                let sc = _mm256_mul_ps(_mm256_set1_ps(x.d[at]), scale);
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sc, acc[h]);
                if Q4 {
                    acc[h] = _mm256_fmadd_ps(min, _mm256_set1_ps(sums[at]), acc[h]);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let mut v = [0f32; STRIPE];
        _mm256_storeu_ps(v.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(v.as_mut_ptr().add(HALF), acc[1]);
        for (l, &y) in v.iter().enumerate() {
            out[l * t + r0 + i] = y;
        }
    }
}

/// An input row's rounded values `4kk..4kk + 4` of a block (from `xb`, its
/// first; see `Int8Rows::q`), in every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn four(xb: *const i8, lanes: usize, kk: usize) -> __m256i {
    _mm256_set1_epi32((xb.add(kk * lanes * 4) as *const i32).read_unaligned())
}
