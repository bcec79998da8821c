//! Quantized products with the input rounded to 8-bit integers, as
//! llama.cpp computes them on the CPU: each input row is cut into blocks
//! of 32 values, rounded to `x ≈ d·q` with `d = max|x| / 127` (held in
//! f16, as llama.cpp holds it) and `q` a signed byte, and every block
//! product is an exact integer dot product scaled by the two block scales.
//! A Q4_1 block's minimum multiplies the block's `d·Σq` (in f16, as
//! llama.cpp's Q8_1 blocks). The sum over blocks runs in a fixed order
//! with fused multiply-adds, so the AMX kernel (`amx.rs`), the VNNI and
//! AVX2 kernels (`striped.rs`: up to 16 rows on AMX machines, any number
//! where there is no AMX) and the portable loop below give the same bits,
//! and a row's result never depends on the rows beside it.

use super::{BLOCK, QuantKind};

/// Input rows per group: one AMX tile's columns.
pub(super) const LANES: usize = 16;

/// Bytes of a group's rounded block (`8 × 16 × 4`): AMX's B operand, where
/// tile row `kk` holds, for each input row `n`, its values `4kk..4kk+4`.
pub(super) const GROUP_BLOCK: usize = BLOCK * LANES;

/// Input rows rounded block by block, in groups of `LANES` rows (the last
/// padded with zero rows), each group `lanes` wide: the rows there are
/// when fewer than `LANES`, so a decode step's single row takes one byte
/// per value, not 16. (The AMX kernels, which read groups of 16 as a
/// tile's columns, run only products of more rows.)
pub(super) struct Int8Rows {
    /// Rows.
    pub t: usize,
    /// Blocks per row.
    pub nb: usize,
    /// Rows a group holds room for: `LANES`, or `t` when smaller.
    pub lanes: usize,
    /// `[group][block][8][lanes][4]` rounded values.
    pub q: Vec<i8>,
    /// `[group][block][lanes]` block scales `d`.
    pub d: Vec<f32>,
    /// `[group][block][lanes]` sums `d·Σq` (in f16), as llama.cpp's Q8_1
    /// blocks hold them: what a Q4_1 block's minimum multiplies.
    pub sums: Vec<f32>,
    /// `[group][block][lanes]` sums `d·Σq` in f32 (`d` the f16 scale):
    /// what a Q4_0 block held as Q4_1 multiplies, so that its product is
    /// llama.cpp's exact `d_w·d_x·Σ(q − 8)·q_x` up to the f32 rounding.
    pub exact_sums: Vec<f32>,
    /// `[group][block][lanes]` integer sums `Σq`.
    pub qsum: Vec<i32>,
}

impl Int8Rows {
    /// Rounds `x` (rows of `cols`).
    pub fn prepare(x: &[f32], cols: usize) -> Self {
        let mut rows = Self {
            t: 0,
            nb: 0,
            lanes: 0,
            q: Vec::new(),
            d: Vec::new(),
            sums: Vec::new(),
            exact_sums: Vec::new(),
            qsum: Vec::new(),
        };
        rows.refill(x, cols);
        rows
    }

    /// [`Int8Rows::prepare`] into these buffers, reusing their room.
    pub fn refill(&mut self, x: &[f32], cols: usize) {
        let t = x.len() / cols;
        let nb = cols / BLOCK;
        let groups = t.div_ceil(LANES);
        let lanes = t.clamp(1, LANES);
        (self.t, self.nb, self.lanes) = (t, nb, lanes);
        // Zeros where a partial group has no row.
        zeroed(&mut self.q, groups * nb * BLOCK * lanes);
        zeroed(&mut self.d, groups * nb * lanes);
        zeroed(&mut self.sums, groups * nb * lanes);
        zeroed(&mut self.exact_sums, groups * nb * lanes);
        zeroed(&mut self.qsum, groups * nb * lanes);
        #[cfg(target_arch = "x86_64")]
        match rounding() {
            // SAFETY: the CPU has the instructions (`rounding()`).
            Rounding::Avx512 => unsafe { self.fill_avx512(x, cols) },
            // SAFETY: as above.
            Rounding::Avx2 => unsafe { self.fill_avx2(x, cols) },
            Rounding::Portable => self.fill_portable(x, cols),
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.fill_portable(x, cols);
    }

    /// [`Int8Rows::prepare`]'s rounding with plain loops.
    fn fill_portable(&mut self, x: &[f32], cols: usize) {
        for r in 0..self.t {
            for b in 0..self.nb {
                let v = x[r * cols + b * BLOCK..][..BLOCK]
                    .try_into()
                    .expect("a block");
                self.put(r, b, round_portable(v));
            }
        }
    }

    /// [`Int8Rows::prepare`]'s rounding on AVX-512 and F16C: the same bits
    /// as [`Int8Rows::fill_portable`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn fill_avx512(&mut self, x: &[f32], cols: usize) {
        for r in 0..self.t {
            for b in 0..self.nb {
                let v = x[r * cols + b * BLOCK..][..BLOCK]
                    .try_into()
                    .expect("a block");
                // SAFETY: this function's instructions.
                self.put(r, b, unsafe { round_avx512(v) });
            }
        }
    }

