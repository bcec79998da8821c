//! The int8 products of `int8.rs` on Intel AMX (Sapphire Rapids and
//! later): for 16 output rows and one block at a time, one tile
//! instruction multiplies the block's weights (16 × 32 bytes) by up to 16
//! rounded input rows, and AVX-512 scales the 16 × 16 integer results
//! into f32 accumulators held in registers across the blocks. Q4_1 nibbles
//! are spread to bytes in a small buffer first; Q8_0 blocks are read in
//! place. AMX instructions go through `asm!` (their intrinsics are not
//! stable Rust); Linux hands out the tile state only on request.

// Every function here is a kernel whose safety is the caller's check of
// `available()` plus the length checks in `rows`.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::int8::{GROUP_BLOCK, Int8Rows, LANES, WeightRows};
use super::{BLOCK, QuantKind};
use crate::tiles::TileConfig;

/// Output rows per tile (the A operand's rows).
pub(super) const STRIPE: usize = 16;

/// Whether the CPU has AMX-INT8 and the kernel lets this process use it.
pub(super) fn available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| crate::tiles::available(crate::tiles::TileType::Int8))
}

/// The tile shapes: tmm0 the 16 × 16 int32 results, tmm1 the weights
/// (16 rows × 32 bytes), tmm2 the inputs (8 rows × 64 bytes); tmm3..5 the
/// same for odd blocks.
const CONFIG: TileConfig = {
    let results = (STRIPE as u8, (LANES * 4) as u16);
    let weights = (STRIPE as u8, BLOCK as u16);
    let inputs = ((BLOCK / 4) as u8, (LANES * 4) as u16);
    TileConfig::new(&[results, weights, inputs, results, weights, inputs])
};

#[repr(C, align(64))]
struct Aligned<const N: usize>([u8; N]);

