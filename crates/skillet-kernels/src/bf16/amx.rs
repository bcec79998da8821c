//! bf16 products on Intel AMX tiles: a block of up to 32 × 32 results
//! stays in four f32 tiles (tmm0..3) while `tdpbf16ps` adds 32 positions
//! of the shared dimension at a time from two tiles of left rows (tmm4,
//! tmm5) and two of packed right columns (tmm6, tmm7). AMX instructions go
//! through `asm!` (their intrinsics are not stable Rust).

// Every function here is a kernel whose safety is the caller's check of
// `bf16_accelerated()` plus the length checks in `matmul`.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::asm;

use rayon::prelude::*;

use super::{KSTEP, Panels, TILE};
use crate::tiles::TileConfig;

/// Left rows per parallel task.
const TASK_ROWS: usize = 256;
/// Column blocks (of 16) per parallel task: whole groups of three for the
/// dot kernel (a task of 8 ran a third of its blocks two at a time) and
/// whole pairs for the tiles.
const TASK_BLOCKS: usize = 6;

/// Computed column blocks made at a time (see `task`): whole pairs for the
/// tiles and whole groups of three for the dot kernel.
const MADE_BLOCKS: usize = 6;

/// All eight tiles 16 rows × 64 bytes (16 f32 results, or 32 bf16 of a
/// left row, or 16 bf16 pairs).
const CONFIG: TileConfig = TileConfig::new(&[(TILE as u8, 64); 8]);

