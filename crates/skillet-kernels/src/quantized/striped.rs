//! The int8 products of `int8.rs` on AVX512-VNNI for any number of input
//! rows, from a copy of the weight made for the instruction: output rows
//! in stripes of 16, and for each stripe and block one record holding the
//! block's bytes already in the order `vpdpbusd` reads them (lane `o` of
//! every line is output row `o`), then the 16 rows' scales (Q4_1: and
//! minimums, both in f16 as the file holds them, one line for the two).
//! A stripe's blocks are one stream read front to back: no transposes, no
//! gathers. Q8_0 bytes are stored plus 128 (the
//! instruction's left operand is unsigned), and `128·Σq` of the input's
//! block is taken back off each integer sum, which is then exact again.
//! Block sums are scaled and added in block order with fused multiply-adds,
//! as `int8::rows_portable` does, so the bits are the same.
//!
//! Made where the CPU has VNNI, or AVX2 (the kernel of `avx2.rs`, on the
//! same copy): for every int8 product where it has no AMX tiles this
//! process may use (AMD Zen 2 to 5; Intel from Haswell on, but for
//! Sapphire Rapids and later servers), and on AMX
//! machines for products of at most 16 input rows (decode steps), where a
//! tile would hold one useful column of 16.

// Every function here is a kernel whose safety is the caller's check of
// `vnni::available()` (the same instructions) plus the length checks in
// `rows`.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use half::f16;

use super::int8::Int8Rows;
use super::{BLOCK, QuantKind, QuantMatrix, vnni};

/// The [`Groups`] table of a kernel's pass `$group::<G, Q4>`.
macro_rules! passes {
    ($group:ident) => {
        [
            [
                $group::<1, false>,
                $group::<2, false>,
                $group::<3, false>,
                $group::<4, false>,
            ],
            [
                $group::<1, true>,
                $group::<2, true>,
                $group::<3, true>,
                $group::<4, true>,
            ],
        ]
    };
}

mod avx2;

/// Output rows per stripe (one register's lanes).
pub(super) const STRIPE: usize = 16;

/// Input rows whose sums one pass over a stripe's record keeps in
/// registers.
const GROUP: usize = 4;

/// One 64-byte line (records are whole lines, so every load is aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A Q4_1 or Q8_0 matrix's full stripes of 16 output rows, repacked (see
/// the module's comment); rows past the last full stripe are not here.
#[derive(Clone)]
pub(super) struct Striped {
    kind: QuantKind,
    /// Read from Q4_0 blocks (see [`Int8Rows::min_sums`]).
    exact_min_sums: bool,
    /// Full stripes.
    stripes: usize,
    /// Blocks per row.
    nb: usize,
    /// `[stripe][block]` records of [`Striped::record`] lines.
    lines: Vec<Line>,
}

impl std::fmt::Debug for Striped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Striped({:?}, {} stripes)", self.kind, self.stripes)
    }
}

impl Striped {
    /// Lines of a record: the quantized bytes (4 lines for Q4_1's 16 bytes
    /// per row, 8 for Q8_0's 32), then the scales (Q8_0: in f32; Q4_1: in
    /// f16, then the minimums in f16, on one line).
    fn record(kind: QuantKind) -> usize {
        match kind {
            QuantKind::Q4_1 => 4 + 1,
            _ => 8 + 1,
        }
    }

    /// Bytes of quantized values per row and block.
    fn per_row(kind: QuantKind) -> usize {
        match kind {
            QuantKind::Q4_1 => 16,
            _ => 32,
        }
    }

    /// The stripes of `m` (Q4_1 or Q8_0).
    pub(super) fn new(m: &QuantMatrix) -> Self {
        assert!(matches!(m.kind, QuantKind::Q4_1 | QuantKind::Q8_0));
        let (kind, nb) = (m.kind, m.cols / BLOCK);
        let (stripes, per_row, record) = (m.rows / STRIPE, Self::per_row(kind), Self::record(kind));
        let mut lines = vec![Line([0; 64]); stripes * nb * record];
        for s in 0..stripes {
            for b in 0..nb {
                let rec = &mut lines[(s * nb + b) * record..][..record];
                for l in 0..STRIPE {
                    let at = (s * STRIPE + l) * nb + b;
                    let q = &m.quants[at * per_row..][..per_row];
                    // Line j, lane l: bytes 4j..4j + 4 of row l's block.
                    for (j, four) in q.chunks_exact(4).enumerate() {
                        let dst = &mut rec[j].0[4 * l..4 * l + 4];
                        dst.copy_from_slice(four);
                        if kind == QuantKind::Q8_0 {
                            dst.iter_mut().for_each(|v| *v ^= 0x80);
                        }
                    }
                    let last = &mut rec[per_row / 4].0;
                    if kind == QuantKind::Q4_1 {
                        // The file's f16 values, held in f32 by the matrix.
                        let (d, min) = (f16::from_f32(m.scales[at]), f16::from_f32(m.mins[at]));
                        debug_assert_eq!(
                            (d.to_f32().to_bits(), min.to_f32().to_bits()),
                            (m.scales[at].to_bits(), m.mins[at].to_bits())
                        );
                        last[2 * l..2 * l + 2].copy_from_slice(&d.to_le_bytes());
                        last[32 + 2 * l..32 + 2 * l + 2].copy_from_slice(&min.to_le_bytes());
                    } else {
                        last[4 * l..4 * l + 4].copy_from_slice(&m.scales[at].to_le_bytes());
                    }
                }
            }
        }
        Self {
            kind,
            exact_min_sums: m.exact_min_sums(),
            stripes,
            nb,
            lines,
        }
    }

