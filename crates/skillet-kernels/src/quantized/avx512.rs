//! The same kernels written with AVX-512 intrinsics: a block's 32 weights
//! are two registers, scaled once and multiplied into up to `GROUP` input
//! rows with fused multiply-adds; each row keeps its own two accumulators
//! and is reduced the same way whatever the group size.
// Every function here is an intrinsics kernel whose safety is its callers'
// CPU check plus the length checks at the entry points.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::nf4::NF4_LEVELS;
use super::{BLOCK, GROUP, call_shape};

/// `$f::<g>(args)` for a group size `g` known only at run time (1 to
/// `GROUP`), as a slice of `g` results.
macro_rules! by_group {
    ($g:expr, $f:ident($($arg:expr),*)) => {
        match $g {
            1 => &$f::<1>($($arg),*)[..],
            2 => &$f::<2>($($arg),*)[..],
            3 => &$f::<3>($($arg),*)[..],
            4 => &$f::<4>($($arg),*)[..],
            5 => &$f::<5>($($arg),*)[..],
            6 => &$f::<6>($($arg),*)[..],
            7 => &$f::<7>($($arg),*)[..],
            _ => &$f::<GROUP>($($arg),*)[..],
        }
    };
}

/// Two registers of accumulators per row, then the row's total.
#[inline(always)]
unsafe fn finish<const G: usize>(lo: &[__m512; G], hi: &[__m512; G]) -> [f32; G] {
    let mut out = [0f32; G];
    for k in 0..G {
        out[k] = _mm512_reduce_add_ps(_mm512_add_ps(lo[k], hi[k]));
    }
    out
}

/// `acc += w·x` for the `G` rows of one block; `x` points at the
/// block's rows laid side by side (`G × 32` floats, see `interleave`),
/// so every address is a constant offset.
#[inline(always)]
unsafe fn fma_rows<const G: usize>(
    lo: &mut [__m512; G],
    hi: &mut [__m512; G],
    wl: __m512,
    wh: __m512,
    x: *const f32,
) {
    for k in 0..G {
        let p = x.add(k * BLOCK);
        lo[k] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(p), lo[k]);
        hi[k] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(p.add(16)), hi[k]);
    }
}

/// `x` (`t` rows of `cols`) regrouped as `[group][block][row][32]`, in
/// groups of `GROUP` rows (the last one shorter).
pub(super) fn interleave(x: &[f32], cols: usize) -> Vec<f32> {
    let t = x.len() / cols;
    let nb = cols / BLOCK;
    let mut out = Vec::with_capacity(x.len());
    for r0 in (0..t).step_by(GROUP) {
        let g = GROUP.min(t - r0);
        for b in 0..nb {
            for k in 0..g {
                let at = (r0 + k) * cols + b * BLOCK;
                out.extend_from_slice(&x[at..at + BLOCK]);
            }
        }
    }
    out
}

/// The block's weights `d·q + m` are made once (two registers) and
/// multiplied into every row of the group.
#[inline(always)]
unsafe fn q4_1_group<const G: usize>(
    row: &[u8],
    d: &[f32],
    m: &[f32],
    x: &[f32],
    cols: usize,
) -> [f32; G] {
    let nb = cols / BLOCK;
    let mut lo = [_mm512_setzero_ps(); G];
    let mut hi = [_mm512_setzero_ps(); G];
    let mask = _mm512_set1_epi32(15);
    for b in 0..nb {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.as_ptr().add(b * 16) as *const __m128i));
        let scale = _mm512_set1_ps(*d.get_unchecked(b));
        let min = _mm512_set1_ps(*m.get_unchecked(b));
        let wl = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_and_si512(q, mask)), min);
        let wh = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), min);
        fma_rows(&mut lo, &mut hi, wl, wh, x.as_ptr().add(b * G * BLOCK));
    }
    finish(&lo, &hi)
}

/// `per` scales per block: Q8_0's one, or Q8_16's one per register.
#[inline(always)]
unsafe fn q8_0_group<const G: usize>(
    q: &[u8],
    d: &[f32],
    per: usize,
    x: &[f32],
    cols: usize,
) -> [f32; G] {
    debug_assert!(x.len() >= cols * G);
    let nb = cols / BLOCK;
    let mut lo = [_mm512_setzero_ps(); G];
    let mut hi = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let p = q.as_ptr().add(b * 32) as *const __m128i;
        let wl = _mm512_mul_ps(
            _mm512_set1_ps(*d.get_unchecked(b * per)),
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))),
        );
        let wh = _mm512_mul_ps(
            _mm512_set1_ps(*d.get_unchecked(b * per + per - 1)),
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(1)))),
        );
        fma_rows(&mut lo, &mut hi, wl, wh, x.as_ptr().add(b * G * BLOCK));
    }
    finish(&lo, &hi)
}