thread_local! {
    /// Each thread's buffer for the column blocks its tasks make.
    static MADE: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The destination, shared by tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
pub(super) struct Dest(pub(super) *mut f32);
// SAFETY: tasks write disjoint blocks (see `matmul`).
unsafe impl Send for Dest {}
// SAFETY: as above.
unsafe impl Sync for Dest {}

/// The shapes every task reads.
#[derive(Clone, Copy)]
pub(super) struct Shapes {
    /// Valid rows and columns of the result.
    pub(super) m: usize,
    pub(super) n: usize,
    /// Padded shared dimension.
    pub(super) kp: usize,
    /// Whether the products are added to what the result holds.
    pub(super) add: bool,
}

/// `out` (`[m, n]`, `out_len` values from `out`) = `a` (`[⌈m/16⌉·16, kp]`
/// bf16, zero-padded) times the right operand `b`, by column blocks, on
/// the tiles (`tiles`) or with AVX512-BF16's dot products (`dots.rs`; the
/// tasks and operands are the same). Every one of the `m · n` results is
/// written (through the pointer, so `out` may be memory not yet
/// initialized) and none is read; where `add`, the products are added to
/// the values `out` holds (then all initialized). On the thread pool where
/// `parallel`, else on this thread.
///
/// # Safety
/// The CPU must have the chosen kernel's features (`bf16::kernel()`), and
/// `out` be valid for `out_len` f32 writes.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    a: &[u16],
    m: usize,
    kp: usize,
    b: &dyn Panels,
    out: *mut f32,
    out_len: usize,
    parallel: bool,
    tiles: bool,
    add: bool,
) {
    let n = b.n();
    let mp = m.next_multiple_of(TILE);
    let blocks = n.div_ceil(TILE);
    assert!(kp.is_multiple_of(KSTEP) && kp >= b.k());
    assert!(a.len() >= mp * kp && out_len >= m * n);
    let shapes = Shapes { m, n, kp, add };
    // Computed column blocks are made once per product: a task takes every
    // row and a share of the blocks (an even number, for the 2 × 2 tiles).
    let (task_rows, task_blocks) = if !parallel {
        (mp, blocks.next_multiple_of(2))
    } else if b.computed() {
        let share = blocks.div_ceil(4 * rayon::current_num_threads());
        (mp, share.next_multiple_of(2))
    } else {
        (TASK_ROWS, TASK_BLOCKS)
    };
    let tasks: Vec<(usize, usize)> = (0..mp)
        .step_by(task_rows)
        .flat_map(|r| (0..blocks).step_by(task_blocks).map(move |j| (r, j)))
        .collect();
    let dest = Dest(out);
    let run = |&(r0, j0): &(usize, usize)| {
        let rows = r0..(r0 + task_rows).min(mp);
        let cols = j0..(j0 + task_blocks).min(blocks);
        // SAFETY: the caller's promise; each task writes only its rows and
        // column blocks of `out`.
        unsafe { task(a, b, shapes, dest, rows, cols, tiles) };
    };
    if parallel {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// Rows `rows` (whole tiles) by column blocks `cols` of the result.
unsafe fn task(
    a: &[u16],
    b: &dyn Panels,
    s: Shapes,
    dest: Dest,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    tiles: bool,
) {
    let run = |panels: &[*const u16], cols: std::ops::Range<usize>| {
        if tiles {
            tile_blocks(a, panels, s, dest, rows.clone(), cols);
        } else {
            super::dots::blocks(a, panels, s, dest, rows.clone(), cols);
        }
    };
    if !b.computed() {
        let panels: Vec<*const u16> = cols
            .clone()
            .map(|j| b.panel(j, &mut []))
            .map(<[u16]>::as_ptr)
            .collect();
        run(&panels, cols);
        return;
    }
    // Computed blocks are made a few at a time into this thread's buffer
    // (reused from product to product) and every row passes over them
    // while they are in cache, where making all of a task's blocks first
    // (megabytes for a large weight) sent them out to memory and back.
    // Only the padding of the shared dimension is zeroed (it must read as
    // zero), since a block writes every position below `k`.
    let size = s.kp * TILE;
    let pad = (b.k() / 2) * TILE * 2;
    let mut made = MADE.take();
    made.resize(MADE_BLOCKS.min(cols.len()) * size, 0);
    for c0 in cols.clone().step_by(MADE_BLOCKS) {
        let chunk = c0..(c0 + MADE_BLOCKS).min(cols.end);
        let panels: Vec<*const u16> = made
            .chunks_mut(size)
            .zip(chunk.clone())
            .map(|(buf, j)| {
                buf[pad..].fill(0);
                b.panel(j, buf).as_ptr()
            })
            .collect();
        run(&panels, chunk);
    }
    crate::reused::hand_back(&MADE, made);
}

/// Rows `rows` (whole tiles) by column blocks `cols` (`panels[j -
/// cols.start]` is block `j`) of the result on the tiles.
unsafe fn tile_blocks(
    a: &[u16],
    panels: &[*const u16],
    s: Shapes,
    dest: Dest,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    let steps = s.kp / KSTEP;
    let lda = s.kp * 2; // bytes per left row
    // Rows in chunks that stay in cache while every block passes over them.
    for r0 in rows.clone().step_by(TASK_ROWS) {
        let r1 = (r0 + TASK_ROWS).min(rows.end);
        let mut j = cols.start;
        while j < cols.end {
            let two_cols = j + 1 < cols.end;
            let b0 = panels[j - cols.start];
            // Read only where a second block exists.
            let b1 = if two_cols {
                panels[j + 1 - cols.start]
            } else {
                b0
            };
            let mut i = r0;
            while i < r1 {
                let two_rows = i + TILE < r1;
                let a0 = a.as_ptr().add(i * s.kp);
                let a1 = a0.wrapping_add(TILE * s.kp);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for k in 0..steps {
                    // One step: 32 positions, i.e. 16 packed pairs (1 KiB) of
                    // each column block, 64 bytes of each left row.
                    let (ak0, ak1) = (a0.add(k * KSTEP), a1.wrapping_add(k * KSTEP));
                    let (bk0, bk1) = (b0.add(k * KSTEP * TILE), b1.add(k * KSTEP * TILE));
                    match (two_rows, two_cols) {
                        (true, true) => asm!(
                            "tileloadd tmm4, [{a0} + {lda}]",
                            "tileloadd tmm5, [{a1} + {lda}]",
                            "tileloadd tmm6, [{b0} + {ldb}]",
                            "tileloadd tmm7, [{b1} + {ldb}]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) ak0, a1 = in(reg) ak1, lda = in(reg) lda,
                            b0 = in(reg) bk0, b1 = in(reg) bk1, ldb = in(reg) 64usize,
                            options(nostack, readonly)
                        ),
                        (true, false) => asm!(
                            "tileloadd tmm4, [{a0} + {lda}]",
                            "tileloadd tmm5, [{a1} + {lda}]",
                            "tileloadd tmm6, [{b0} + {ldb}]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            a0 = in(reg) ak0, a1 = in(reg) ak1, lda = in(reg) lda,
                            b0 = in(reg) bk0, ldb = in(reg) 64usize,
                            options(nostack, readonly)
                        ),
                        (false, true) => asm!(
                            "tileloadd tmm4, [{a0} + {lda}]",
                            "tileloadd tmm6, [{b0} + {ldb}]",
                            "tileloadd tmm7, [{b1} + {ldb}]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            a0 = in(reg) ak0, lda = in(reg) lda,
                            b0 = in(reg) bk0, b1 = in(reg) bk1, ldb = in(reg) 64usize,
                            options(nostack, readonly)
                        ),
                        (false, false) => asm!(
                            "tileloadd tmm4, [{a0} + {lda}]",
                            "tileloadd tmm6, [{b0} + {ldb}]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            a0 = in(reg) ak0, lda = in(reg) lda,
                            b0 = in(reg) bk0, ldb = in(reg) 64usize,
                            options(nostack, readonly)
                        ),
                    }
                }
                store(s, dest, i, j, 0);
                if two_cols {
                    store(s, dest, i, j + 1, 1);
                }
                if two_rows {
                    store(s, dest, i + TILE, j, 2);
                    if two_cols {
                        store(s, dest, i + TILE, j + 1, 3);
                    }
                }
                i += if two_rows { 2 * TILE } else { TILE };
            }
            j += if two_cols { 2 } else { 1 };
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Stores result tile `tmm{t}` as rows `i..i + 16`, column block `j` of
/// the result, through a buffer where the tile hangs over its edge.
#[inline(always)]
unsafe fn store(s: Shapes, dest: Dest, i: usize, j: usize, t: usize) {
    let c = j * TILE;
    if !s.add && i + TILE <= s.m && c + TILE <= s.n {
        store_at(t, dest.0.add(i * s.n + c), s.n * 4);
        return;
    }
    #[repr(C, align(64))]
    struct Buf([f32; TILE * TILE]);
    let mut buf = Buf([0.0; TILE * TILE]);
    store_at(t, buf.0.as_mut_ptr(), TILE * 4);
    for r in 0..TILE.min(s.m.saturating_sub(i)) {
        for cc in 0..TILE.min(s.n - c) {
            let at = dest.0.add((i + r) * s.n + c + cc);
            let base = if s.add { *at } else { 0.0 };
            *at = base + buf.0[r * TILE + cc];
        }
    }
}

/// Stores tile `tmm{t}` as 16 rows of 64 bytes from `ptr`, `stride` bytes
/// apart.
#[inline(always)]
unsafe fn store_at(t: usize, ptr: *mut f32, stride: usize) {
    macro_rules! stored {
        ($t:literal) => {
            asm!(
                concat!("tilestored [{p} + {s}], ", $t),
                p = in(reg) ptr, s = in(reg) stride,
                options(nostack)
            )
        };
    }
    match t {
        0 => stored!("tmm0"),
        1 => stored!("tmm1"),
        2 => stored!("tmm2"),
        _ => stored!("tmm3"),
    }
}

/// `src` rounded to bf16 (nearest, ties to even) into `dst`, 16 at a time
/// with `vcvtneps2bf16` where the CPU has AVX512-BF16 (the tiles read bf16
/// subnormals as zero either way), else one by one.
pub(super) fn round_row(src: &[f32], dst: &mut [u16]) {
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { round_row_avx512(src, dst) };
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = super::to_bf16(x);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 16 * 16;
    for i in (0..whole).step_by(16) {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
    }
    for i in whole..n {
        dst[i] = super::to_bf16(src[i]);
    }
}

/// `dst` (rows `kp` apart) = `x`ᵀ rounded to bf16 for `x` (`[rows,
/// cols]` row-major): row `c` of `dst` holds column `c` of `x` in its
/// first `rows` values. Blocks of 16 × 16 transposed in registers and
/// rounded as [`round_row`] rounds; the ragged edges one by one.
pub(super) fn round_transposed(x: &[f32], [rows, cols]: [usize; 2], dst: &mut [u16], kp: usize) {
    assert!(x.len() >= rows * cols && kp >= rows);
    assert!(cols == 0 || dst.len() >= (cols - 1) * kp + rows);
    let (rb, cb) = match std::arch::is_x86_feature_detected!("avx512bf16") {
        true => (rows / TILE * TILE, cols / TILE * TILE),
        false => (0, 0),
    };
    if rb > 0 && cb > 0 {
        // SAFETY: the CPU has the features; whole blocks lie inside both
        // buffers (the lengths checked above).
        unsafe { round_transposed_blocks(x, cols, dst, kp, [rb, cb]) };
    }
    for r in 0..rows {
        let from = if r < rb { cb } else { 0 };
        for c in from..cols {
            dst[c * kp + r] = super::to_bf16(x[r * cols + c]);
        }
    }
}

/// The whole 16 × 16 blocks of [`round_transposed`] within `rb` rows and
/// `cb` columns.
///
/// # Safety
/// The CPU has AVX512-BF16; `x` holds `rb` rows of `cols` values and
/// `dst` `cb` rows of `kp ≥ rb`.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_transposed_blocks(
    x: &[f32],
    cols: usize,
    dst: &mut [u16],
    kp: usize,
    [rb, cb]: [usize; 2],
) {
    use std::arch::x86_64::*;
    for r0 in (0..rb).step_by(TILE) {
        for c0 in (0..cb).step_by(TILE) {
            let mut t = [_mm512_setzero_si512(); TILE];
            for (i, line) in t.iter_mut().enumerate() {
                *line = _mm512_castps_si512(_mm512_loadu_ps(x.as_ptr().add((r0 + i) * cols + c0)));
            }
            transpose16(&mut t);
            for (i, line) in t.iter().enumerate() {
                let h: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_castsi512_ps(*line)));
                _mm256_storeu_si256(dst.as_mut_ptr().add((c0 + i) * kp + r0) as *mut __m256i, h);
            }
        }
    }
}

/// Whether [`dense_panel`] (and the vectorized blocks of `blocks.rs`) can run here.
pub(super) fn panels_vectorized() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Column block `j` of `B` = `Wᵀ` (`forward`) or `W` for a dense `W`
/// (`[rows, cols]`, rows `stride` values apart), rounded into `panel` (see `Layout::Tiles`) with
/// AVX512-BF16 conversions: a whole 16-column block of a pair of rows
/// per store for `W`, a row's 32 values per scatter for `Wᵀ`.
///
/// # Safety
/// [`panels_vectorized`] must be true and `panel` at least `kp · 16` long.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn dense_panel(
    w: &[f32],
    [rows, cols, stride]: [usize; 3],
    forward: bool,
    j: usize,
    panel: &mut [u16],
) {
    use std::arch::x86_64::*;
    let kp = super::padded(if forward { cols } else { rows });
    assert!(panel.len() >= kp * TILE && stride >= cols);
    assert!(rows == 0 || w.len() >= (rows - 1) * stride + cols);
    // Loads `n` (≤ 16) floats from `p`, zeros past them.
    let load = |p: *const f32, n: usize| {
        if n >= TILE {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)
        }
    };
    if forward {
        // Row o's pair p goes to 32-bit element p · 16 + c: 32 values of
        // each of the 16 rows, transposed in registers, are the 16 lines
        // of pairs kk/2.. (kp is a multiple of 32, so every line exists;
        // past the weight they are zeros).
        let valid = TILE.min(rows - TILE * j);
        let dst = panel.as_mut_ptr() as *mut __m512i;
        let mut kk = 0;
        while kk < cols {
            let mut r = [_mm512_setzero_si512(); TILE];
            for (c, line) in r.iter_mut().enumerate().take(valid) {
                let row = w.as_ptr().add((TILE * j + c) * stride);
                let lo = load(row.add(kk), cols - kk);
                let hi = if kk + TILE < cols {
                    load(row.add(kk + TILE), cols - kk - TILE)
                } else {
                    _mm512_setzero_ps()
                };
                // 32 values in order: pairs as 32-bit elements.
                *line = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            }
            transpose16(&mut r);
            for (p, line) in r.iter().enumerate() {
                _mm512_storeu_si512(dst.add(kk / 2 + p), *line);
            }
            kk += 2 * TILE;
        }
    } else {
        // Rows 2p and 2p + 1 interleaved: one 64-byte line per pair.
        let (c0, width) = (TILE * j, TILE.min(cols - TILE * j));
        let mut o = 0;
        while o < rows {
            let even = load(w.as_ptr().add(o * stride + c0), width);
            let odd = if o + 1 < rows {
                load(w.as_ptr().add((o + 1) * stride + c0), width)
            } else {
                _mm512_setzero_ps()
            };
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
            let line = interleave_pairs(v);
            _mm512_storeu_si512(panel.as_mut_ptr().add((o / 2) * TILE * 2) as *mut _, line);
            o += 2;
        }
    }
}

