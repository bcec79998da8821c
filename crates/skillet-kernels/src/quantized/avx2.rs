//! The f32 kernels of `avx512.rs` for CPUs with AVX2 and FMA alone: a
//! block's 32 weights are four registers, made once and multiplied into
//! up to [`SUB`] input rows with fused multiply-adds (the input laid out
//! by `avx512::interleave`); each row keeps its own four accumulators and
//! is reduced the same way whatever the group size, so a row's result
//! never depends on its batch.
// Every function here is an intrinsics kernel whose safety is its callers'
// CPU check plus the length checks at the entry points.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::nf4::NF4_LEVELS;
use super::{BLOCK, GROUP, call_shape};

/// Input rows multiplied at once: four accumulators each, four registers
/// of weights, within the sixteen registers.
const SUB: usize = 2;

/// Whether the CPU runs these kernels.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// A row's total: `(lo₀ + hi₀) + (lo₁ + hi₁)`, then its halves in a fixed
/// order.
#[inline(always)]
unsafe fn total(acc: &[__m256; 4]) -> f32 {
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    let v = _mm_add_ss(v, _mm_movehdup_ps(v));
    _mm_cvtss_f32(v)
}

/// `acc += w·x` for `S` rows of one block; row `k`'s 32 values start at
/// `x + k · 32`.
#[inline(always)]
unsafe fn fma_rows<const S: usize>(acc: &mut [[__m256; 4]; S], w: &[__m256; 4], x: *const f32) {
    for (k, a) in acc.iter_mut().enumerate() {
        let p = x.add(k * BLOCK);
        for (i, ai) in a.iter_mut().enumerate() {
            *ai = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(p.add(8 * i)), *ai);
        }
    }
}

/// The 32 codes of 16 bytes of nibbles (low nibbles first) as four
/// registers of 32-bit integers.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> [__m256i; 4] {
    let q = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(15);
    let lo = _mm_and_si128(q, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
    [
        _mm256_cvtepu8_epi32(lo),
        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
        _mm256_cvtepu8_epi32(hi),
        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)),
    ]
}

/// A weight's blocks as registers.
trait Blocks {
    /// Weights per output row / 32.
    fn blocks(&self) -> usize;
    /// The 32 weights of block `b` of output row `o`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `o` and `b` must be in bounds.
    unsafe fn weights(&self, o: usize, b: usize) -> [__m256; 4];
}

/// `S` input rows from `x` (blocks `stride` floats apart) against output
/// row `o`.
#[inline(always)]
unsafe fn rows<const S: usize, W: Blocks>(
    w: &W,
    o: usize,
    x: *const f32,
    stride: usize,
) -> [f32; S] {
    let mut acc = [[_mm256_setzero_ps(); 4]; S];
    for b in 0..w.blocks() {
        let ws = w.weights(o, b);
        fma_rows(&mut acc, &ws, x.add(b * stride));
    }
    let mut out = [0f32; S];
    for (v, a) in out.iter_mut().zip(&acc) {
        *v = total(a);
    }
    out
}

/// Every output row of `w` against every input row of `x` (`avx512::
/// interleave`'s layout, rows of `cols`) into `out` (`[t, outs]`), in
/// groups of up to [`SUB`] input rows inside the layout's groups.
///
/// # Safety
/// [`available`] must be true; `w` must have `outs` rows of `cols`.
#[target_feature(enable = "avx2,fma")]
unsafe fn products<W: Blocks>(w: &W, x: &[f32], cols: usize, out: &mut [f32]) {
    let (nb, t, outs) = call_shape(x, cols, out);
    assert!(cols.is_multiple_of(BLOCK) && w.blocks() == nb);
    assert!(x.len() == t * cols && out.len() == t * outs);
    for o in 0..outs {
        for r0 in (0..t).step_by(GROUP) {
            let g = GROUP.min(t - r0);
            // The group's block b, row k is at `r0·cols + (b·g + k)·32`.
            let xs = x.as_ptr().add(r0 * cols);
            for k0 in (0..g).step_by(SUB) {
                let p = xs.add(k0 * BLOCK);
                let at = (r0 + k0) * outs + o;
                if g - k0 >= SUB {
                    let [a, b] = rows::<SUB, W>(w, o, p, g * BLOCK);
                    out[at] = a;
                    out[at + outs] = b;
                } else {
                    out[at] = rows::<1, W>(w, o, p, g * BLOCK)[0];
                }
            }
        }
    }
}