    /// [`Int8Rows::prepare`]'s rounding on AVX2 and F16C: the same bits
    /// as [`Int8Rows::fill_portable`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn fill_avx2(&mut self, x: &[f32], cols: usize) {
        for r in 0..self.t {
            for b in 0..self.nb {
                let v = x[r * cols + b * BLOCK..][..BLOCK]
                    .try_into()
                    .expect("a block");
                // SAFETY: this function's instructions.
                self.put(r, b, unsafe { round_avx2(v) });
            }
        }
    }

    /// Stores row `r`'s rounded block `b`.
    #[inline(always)]
    fn put(&mut self, r: usize, b: usize, block: Rounded) {
        let at = self.at(r, b);
        self.d[at] = block.d;
        self.sums[at] = block.sum;
        self.exact_sums[at] = block.d * block.qsum as f32;
        self.qsum[at] = block.qsum;
        let first = self.value(r, b);
        for kk in 0..BLOCK / 4 {
            self.q[first + kk * self.lanes * 4..][..4]
                .copy_from_slice(&block.q[4 * kk..4 * kk + 4]);
        }
    }

    /// Row `r`'s rounded values of block `b`.
    fn block(&self, r: usize, b: usize) -> [i8; BLOCK] {
        let first = self.value(r, b);
        std::array::from_fn(|k| self.q[first + (k / 4) * self.lanes * 4 + k % 4])
    }

    /// The sums a Q4_1 weight's minimums multiply: [`Int8Rows::exact_sums`]
    /// for a weight read from Q4_0 blocks, else [`Int8Rows::sums`].
    pub fn min_sums(&self, exact: bool) -> &[f32] {
        if exact { &self.exact_sums } else { &self.sums }
    }

    /// Index of row `r`'s scale and sums of block `b`.
    pub fn at(&self, r: usize, b: usize) -> usize {
        ((r / LANES) * self.nb + b) * self.lanes + r % LANES
    }

    /// Index in `q` of row `r`'s first rounded value of block `b`; values
    /// `4kk..4kk + 4` are `4·lanes·kk` further on.
    pub fn value(&self, r: usize, b: usize) -> usize {
        let n = r % LANES;
        (self.at(r, b) - n) * BLOCK + 4 * n
    }
}

/// `v` as `n` zeros, in the room it has.
fn zeroed<T: Default + Copy>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::default());
}

/// One block rounded (see [`round_block`]).
struct Rounded {
    /// The scale `max|v| / 127`, held in f16.
    d: f32,
    /// `d·Σq` held in f16 (`d` before its rounding).
    sum: f32,
    /// `Σq`.
    qsum: i32,
    q: [i8; BLOCK],
}

/// One block's values rounded to `q = round(v · 127/max|v|)` (ties to
/// even), its scale `max|v| / 127` held in f16, and the sum `d·Σq` held in
/// f16 (`d` before its rounding), as llama.cpp's Q8_0 / Q8_1 blocks hold
/// them.
pub(crate) fn round_block(v: &[f32; BLOCK]) -> (f32, f32, [i8; BLOCK]) {
    #[cfg(target_arch = "x86_64")]
    let block = match rounding() {
        // SAFETY: the CPU has the instructions (`rounding()`).
        Rounding::Avx512 => unsafe { round_avx512(v) },
        // SAFETY: as above.
        Rounding::Avx2 => unsafe { round_avx2(v) },
        Rounding::Portable => round_portable(v),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let block = round_portable(v);
    (block.d, block.sum, block.q)
}

/// `127 / amax`, or 0 where that is not finite: a zero block, and one so
/// small (below about 4e-37) that its scale is 0 in f16 anyway, round to
/// zeros alike in every rounding (an infinite factor would give ±127 in
/// plain loops and -128 in registers). Inputs are taken to be finite.
#[inline(always)]
fn inverse_scale(amax: f32) -> f32 {
    let inv = 127.0 / amax;
    if amax > 0.0 && inv.is_finite() {
        inv
    } else {
        0.0
    }
}

/// [`round_block`] with plain loops.
fn round_portable(v: &[f32; BLOCK]) -> Rounded {
    let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
    let inv = inverse_scale(amax);
    let mut q = [0i8; BLOCK];
    for (q, &a) in q.iter_mut().zip(v) {
        *q = (a * inv).round_ties_even() as i8;
    }
    let d = amax / 127.0;
    let qsum: i32 = q.iter().map(|&x| x as i32).sum();
    let f16 = |x: f32| half::f16::from_f32(x).to_f32();
    Rounded {
        d: f16(d),
        sum: f16(d * qsum as f32),
        qsum,
        q,
    }
}

/// Which of the roundings, all giving the same bits, the CPU runs fastest.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rounding {
    /// [`round_avx512`].
    Avx512,
    /// [`round_avx2`].
    Avx2,
    /// [`round_portable`] (its `round_ties_even` is a library call where
    /// the build does not assume SSE4.1).
    Portable,
}