/// The lower and upper 16 16-bit values of `v` interleaved, `(lo0, hi0,
/// lo1, hi1, …)`: two rows' values made into one line of pairs.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(crate) unsafe fn interleave_pairs(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let order = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    _mm512_permutexvar_epi16(order, v)
}

/// Transposes 16 rows of 16 32-bit elements in place: row `x` becomes
/// element `x` of every input row.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn transpose16(r: &mut [std::arch::x86_64::__m512i; TILE]) {
    use std::arch::x86_64::*;
    // 32-bit, then 64-bit interleaves: `u[4i + m]`, 128-bit lane `k`, is
    // element `4k + m` of rows `4i..4i + 4`.
    let mut t = [_mm512_setzero_si512(); TILE];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); TILE];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // Lanes: element 4k + m takes lane k of u[m], u[4 + m], u[8 + m],
    // u[12 + m].
    for m in 0..4 {
        let (a, b, c, d) = (u[m], u[4 + m], u[8 + m], u[12 + m]);
        let ab_even = _mm512_shuffle_i32x4::<0x88>(a, b); // a0 a2 b0 b2
        let ab_odd = _mm512_shuffle_i32x4::<0xdd>(a, b); // a1 a3 b1 b3
        let cd_even = _mm512_shuffle_i32x4::<0x88>(c, d);
        let cd_odd = _mm512_shuffle_i32x4::<0xdd>(c, d);
        r[m] = _mm512_shuffle_i32x4::<0x88>(ab_even, cd_even);
        r[8 + m] = _mm512_shuffle_i32x4::<0xdd>(ab_even, cd_even);
        r[4 + m] = _mm512_shuffle_i32x4::<0x88>(ab_odd, cd_odd);
        r[12 + m] = _mm512_shuffle_i32x4::<0xdd>(ab_odd, cd_odd);
    }
}