/// Q4_1 rows: `d·q + m`.
struct Q4_1<'a> {
    quants: &'a [u8],
    scales: &'a [f32],
    mins: &'a [f32],
    nb: usize,
}

impl Blocks for Q4_1<'_> {
    fn blocks(&self) -> usize {
        self.nb
    }

    #[inline(always)]
    unsafe fn weights(&self, o: usize, b: usize) -> [__m256; 4] {
        let at = o * self.nb + b;
        let q = nibbles(self.quants.as_ptr().add(at * 16));
        let d = _mm256_set1_ps(*self.scales.get_unchecked(at));
        let m = _mm256_set1_ps(*self.mins.get_unchecked(at));
        [
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q[0]), m),
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q[1]), m),
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q[2]), m),
            _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q[3]), m),
        ]
    }
}

/// Q8_0 rows: `d·q`, with `per` scales per block (Q8_16: one per 16
/// weights).
struct Q8_0<'a> {
    quants: &'a [u8],
    scales: &'a [f32],
    per: usize,
    nb: usize,
}

impl Blocks for Q8_0<'_> {
    fn blocks(&self) -> usize {
        self.nb
    }

    #[inline(always)]
    unsafe fn weights(&self, o: usize, b: usize) -> [__m256; 4] {
        let at = o * self.nb + b;
        let p = self.quants.as_ptr().add(at * 32);
        let per = self.per;
        let d = [
            _mm256_set1_ps(*self.scales.get_unchecked(at * per)),
            _mm256_set1_ps(*self.scales.get_unchecked(at * per + per - 1)),
        ];
        let mut w = [_mm256_setzero_ps(); 4];
        for (i, wi) in w.iter_mut().enumerate() {
            let d = d[i / 2];
            let q = _mm_loadl_epi64(p.add(8 * i) as *const __m128i);
            *wi = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        }
        w
    }
}

/// NF4 rows: `level[q]·absmax`, one absmax per 64 weights (blocks of 64
/// run on across rows). A code picks its level out of two registers of
/// eight (`vpermps` on each, the code's bit 3 choosing).
struct Nf4<'a> {
    quants: &'a [u8],
    absmax: &'a [f32],
    nb: usize,
    levels: [__m256; 2],
}

impl Blocks for Nf4<'_> {
    fn blocks(&self) -> usize {
        self.nb
    }

    #[inline(always)]
    unsafe fn weights(&self, o: usize, b: usize) -> [__m256; 4] {
        let at = o * self.nb + b;
        let d = _mm256_set1_ps(*self.absmax.get_unchecked(at / 2));
        let q = nibbles(self.quants.as_ptr().add(at * 16));
        let mut w = [_mm256_setzero_ps(); 4];
        for (wi, q) in w.iter_mut().zip(q) {
            let pick = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(q));
            let level = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(self.levels[0], q),
                _mm256_permutevar8x32_ps(self.levels[1], q),
                pick,
            );
            *wi = _mm256_mul_ps(level, d);
        }
        w
    }
}

/// See `q4_1_rows_portable`; `x` comes from `avx512::interleave`.
///
/// # Safety
/// [`available`] must be true.
pub(super) unsafe fn q4_1_rows(
    quants: &[u8],
    scales: &[f32],
    mins: &[f32],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let (nb, _, outs) = call_shape(x, cols, out);
    assert!(quants.len() >= outs * nb * 16 && scales.len() >= outs * nb && mins.len() >= outs * nb);
    let w = Q4_1 {
        quants,
        scales,
        mins,
        nb,
    };
    products(&w, x, cols, out)
}

