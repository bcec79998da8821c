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
/// Column blocks (of 16) per parallel task.
const TASK_BLOCKS: usize = 8;

/// All eight tiles 16 rows × 64 bytes (16 f32 results, or 32 bf16 of a
/// left row, or 16 bf16 pairs).
const CONFIG: TileConfig = TileConfig::new(&[(TILE as u8, 64); 8]);

/// The destination, shared by tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct Dest(*mut f32);
// SAFETY: tasks write disjoint blocks (see `matmul`).
unsafe impl Send for Dest {}
// SAFETY: as above.
unsafe impl Sync for Dest {}

/// The shapes every task reads.
#[derive(Clone, Copy)]
struct Shapes {
    /// Valid rows and columns of the result.
    m: usize,
    n: usize,
    /// Padded shared dimension.
    kp: usize,
}

/// `out` (`[m, n]`) = `a` (`[⌈m/16⌉·16, kp]` bf16, zero-padded) times the
/// right operand `b`, by column blocks.
///
/// # Safety
/// `bf16_accelerated()` must be true.
pub(super) unsafe fn matmul(a: &[u16], m: usize, kp: usize, b: &dyn Panels, out: &mut [f32]) {
    let n = b.n();
    let mp = m.next_multiple_of(TILE);
    let blocks = n.div_ceil(TILE);
    assert!(kp.is_multiple_of(KSTEP) && kp >= b.k());
    assert!(a.len() >= mp * kp && out.len() >= m * n);
    let shapes = Shapes { m, n, kp };
    // Computed column blocks are made once per product: a task takes every
    // row and a share of the blocks (an even number, for the 2 × 2 tiles).
    let (task_rows, task_blocks) = if b.computed() {
        let share = blocks.div_ceil(4 * rayon::current_num_threads());
        (mp, share.next_multiple_of(2))
    } else {
        (TASK_ROWS, TASK_BLOCKS)
    };
    let tasks: Vec<(usize, usize)> = (0..mp)
        .step_by(task_rows)
        .flat_map(|r| (0..blocks).step_by(task_blocks).map(move |j| (r, j)))
        .collect();
    let dest = Dest(out.as_mut_ptr());
    tasks.par_iter().for_each(|&(r0, j0)| {
        let rows = r0..(r0 + task_rows).min(mp);
        let cols = j0..(j0 + task_blocks).min(blocks);
        // SAFETY: the caller's promise; each task writes only its rows and
        // column blocks of `out`.
        unsafe { task(a, b, shapes, dest, rows, cols) };
    });
}

/// Rows `rows` (whole tiles) by column blocks `cols` of the result.
unsafe fn task(
    a: &[u16],
    b: &dyn Panels,
    s: Shapes,
    dest: Dest,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    let scratch = if b.computed() { s.kp * TILE } else { 0 };
    let (mut s0, mut s1) = (vec![0u16; scratch], vec![0u16; scratch]);
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    let steps = s.kp / KSTEP;
    let lda = s.kp * 2; // bytes per left row
    let mut j = cols.start;
    while j < cols.end {
        let two_cols = j + 1 < cols.end;
        let p0 = b.panel(j, &mut s0);
        // Read only where a second block exists.
        let p1 = if two_cols {
            b.panel(j + 1, &mut s1)
        } else {
            p0
        };
        debug_assert!(p0.len() >= s.kp * TILE && p1.len() >= s.kp * TILE);
        let (b0, b1) = (p0.as_ptr(), p1.as_ptr());
        let mut i = rows.start;
        while i < rows.end {
            let two_rows = i + TILE < rows.end;
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
    asm!("tilerelease", options(nostack, nomem));
}

/// Stores result tile `tmm{t}` as rows `i..i + 16`, column block `j` of
/// the result, through a buffer where the tile hangs over its edge.
#[inline(always)]
unsafe fn store(s: Shapes, dest: Dest, i: usize, j: usize, t: usize) {
    let c = j * TILE;
    let whole = i + TILE <= s.m && c + TILE <= s.n;
    #[repr(C, align(64))]
    struct Buf([f32; TILE * TILE]);
    let mut buf = Buf([0.0; TILE * TILE]);
    let (ptr, stride) = if whole {
        (dest.0.add(i * s.n + c), s.n * 4)
    } else {
        (buf.0.as_mut_ptr(), TILE * 4)
    };
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
    if !whole {
        for r in 0..TILE.min(s.m.saturating_sub(i)) {
            for cc in 0..TILE.min(s.n - c) {
                *dest.0.add((i + r) * s.n + c + cc) = buf.0[r * TILE + cc];
            }
        }
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