/// The rounding this CPU runs.
#[cfg(target_arch = "x86_64")]
fn rounding() -> Rounding {
    use std::arch::is_x86_feature_detected as has;
    if !has!("f16c") {
        Rounding::Portable
    } else if has!("avx512f") {
        Rounding::Avx512
    } else if has!("avx2") {
        Rounding::Avx2
    } else {
        Rounding::Portable
    }
}

/// An f32 through f16 and back, rounding to nearest, ties to even (as
/// `half::f16::from_f32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
fn through_f16(x: f32) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
        _mm_set_ss(x),
    )))
}

/// [`round_portable`] in registers: the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn round_avx512(v: &[f32; BLOCK]) -> Rounded {
    use std::arch::x86_64::*;
    // SAFETY: the CPU has AVX-512F and F16C (the caller's check); `v` and
    // `q` hold 32 values.
    unsafe {
        let lo = _mm512_loadu_ps(v.as_ptr());
        let hi = _mm512_loadu_ps(v.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let inv = _mm512_set1_ps(inverse_scale(amax));
        // Conversion rounds to nearest, ties to even (the default mode).
        let il = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
        let ih = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
        let qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(il, ih));
        let mut q = [0i8; BLOCK];
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(il));
        _mm_storeu_si128(
            q.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtepi32_epi8(ih),
        );
        let d = amax / 127.0;
        Rounded {
            d: through_f16(d),
            sum: through_f16(d * qsum as f32),
            qsum,
            q,
        }
    }
}

/// [`round_portable`] in AVX2 registers: the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn round_avx2(v: &[f32; BLOCK]) -> Rounded {
    use std::arch::x86_64::*;
    // SAFETY: the CPU has AVX2 and F16C (the caller's check); `v` and `q`
    // hold 32 values.
    unsafe {
        let p = v.as_ptr();
        let parts = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k)));
        let sign = _mm256_set1_ps(-0.0);
        let abs = parts.map(|x| _mm256_andnot_ps(sign, x));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        // The largest of the eight lanes (a maximum: any order).
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let inv = _mm256_set1_ps(inverse_scale(amax));
        // Conversion rounds to nearest, ties to even (the default mode).
        let i = parts.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, inv)));
        let total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let total = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256::<1>(total),
        );
        let total = _mm_hadd_epi32(total, total);
        let qsum = _mm_cvtsi128_si32(_mm_hadd_epi32(total, total));
        // Narrowed by saturating packs (the values are within ±127), which
        // interleave the 128-bit halves; the permutation puts them back.
        let words = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut q = [0i8; BLOCK];
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
        let d = amax / 127.0;
        Rounded {
            d: through_f16(d),
            sum: through_f16(d * qsum as f32),
            qsum,
            q,
        }
    }
}

/// The weight blocks of output rows `o0..` (`quants`, `scales`, `mins`
/// start at row `o0`), as `QuantMatrix` keeps them.
pub(super) struct WeightRows<'a> {
    pub kind: QuantKind,
    pub quants: &'a [u8],
    pub scales: &'a [f32],
    pub mins: &'a [f32],
    /// Read from Q4_0 blocks: the minimums multiply exact sums
    /// ([`Int8Rows::min_sums`]).
    pub exact_min_sums: bool,
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
            QuantKind::Nf4 | QuantKind::Q8_16 => {
                unreachable!("NF4 and Q6_K products take f32 activations")
            }
        }
    }
}