/// See `q8_0_rows_portable`; `x` comes from `avx512::interleave`.
///
/// # Safety
/// [`available`] must be true.
pub(super) unsafe fn q8_0_rows(
    quants: &[u8],
    scales: &[f32],
    per: usize,
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let (nb, _, outs) = call_shape(x, cols, out);
    assert!(matches!(per, 1 | 2));
    assert!(quants.len() >= outs * nb * 32 && scales.len() >= outs * nb * per);
    products(
        &Q8_0 {
            quants,
            scales,
            per,
            nb,
        },
        x,
        cols,
        out,
    )
}

/// See `nf4_rows_portable`; `x` comes from `avx512::interleave`.
///
/// # Safety
/// [`available`] must be true.
pub(super) unsafe fn nf4_rows(
    quants: &[u8],
    absmax: &[f32],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let (nb, _, outs) = call_shape(x, cols, out);
    assert!(quants.len() >= outs * nb * 16 && absmax.len() >= (outs * nb).div_ceil(2));
    let levels = [
        _mm256_loadu_ps(NF4_LEVELS.as_ptr()),
        _mm256_loadu_ps(NF4_LEVELS.as_ptr().add(8)),
    ];
    products(
        &Nf4 {
            quants,
            absmax,
            nb,
            levels,
        },
        x,
        cols,
        out,
    )
}

#[cfg(test)]
mod tests {
    use super::super::{QuantKind, QuantMatrix, avx512::interleave};
    use super::*;
    use crate::testing::{assert_dense_product, quant_matrices, random};

    /// The kernel for `m`'s kind on `t` rows of `x`.
    fn run(m: &QuantMatrix, x: &[f32], t: usize) -> Vec<f32> {
        let cols = m.cols;
        let grouped = interleave(&x[..t * cols], cols);
        let mut out = vec![f32::NAN; t * m.rows];
        // SAFETY: the callers check `available`.
        unsafe {
            match m.kind {
                QuantKind::Q4_1 => {
                    q4_1_rows(&m.quants, &m.scales, &m.mins, &grouped, cols, &mut out)
                }
                QuantKind::Q8_0 | QuantKind::Q8_16 => {
                    let per = m.kind.scales_per_block();
                    q8_0_rows(&m.quants, &m.scales, per, &grouped, cols, &mut out)
                }
                QuantKind::Nf4 => nf4_rows(&m.quants, &m.scales, &grouped, cols, &mut out),
            }
        }
        out
    }

    #[test]
    fn rows_are_the_dense_products_and_their_own_in_any_batch() {
        if !available() {
            return;
        }
        // Up to two whole groups of the layout and a ragged third; an odd
        // number of blocks per row (NF4's blocks of 64 straddle rows).
        // (Q8_16, read from Q6_K, needs rows of 256.)
        for m in quant_matrices(24, 96)
            .into_iter()
            .chain(quant_matrices(8, 256))
        {
            let (rows, cols) = (m.rows, m.cols);
            let dense = m.dequantize();
            let x = random(&[19, cols], 7, 1.0).flatten_all().unwrap();
            let x = x.to_vec1::<f32>().unwrap();
            let alone: Vec<Vec<f32>> = (0..19).map(|r| run(&m, &x[r * cols..], 1)).collect();
            for t in [1, 2, 3, 8, 9, 19] {
                let y = run(&m, &x, t);
                for r in 0..t {
                    let got = &y[r * rows..(r + 1) * rows];
                    assert_eq!(got, &alone[r][..], "{:?}: row {r} of {t}", m.kind);
                    let row = &x[r * cols..(r + 1) * cols];
                    assert_dense_product(&format!("{:?}", m.kind), got, &dense, row);
                }
            }
        }
    }
}