    /// Full stripes held.
    pub(super) fn stripes(&self) -> usize {
        self.stripes
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

/// Whether the CPU runs a kernel on the stripes: AVX512-VNNI's or
/// AVX2's.
pub(super) fn available() -> bool {
    vnni::available() || avx2::available()
}

/// `out[(o - 16·stripes.start)·t + r]` for the output rows of `stripes`
/// and every input row `r` of `x` (equal, bit for bit, to
/// `int8::rows_portable`), on AVX512-VNNI where the CPU has it, else on
/// AVX2.
///
/// # Panics
/// Where [`available`] is false, or the shapes do not agree.
pub(super) fn products(
    w: &Striped,
    x: &Int8Rows,
    stripes: std::ops::Range<usize>,
    out: &mut [f32],
) {
    if vnni::available() {
        // SAFETY: the CPU has the instructions (just checked).
        unsafe { rows(w, x, stripes, out) }
    } else {
        assert!(avx2::available(), "no kernel for the stripes on this CPU");
        // SAFETY: as above.
        unsafe { avx2::rows(w, x, stripes, out) }
    }
}

/// The shapes every kernel on the stripes checks before it reads.
fn check(w: &Striped, x: &Int8Rows, stripes: &std::ops::Range<usize>, out: &[f32]) {
    let t = x.t;
    assert!(stripes.end <= w.stripes && x.nb == w.nb);
    assert!(out.len() >= stripes.len() * STRIPE * t);
    assert!(t == 0 || w.nb == 0 || x.q.len() >= x.value(t - 1, w.nb - 1) + 28 * x.lanes + 4);
}

/// [`products`] on AVX512-VNNI.
///
/// # Safety
/// `vnni::available()` must be true.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows(w: &Striped, x: &Int8Rows, stripes: std::ops::Range<usize>, out: &mut [f32]) {
    each_group(w, x, stripes, out, &GROUPS);
}

/// A kernel's pass over stripe `s` for input rows `r0..` (as many as its
/// place in [`Groups`] says).
type Group = unsafe fn(&Striped, &Int8Rows, usize, usize, &mut [f32]);

/// A kernel's passes: `[Q8_0, Q4_1][input rows - 1]`.
type Groups = [[Group; GROUP]; 2];

/// The VNNI kernel's passes.
const GROUPS: Groups = passes!(group);

/// Runs a kernel's `groups` over `stripes` for every input row, up to
/// [`GROUP`] rows a pass (see [`products`] for the output).
///
/// # Safety
/// The CPU has the instructions of the kernel whose passes `groups` are.
unsafe fn each_group(
    w: &Striped,
    x: &Int8Rows,
    stripes: std::ops::Range<usize>,
    out: &mut [f32],
    groups: &Groups,
) {
    let t = x.t;
    check(w, x, &stripes, out);
    let passes = &groups[usize::from(w.kind == QuantKind::Q4_1)];
    for (i, s) in stripes.enumerate() {
        let out = &mut out[i * STRIPE * t..];
        let mut r0 = 0;
        while r0 < t {
            let g = GROUP.min(t - r0);
            passes[g - 1](w, x, s, r0, out);
            r0 += g;
        }
    }
}

/// Stripe `s` against input rows `r0..r0 + G`: `Q4` for Q4_1 records,
/// else Q8_0's.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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
    let nibble = _mm512_set1_epi8(15);
    let mut acc = [_mm512_setzero_ps(); G];
    // Each row's rounded values of block 0 (see `Int8Rows::q`); block b's
    // are `32·lanes` bytes further on, values 4kk.. `4·lanes·kk`.
    let lanes = x.lanes;
    let xq: [*const i8; G] = std::array::from_fn(|i| x.q.as_ptr().wrapping_add(x.value(r0 + i, 0)));
    for b in 0..nb {
        let rec = w.lines.as_ptr().add((s * nb + b) * record) as *const __m512i;
        let mut weights = [_mm512_setzero_si512(); 8];
        if Q4 {
            // Values 4j.. are the low nibbles of bytes 4j.., values
            // 16 + 4j.. their high nibbles.
            for j in 0..4 {
                let v = _mm512_load_si512(rec.add(j));
                weights[j] = _mm512_and_si512(v, nibble);
                weights[4 + j] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
            }
        } else {
            for (j, wj) in weights.iter_mut().enumerate() {
                *wj = _mm512_load_si512(rec.add(j));
            }
        }
        let last = rec.add(if Q4 { 4 } else { 8 });
        let (scale, min) = if Q4 {
            let both = _mm512_load_si512(last);
            (
                _mm512_cvtph_ps(_mm512_castsi512_si256(both)),
                _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(both)),
            )
        } else {
            (_mm512_load_ps(last as *const f32), _mm512_setzero_ps())
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            let xb = xq[i].add(b * BLOCK * lanes);
            // Four partial sums, so the additions do not wait on each
            // other (integer sums: the order does not change them).
            let mut part = [_mm512_setzero_si512(); 4];
            for (kk, wk) in weights.iter().enumerate() {
                let four = (xb.add(kk * lanes * 4) as *const i32).read_unaligned();
                part[kk % 4] = _mm512_dpbusd_epi32(part[kk % 4], *wk, _mm512_set1_epi32(four));
            }
            let mut sum = _mm512_add_epi32(
                _mm512_add_epi32(part[0], part[1]),
                _mm512_add_epi32(part[2], part[3]),
            );
            let at = x.at(r0 + i, b);
            if !Q4 {
                sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * x.qsum[at]));
            }
            let sc = _mm512_mul_ps(_mm512_set1_ps(x.d[at]), scale);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sc, *acc);
            if Q4 {
                *acc = _mm512_fmadd_ps(min, _mm512_set1_ps(sums[at]), *acc);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let mut v = [0f32; STRIPE];
        _mm512_storeu_ps(v.as_mut_ptr(), *acc);
        for (l, &y) in v.iter().enumerate() {
            out[l * t + r0 + i] = y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::int8::rows_portable;
    use super::*;

    /// Every kernel for the stripes this CPU runs (AVX2's also where
    /// there is VNNI), against the plain loops.
    #[test]
    fn stripes_give_the_plain_loops_bits() {
        type Kernel = unsafe fn(&Striped, &Int8Rows, std::ops::Range<usize>, &mut [f32]);
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        if vnni::available() {
            kernels.push(("VNNI", super::rows));
        }
        if avx2::available() {
            kernels.push(("AVX2", avx2::rows));
        }
        if kernels.is_empty() {
            eprintln!("neither AVX512-VNNI nor AVX2 here: nothing to check");
            return;
        }
        // 3 stripes of 16 and a partial one (not in the copy); 7 blocks.
        let (rows, cols) = (56, 224);
        let mut matrices = crate::testing::quant_matrices(rows, cols);
        matrices.truncate(2);
        // Weights at their widest: Q4_1 nibbles all 15, Q8_0 bytes -128
        // and 127, so that with inputs of ±127 the 16-bit sums are too.
        let blocks = rows * cols / BLOCK;
        let one = half::f16::from_f32(0.5).to_le_bytes();
        let q4: Vec<u8> = (0..blocks)
            .flat_map(|_| [one, one].concat().into_iter().chain([0xff; 16]))
            .collect();
        let q8: Vec<u8> = (0..blocks)
            .flat_map(|b| {
                one.into_iter()
                    .chain((0..32).map(move |i| if (b + i) % 3 == 0 { 0x7f } else { 0x80 }))
            })
            .collect();
        matrices.push(std::sync::Arc::new(
            QuantMatrix::from_ggml(QuantKind::Q4_1, rows, cols, &q4).unwrap(),
        ));
        matrices.push(std::sync::Arc::new(
            QuantMatrix::from_ggml(QuantKind::Q8_0, rows, cols, &q8).unwrap(),
        ));
        for m in &matrices {
            let st = Striped::new(m);
            assert_eq!(st.stripes(), 3);
            for (t, widest) in [1, 2, 3, 4, 5, 9, 17]
                .into_iter()
                .flat_map(|t| [(t, false), (t, true)])
            {
                let x: Vec<f32> = (0..t * cols)
                    .map(|i| match (widest, i / cols % 3) {
                        // Every value rounds to 127 or -127: whole rows of
                        // one sign (Q4_1's 16-bit sums at their largest,
                        // 8 · 2 · 15 · 127), and rows of both.
                        (true, 0) => 1.0,
                        (true, 1) => -1.0,
                        (true, _) if i % 5 < 2 => -1.0,
                        (true, _) => 1.0,
                        (false, _) => ((i * 37 % 101) as f32 - 50.0) * 0.013,
                    })
                    .collect();
                let x = Int8Rows::prepare(&x, cols);
                let mut want = vec![0f32; 48 * t];
                rows_portable(&m.weight_rows(0), &x, 0..48, &mut want);
                for &(name, kernel) in &kernels {
                    let mut got = vec![f32::NAN; 48 * t];
                    // SAFETY: the CPU has the instructions (checked above).
                    unsafe { kernel(&st, &x, 0..3, &mut got) };
                    assert_eq!(got, want, "{name}: {:?}, {t} rows", m.kind);
                    // Stripes from the second on: the output starts there.
                    let mut tail = vec![f32::NAN; 32 * t];
                    // SAFETY: as above.
                    unsafe { kernel(&st, &x, 1..3, &mut tail) };
                    assert_eq!(tail, want[16 * t..], "{name}: {:?}, {t} rows", m.kind);
                }
            }
        }
    }
}
