//! bf16 products on AVX512-BF16's dot instruction, for CPUs that have it
//! without AMX tiles (AMD Zen 4 and 5): `vdpbf16ps` adds to each of 16 f32
//! sums the products of one pair of bf16 values. The operands are the tile
//! kernel's as they are: a packed column block's line of pairs is one
//! register (16 columns × a pair of the shared dimension), and a left
//! row's pair, broadcast, multiplies it. A block of 8 rows × 3 column
//! blocks (24 registers of sums) stays in registers for the whole shared
//! dimension.

// Every function here is a kernel whose safety is the caller's check of
// the CPU's features plus the length checks in `amx::matmul`.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::TILE;
use super::amx::{Dest, Shapes};

/// Left rows per register block (a tile's 16 rows are two of them).
const ROWS: usize = 8;
/// Column blocks (of 16) per register block.
const BLOCKS: usize = 3;

/// Whether the dot kernel runs here: the features the vectorized panels
/// need (AVX512-BF16, BW, VL) are the ones it needs.
pub(super) fn available() -> bool {
    super::amx::panels_vectorized()
}

/// Rows `rows` (whole tiles of `a`, zero rows past `m`) by column blocks
/// `cols` (`panels[j - cols.start]` is block `j`) of the result, as
/// `amx::task`'s tile loop computes them.
///
/// # Safety
/// [`available`] must be true; `a` holds `rows.end` rows of `s.kp`
/// values, every panel `s.kp · 16` values, and `dest` the result's
/// `s.m · s.n` values.
pub(super) unsafe fn blocks(
    a: &[u16],
    panels: &[*const u16],
    s: Shapes,
    dest: Dest,
    rows: Range<usize>,
    cols: Range<usize>,
) {
    let mut j = cols.start;
    while j < cols.end {
        // Four left make two pairs rather than three and one: a lone
        // column block keeps only 8 sums going, and ran about a quarter
        // slower per product than the wider blocks.
        let left = cols.end - j;
        let take = if left == BLOCKS + 1 {
            2
        } else {
            BLOCKS.min(left)
        };
        let b = &panels[j - cols.start..][..take];
        let next = &panels[j + take - cols.start..][..BLOCKS.min(cols.end - j - take)];
        let passes = (rows.end.min(s.m).saturating_sub(rows.start)).div_ceil(ROWS);
        let mut ahead = Ahead::new(next, s.kp, passes);
        let mut i = rows.start;
        while i < rows.end.min(s.m) {
            ahead.some();
            let at = a.as_ptr().add(i * s.kp);
            match take {
                3 => block::<3>(at, b, s, dest, i, j),
                2 => block::<2>(at, b, s, dest, i, j),
                _ => block::<1>(at, b, s, dest, i, j),
            }
            i += ROWS;
        }
        j += take;
    }
}

/// The next column blocks' lines asked for ahead, a share before each
/// pass of 8 rows over the current blocks: a held weight's blocks come
/// from memory at the first pass over them, faster than memory gives them
/// to one core, while the passes after it find them in cache.
struct Ahead<'a> {
    panels: &'a [*const u16],
    /// 64-byte lines per block, and asked for per pass.
    lines: usize,
    per_pass: usize,
    done: usize,
}

impl<'a> Ahead<'a> {
    fn new(panels: &'a [*const u16], kp: usize, passes: usize) -> Self {
        let lines = kp / 2;
        Self {
            panels,
            lines,
            per_pass: (panels.len() * lines).div_ceil(passes.max(1)),
            done: 0,
        }
    }

    /// The next share into the second-level cache.
    #[inline(always)]
    unsafe fn some(&mut self) {
        let end = (self.done + self.per_pass).min(self.panels.len() * self.lines);
        for at in self.done..end {
            let line = self.panels[at / self.lines].add((at % self.lines) * 2 * TILE);
            _mm_prefetch::<_MM_HINT_T1>(line as *const i8);
        }
        self.done = end;
    }
}

/// Rows `i..i + 8` by column blocks `j..j + C` of the result: the sums in
/// registers over every pair of the shared dimension (from the result's
/// values where `s.add`), then stored where they fall inside the result.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn block<const C: usize>(
    a: *const u16,
    b: &[*const u16],
    s: Shapes,
    dest: Dest,
    i: usize,
    j: usize,
) {
    let mut sums = [[_mm512_setzero_ps(); C]; ROWS];
    if s.add {
        for (r, row) in sums.iter_mut().enumerate().take(s.m - i) {
            for (c, sum) in row.iter_mut().enumerate() {
                let Some((at, mask)) = place(s, i + r, j + c) else {
                    break;
                };
                *sum = _mm512_maskz_loadu_ps(mask, dest.0.add(at));
            }
        }
    }
    for p in 0..s.kp / 2 {
        let mut lines = [_mm512_setzero_si512(); C];
        for (line, panel) in lines.iter_mut().zip(b) {
            *line = _mm512_loadu_si512(panel.add(p * 2 * TILE) as *const __m512i);
        }
        for (r, row) in sums.iter_mut().enumerate() {
            let pair = (a.add(r * s.kp + 2 * p) as *const i32).read_unaligned();
            let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for (sum, line) in row.iter_mut().zip(&lines) {
                *sum =
                    _mm512_dpbf16_ps(*sum, pair, std::mem::transmute::<__m512i, __m512bh>(*line));
            }
        }
    }
    for (r, row) in sums.iter().enumerate().take(s.m - i) {
        for (c, sum) in row.iter().enumerate() {
            let Some((at, mask)) = place(s, i + r, j + c) else {
                break;
            };
            _mm512_mask_storeu_ps(dest.0.add(at), mask, *sum);
        }
    }
}

/// Where row `i`'s 16 sums of column block `j` sit in the result, and the
/// mask of the columns that exist; `None` for a block past the last column.
#[inline(always)]
fn place(s: Shapes, i: usize, j: usize) -> Option<(usize, u16)> {
    let col = j * TILE;
    (col < s.n).then(|| {
        (
            i * s.n + col,
            (u32::MAX >> (32 - TILE.min(s.n - col))) as u16,
        )
    })
}