/// NF4: each half-block's 16 codes pick their levels out of one register
/// (`vpermps`), scaled by the absmax of the block's 64 (`d` starts at the
/// row's first block of 64; `shift` is 1 when the row starts in its second
/// half).
#[inline(always)]
unsafe fn nf4_group<const G: usize>(
    row: &[u8],
    d: &[f32],
    shift: usize,
    x: &[f32],
    cols: usize,
) -> [f32; G] {
    debug_assert!(x.len() >= cols * G);
    let nb = cols / BLOCK;
    let mut lo = [_mm512_setzero_ps(); G];
    let mut hi = [_mm512_setzero_ps(); G];
    let levels = _mm512_loadu_ps(NF4_LEVELS.as_ptr());
    let mask = _mm512_set1_epi32(15);
    for b in 0..nb {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.as_ptr().add(b * 16) as *const __m128i));
        let scale = _mm512_set1_ps(*d.get_unchecked((b + shift) / 2));
        let wl = _mm512_mul_ps(
            _mm512_permutexvar_ps(_mm512_and_si512(q, mask), levels),
            scale,
        );
        let wh = _mm512_mul_ps(
            _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), levels),
            scale,
        );
        fma_rows(&mut lo, &mut hi, wl, wh, x.as_ptr().add(b * G * BLOCK));
    }
    finish(&lo, &hi)
}

/// Runs `group` over every output row and group of input rows.
#[inline(always)]
unsafe fn each(
    outs: usize,
    t: usize,
    out: &mut [f32],
    mut group: impl FnMut(usize, usize, usize, &mut [f32]),
) {
    for o in 0..outs {
        let mut r0 = 0;
        let mut vals = [0f32; GROUP];
        while r0 < t {
            let g = GROUP.min(t - r0);
            group(o, r0, g, &mut vals);
            for k in 0..g {
                out[(r0 + k) * outs + o] = vals[k];
            }
            r0 += g;
        }
    }
}

/// See `q4_1_rows_portable`; `x` comes from `interleave`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q4_1_rows(
    quants: &[u8],
    scales: &[f32],
    mins: &[f32],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let (nb, t, outs) = call_shape(x, cols, out);
    assert!(quants.len() >= outs * nb * 16 && scales.len() >= outs * nb && mins.len() >= outs * nb);
    assert!(cols.is_multiple_of(BLOCK));
    each(outs, t, out, |o, r0, g, vals| {
        let row = &quants[o * nb * 16..(o + 1) * nb * 16];
        let d = &scales[o * nb..(o + 1) * nb];
        let m = &mins[o * nb..(o + 1) * nb];
        let xs = &x[r0 * cols..(r0 + g) * cols];
        let sums: &[f32] = by_group!(g, q4_1_group(row, d, m, xs, cols));
        vals[..g].copy_from_slice(&sums[..g]);
    });
}

/// See `q8_0_rows_portable`; `x` comes from `interleave`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q8_0_rows(
    quants: &[u8],
    scales: &[f32],
    per: usize,
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let (nb, t, outs) = call_shape(x, cols, out);
    assert!(matches!(per, 1 | 2));
    assert!(
        quants.len() >= outs * nb * 32
            && scales.len() >= outs * nb * per
            && cols.is_multiple_of(BLOCK)
    );
    each(outs, t, out, |o, r0, g, vals| {
        let q = &quants[o * nb * 32..(o + 1) * nb * 32];
        let d = &scales[o * nb * per..(o + 1) * nb * per];
        let xs = &x[r0 * cols..(r0 + g) * cols];
        let sums: &[f32] = by_group!(g, q8_0_group(q, d, per, xs, cols));
        vals[..g].copy_from_slice(&sums[..g]);
    });
}

/// See `nf4_rows_portable`; `x` comes from `interleave`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn nf4_rows(
    quants: &[u8],
    absmax: &[f32],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let (nb, t, outs) = call_shape(x, cols, out);
    assert!(quants.len() >= outs * nb * 16 && absmax.len() >= (outs * nb).div_ceil(2));
    assert!(cols.is_multiple_of(BLOCK));
    each(outs, t, out, |o, r0, g, vals| {
        let q = &quants[o * nb * 16..(o + 1) * nb * 16];
        let d = &absmax[o * nb / 2..((o + 1) * nb).div_ceil(2)];
        let xs = &x[r0 * cols..(r0 + g) * cols];
        let sums: &[f32] = by_group!(g, nf4_group(q, d, o * nb % 2, xs, cols));
        vals[..g].copy_from_slice(&sums[..g]);
    });
}