/// `out[o·t + r] = Σ_b i·(d_x·d_w) + m·Σx` over output rows `o_range`
/// (relative to `w`), with plain loops: the definition the AMX, VNNI and
/// AVX2 kernels match bit for bit, and the path for rows they leave (and
/// where the CPU has none of them).
pub(super) fn rows_portable(
    w: &WeightRows,
    x: &Int8Rows,
    o_range: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let nb = x.nb;
    let sums = x.min_sums(w.exact_min_sums);
    for o in o_range {
        for r in 0..x.t {
            let mut acc = 0f32;
            for b in 0..nb {
                let (wq, xq) = (w.block(o, b, nb), x.block(r, b));
                let dot: i32 = wq.iter().zip(&xq).map(|(&a, &q)| a * q as i32).sum();
                let at = x.at(r, b);
                acc = (dot as f32).mul_add(x.d[at] * w.scales[o * nb + b], acc);
                if w.kind == QuantKind::Q4_1 {
                    acc = w.mins[o * nb + b].mul_add(sums[at], acc);
                }
            }
            out[o * x.t + r] = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks that test the rounding's edges: random ones of many sizes,
    /// zeros, exact ties, one large value among small ones, and values
    /// whose scale is an f16 subnormal or flushes to zero.
    fn edge_blocks() -> Vec<[f32; BLOCK]> {
        let x = crate::testing::random(&[64, BLOCK], 5, 1.0)
            .to_vec2::<f32>()
            .unwrap();
        let mut blocks: Vec<[f32; BLOCK]> = x
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let scale = 10f32.powi(i as i32 % 13 - 8);
                std::array::from_fn(|k| row[k] * scale)
            })
            .collect();
        blocks.push([0.0; BLOCK]);
        // max 127: every value `k + 0.5` is a tie.
        blocks.push(std::array::from_fn(|k| match k {
            0 => 127.0,
            _ => k as f32 - 15.5,
        }));
        blocks.push(std::array::from_fn(|k| if k == 7 { -3e4 } else { 1e-3 }));
        blocks.push(std::array::from_fn(|k| (k as f32 - 16.0) * 1e-7));
        blocks.push(std::array::from_fn(|k| (k as f32 - 16.0) * 1e-12));
        // So small that 127 / max|v| is infinite, or just finite.
        blocks.push(std::array::from_fn(|k| (k as f32 - 16.0) * 1e-39));
        blocks.push(std::array::from_fn(|k| (k as f32 - 16.0) * 3e-38));
        blocks
    }

    /// Every rounding in registers this CPU runs (AVX2's also where there
    /// is AVX-512), block by block and for whole rows.
    #[test]
    fn rounding_in_registers_gives_the_plain_loops_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            type Round = unsafe fn(&[f32; BLOCK]) -> Rounded;
            type Fill = unsafe fn(&mut Int8Rows, &[f32], usize);
            let mut ways: Vec<(&str, Round, Fill)> = Vec::new();
            if has!("avx512f") && has!("f16c") {
                ways.push(("AVX-512", round_avx512, Int8Rows::fill_avx512));
            }
            if has!("avx2") && has!("f16c") {
                ways.push(("AVX2", round_avx2, Int8Rows::fill_avx2));
            }
            if ways.is_empty() {
                eprintln!("neither AVX-512 nor AVX2 with F16C here: only the plain loops run");
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (name, round, fill) in ways {
                for v in edge_blocks() {
                    // SAFETY: the CPU has the instructions (checked above).
                    let (a, b) = (round_portable(&v), unsafe { round(&v) });
                    assert_eq!(
                        (a.d.to_bits(), a.sum.to_bits(), a.qsum, a.q),
                        (b.d.to_bits(), b.sum.to_bits(), b.qsum, b.q),
                        "{name}: {v:?}"
                    );
                }
                // Whole rows: 17 rows of 4 blocks (a full group of 16 and a
                // partial one).
                let x: Vec<f32> = edge_blocks().into_iter().take(68).flatten().collect();
                let mut wide = Int8Rows::prepare(&x, 4 * BLOCK);
                wide.q.fill(0);
                // SAFETY: as above.
                unsafe { fill(&mut wide, &x, 4 * BLOCK) };
                let mut plain = Int8Rows::prepare(&x, 4 * BLOCK);
                plain.q.fill(0);
                plain.fill_portable(&x, 4 * BLOCK);
                assert_eq!(wide.q, plain.q, "{name}");
                assert_eq!(wide.qsum, plain.qsum, "{name}");
                assert_eq!(bits(&wide.d), bits(&plain.d), "{name}");
                assert_eq!(bits(&wide.sums), bits(&plain.sums), "{name}");
                assert_eq!(bits(&wide.exact_sums), bits(&plain.exact_sums), "{name}");
            }
        }
    }

    #[test]
    fn a_block_rounds_to_llama_cpp_q8_values() {
        let v: [f32; BLOCK] = std::array::from_fn(|k| match k {
            0 => 127.0,
            _ => k as f32 - 15.5,
        });
        let (d, sum, q) = round_block(&v);
        assert_eq!(d, 1.0);
        // Ties to even: -15.5 → -16, -14.5 → -14, 0.5 → 0, 1.5 → 2.
        assert_eq!(&q[..4], &[127, -14, -14, -12]);
        assert_eq!(q[16], 0);
        assert_eq!(q[17], 2);
        let total: i32 = q.iter().map(|&x| x as i32).sum();
        assert_eq!(sum, total as f32);
    }
}