/// `out[o·t + r]` for the output rows `0..stripes·16` of `w` and every
/// input row `r` (see `int8::rows_portable`, which this equals bit for
/// bit).
///
/// # Safety
/// `available()` must be true.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn rows(w: &WeightRows, x: &Int8Rows, stripes: usize, out: &mut [f32]) {
    let nb = x.nb;
    let per_row = match w.kind {
        QuantKind::Q4_1 => 16,
        QuantKind::Q8_0 => 32,
        QuantKind::Nf4 | QuantKind::Q8_16 => {
            unreachable!("NF4 and Q6_K products take f32 activations")
        }
    };
    let rows = stripes * STRIPE;
    assert!(w.quants.len() >= rows * nb * per_row && w.scales.len() >= rows * nb);
    assert!(w.kind != QuantKind::Q4_1 || w.mins.len() >= rows * nb);
    assert!(x.lanes == LANES && x.q.len() >= x.t.div_ceil(LANES) * nb * GROUP_BLOCK);
    assert!(out.len() >= rows * x.t);
    let groups = x.t.div_ceil(LANES);
    // Two sets of tiles and buffers, so that block `b + 1`'s tile
    // product runs while block `b`'s results are scaled.
    let mut spread = [
        Aligned::<{ STRIPE * BLOCK }>([0; STRIPE * BLOCK]),
        Aligned::<{ STRIPE * BLOCK }>([0; STRIPE * BLOCK]),
    ];
    let mut ints = [
        Aligned::<{ STRIPE * LANES * 4 }>([0; STRIPE * LANES * 4]),
        Aligned::<{ STRIPE * LANES * 4 }>([0; STRIPE * LANES * 4]),
    ];
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    for s in 0..stripes {
        let o0 = s * STRIPE;
        for g in 0..groups {
            let mut acc = [_mm512_setzero_ps(); STRIPE];
            tile_products(w, x, o0, g, 0, &mut spread[0], &mut ints[0]);
            for b in 0..nb {
                if b + 1 < nb {
                    let (sp, it) = (&mut spread[(b + 1) % 2], &mut ints[(b + 1) % 2]);
                    tile_products(w, x, o0, g, b + 1, sp, it);
                }
                let at = (g * nb + b) * LANES;
                let d = _mm512_loadu_ps(x.d.as_ptr().add(at));
                let sums = _mm512_loadu_ps(x.min_sums(w.exact_min_sums).as_ptr().add(at));
                let ints = ints[b % 2].0.as_ptr() as *const __m512i;
                let scales = w.scales.as_ptr().add(o0 * nb + b);
                if w.kind == QuantKind::Q4_1 {
                    let mins = w.mins.as_ptr().add(o0 * nb + b);
                    for (m, acc) in acc.iter_mut().enumerate() {
                        let c = _mm512_cvtepi32_ps(_mm512_load_si512(ints.add(m)));
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(*scales.add(m * nb)));
                        *acc = _mm512_fmadd_ps(c, scale, *acc);
                        *acc = _mm512_fmadd_ps(_mm512_set1_ps(*mins.add(m * nb)), sums, *acc);
                    }
                } else {
                    for (m, acc) in acc.iter_mut().enumerate() {
                        let c = _mm512_cvtepi32_ps(_mm512_load_si512(ints.add(m)));
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(*scales.add(m * nb)));
                        *acc = _mm512_fmadd_ps(c, scale, *acc);
                    }
                }
            }
            let n = LANES.min(x.t - g * LANES);
            let mask = ((1u32 << n) - 1) as __mmask16;
            for (m, a) in acc.iter().enumerate() {
                let at = out.as_mut_ptr().add((o0 + m) * x.t + g * LANES);
                _mm512_mask_storeu_ps(at, mask, *a);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// The integer products of block `b` for the stripe at `o0` and input
/// group `g`, into `ints` (`[16 outputs][16 inputs]`), on the tiles of
/// the block's parity.
#[inline(always)]
unsafe fn tile_products(
    w: &WeightRows,
    x: &Int8Rows,
    o0: usize,
    g: usize,
    b: usize,
    spread: &mut Aligned<{ STRIPE * BLOCK }>,
    ints: &mut Aligned<{ STRIPE * LANES * 4 }>,
) {
    let nb = x.nb;
    let tile = x.q.as_ptr().add((g * nb + b) * GROUP_BLOCK);
    let (a, sa) = match w.kind {
        QuantKind::Q4_1 => {
            spread_nibbles(w.quants.as_ptr(), nb, o0, b, spread.0.as_mut_ptr());
            (spread.0.as_ptr(), BLOCK)
        }
        QuantKind::Q8_0 => (w.quants.as_ptr().add((o0 * nb + b) * 32), nb * 32),
        QuantKind::Nf4 | QuantKind::Q8_16 => {
            unreachable!("NF4 and Q6_K products take f32 activations")
        }
    };
    macro_rules! on_tiles {
        ($op:literal, $c:literal, $a:literal, $b:literal) => {
            asm!(
                concat!("tilezero ", $c),
                concat!("tileloadd ", $a, ", [{a} + {sa}]"),
                concat!("tileloadd ", $b, ", [{b} + {sb}]"),
                concat!($op, " ", $c, ", ", $a, ", ", $b),
                concat!("tilestored [{c} + {sc}], ", $c),
                a = in(reg) a,
                sa = in(reg) sa,
                b = in(reg) tile,
                sb = in(reg) LANES * 4,
                c = in(reg) ints.0.as_mut_ptr(),
                sc = in(reg) LANES * 4,
                options(nostack),
            )
        };
    }
    match (w.kind, b % 2) {
        (QuantKind::Q4_1, 0) => on_tiles!("tdpbusd", "tmm0", "tmm1", "tmm2"),
        (QuantKind::Q4_1, _) => on_tiles!("tdpbusd", "tmm3", "tmm4", "tmm5"),
        (QuantKind::Q8_0, 0) => on_tiles!("tdpbssd", "tmm0", "tmm1", "tmm2"),
        (QuantKind::Q8_0, _) => on_tiles!("tdpbssd", "tmm3", "tmm4", "tmm5"),
        (QuantKind::Nf4 | QuantKind::Q8_16, _) => {
            unreachable!("NF4 and Q6_K products take f32 activations")
        }
    }
}

/// Block `b` of output rows `o0..o0+16` as bytes `0..16`, 32 per row in
/// the weights' order (low nibbles are values 0..16, high ones 16..32).
#[inline(always)]
unsafe fn spread_nibbles(quants: *const u8, nb: usize, o0: usize, b: usize, dst: *mut u8) {
    let mask = _mm256_set1_epi8(15);
    // Shift the upper copy's 16-bit lanes by 4: its low nibbles are then
    // the high ones.
    let shift = _mm256_set_epi16(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    for m in 0..STRIPE {
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(
            quants.add(((o0 + m) * nb + b) * 16) as *const __m128i
        ));
        let both = _mm256_and_si256(_mm256_srlv_epi16(v, shift), mask);
        _mm256_store_si256(dst.add(m * BLOCK) as *mut __m256i, both);
    }
}
