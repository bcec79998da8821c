//! Quantized products with the input rounded to 8-bit integers, as
//! llama.cpp computes them on the CPU: each input row is cut into blocks
//! of 32 values, rounded to `x ≈ d·q` with `d = max|x| / 127` (held in
//! f16, as llama.cpp holds it) and `q` a signed byte, and every block
//! product is an exact integer dot product scaled by the two block scales.
//! A Q4_1 block's minimum multiplies the block's `d·Σq` (in f16, as
//! llama.cpp's Q8_1 blocks). The sum over blocks runs in a fixed order
//! with fused multiply-adds, so the AMX kernel (`amx.rs`), the VNNI
//! kernels (`vnni.rs` for a few rows on AMX machines, `striped.rs` for any
//! number where there is no AMX) and the portable loop below give the same
//! bits, and a row's result never depends on the rows beside it.

use super::{BLOCK, QuantKind};

/// Input rows per group: one AMX tile's columns.
pub(super) const LANES: usize = 16;

/// Bytes of a group's rounded block (`8 × 16 × 4`): AMX's B operand, where
/// tile row `kk` holds, for each input row `n`, its values `4kk..4kk+4`.
pub(super) const GROUP_BLOCK: usize = BLOCK * LANES;

/// Input rows rounded block by block, in groups of `LANES` rows (the last
/// padded with zero rows).
pub(super) struct Int8Rows {
    /// Rows.
    pub t: usize,
    /// Blocks per row.
    pub nb: usize,
    /// `[group][block][8][LANES][4]` rounded values.
    pub q: Vec<i8>,
    /// `[group][block][LANES]` block scales `d`.
    pub d: Vec<f32>,
    /// `[group][block][LANES]` sums `d·Σq` (in f16).
    pub sums: Vec<f32>,
    /// `[group][block][LANES]` integer sums `Σq`.
    pub qsum: Vec<i32>,
}

impl Int8Rows {
    /// Rounds `x` (rows of `cols`).
    pub fn prepare(x: &[f32], cols: usize) -> Self {
        let t = x.len() / cols;
        let nb = cols / BLOCK;
        let groups = t.div_ceil(LANES);
        let mut rows = Self {
            t,
            nb,
            q: vec![0; groups * nb * GROUP_BLOCK],
            d: vec![0.0; groups * nb * LANES],
            sums: vec![0.0; groups * nb * LANES],
            qsum: vec![0; groups * nb * LANES],
        };
        for r in 0..t {
            for b in 0..nb {
                let v: &[f32; BLOCK] = x[r * cols + b * BLOCK..][..BLOCK]
                    .try_into()
                    .expect("a block");
                let at = rows.at(r, b);
                let (d, sum, q) = round_block(v);
                rows.d[at] = d;
                rows.sums[at] = sum;
                rows.qsum[at] = q.iter().map(|&v| v as i32).sum();
                let tile = &mut rows.q[(at - at % LANES) * BLOCK..][..GROUP_BLOCK];
                let n = r % LANES;
                for (kk, four) in q.chunks_exact(4).enumerate() {
                    tile[kk * LANES * 4 + n * 4..][..4].copy_from_slice(four);
                }
            }
        }
        rows
    }

    /// Row `r`'s rounded values of block `b`.
    fn block(&self, r: usize, b: usize) -> [i8; BLOCK] {
        let (g, n) = (r / LANES, r % LANES);
        let tile = &self.q[(g * self.nb + b) * GROUP_BLOCK..];
        std::array::from_fn(|k| tile[(k / 4) * LANES * 4 + n * 4 + k % 4])
    }

    /// Index of row `r`'s scale and sums of block `b`.
    pub fn at(&self, r: usize, b: usize) -> usize {
        ((r / LANES) * self.nb + b) * LANES + r % LANES
    }
}

/// One block's values rounded to `q = round(v · 127/max|v|)` (ties to
/// even), its scale `max|v| / 127` held in f16, and the sum `d·Σq` held in
/// f16 (`d` before its rounding), as llama.cpp's Q8_0 / Q8_1 blocks hold
/// them.
pub(crate) fn round_block(v: &[f32; BLOCK]) -> (f32, f32, [i8; BLOCK]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        let (amax, q) = unsafe { round_block_avx512(v) };
        return scales(amax, q);
    }
    let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (q, &a) in q.iter_mut().zip(v) {
        *q = (a * inv).round_ties_even() as i8;
    }
    scales(amax, q)
}

/// The block's f16 scale and sum (see [`round_block`]).
fn scales(amax: f32, q: [i8; BLOCK]) -> (f32, f32, [i8; BLOCK]) {
    let d = amax / 127.0;
    let total: i32 = q.iter().map(|&x| x as i32).sum();
    let f16 = |x: f32| half::f16::from_f32(x).to_f32();
    (f16(d), f16(d * total as f32), q)
}

/// [`round_block`]'s largest magnitude and rounded values, in two
/// registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_block_avx512(v: &[f32; BLOCK]) -> (f32, [i8; BLOCK]) {
    use std::arch::x86_64::*;
    // SAFETY: the CPU has AVX-512F (the caller's check); `v` and `q` hold
    // 32 values.
    unsafe {
        let lo = _mm512_loadu_ps(v.as_ptr());
        let hi = _mm512_loadu_ps(v.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let mut q = [0i8; BLOCK];
        // Conversion rounds to nearest, ties to even (the default mode).
        let ql = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)));
        let qh = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)));
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, ql);
        _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, qh);
        (amax, q)
    }
}

/// The weight blocks of output rows `o0..` (`quants`, `scales`, `mins`
/// start at row `o0`), as `QuantMatrix` keeps them.
pub(super) struct WeightRows<'a> {
    pub kind: QuantKind,
    pub quants: &'a [u8],
    pub scales: &'a [f32],
    pub mins: &'a [f32],
}

impl WeightRows<'_> {
    /// Output row `o`'s integer values of block `b` (Q4_1: `0..16`).
    fn block(&self, o: usize, b: usize, nb: usize) -> [i32; BLOCK] {
        match self.kind {
            QuantKind::Q4_1 => {
                let q = &self.quants[(o * nb + b) * 16..(o * nb + b + 1) * 16];
                std::array::from_fn(|k| {
                    if k < 16 {
                        (q[k] & 15) as i32
                    } else {
                        (q[k - 16] >> 4) as i32
                    }
                })
            }
            QuantKind::Q8_0 => {
                let q = &self.quants[(o * nb + b) * 32..(o * nb + b + 1) * 32];
                std::array::from_fn(|k| q[k] as i8 as i32)
            }
            QuantKind::Nf4 => unreachable!("NF4 products take f32 activations"),
        }
    }
}

/// `out[o·t + r] = Σ_b i·(d_x·d_w) + m·Σx` over output rows `o_range`
/// (relative to `w`), with plain loops: the definition the AMX and VNNI
/// kernels match bit for bit, and the path for rows they leave (and where
/// the CPU has neither).
pub(super) fn rows_portable(
    w: &WeightRows,
    x: &Int8Rows,
    o_range: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let nb = x.nb;
    for o in o_range {
        for r in 0..x.t {
            let mut acc = 0f32;
            for b in 0..nb {
                let (wq, xq) = (w.block(o, b, nb), x.block(r, b));
                let dot: i32 = wq.iter().zip(&xq).map(|(&a, &q)| a * q as i32).sum();
                let at = x.at(r, b);
                acc = (dot as f32).mul_add(x.d[at] * w.scales[o * nb + b], acc);
                if w.kind == QuantKind::Q4_1 {
                    acc = w.mins[o * nb + b].mul_add(x.sums[at], acc);
                }
            }
            out[o * x.t + r] = acc;
        }
    }
}
