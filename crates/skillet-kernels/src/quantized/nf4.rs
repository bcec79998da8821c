//! NF4, bitsandbytes' 4-bit NormalFloat (QLoRA, arXiv 2305.14314, §3):
//! each weight is one of 16 fixed levels (quantiles of a normal
//! distribution, scaled to [-1, 1]) times the largest magnitude of its
//! block of 64 consecutive weights (consecutive in the flattened matrix:
//! a block may span two rows, as in bitsandbytes). Skillet keeps a code per weight, two
//! to a byte, and the block's absmax in f32, so a weight is
//! `level[q] · absmax` with one rounding, as bitsandbytes dequantizes it.
//! (How the codes and absmax are chosen, double quantization included, is
//! `skillet_models::nf4`.) Within a [`QuantMatrix`] the codes are regrouped
//! by 32 like Q4_1's nibbles: byte `i` of a 32-weight half-block holds
//! weight `i` in its low nibble and weight `i + 16` in its high one.

use candle_core::{Result, bail};

use super::{BLOCK, QuantKind, QuantMatrix, Rows, fma16, sum16};
use crate::vec::multiversion;

/// The 16 NF4 levels, in code order (bitsandbytes' table).
/// (Each literal is the exact f32 bitsandbytes stores.)
#[allow(clippy::excessive_precision)]
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Weights sharing one absmax.
pub const NF4_BLOCK: usize = 64;

impl QuantMatrix {
    /// A `[rows, cols]` NF4 matrix from one code (`0..16`) per weight in
    /// row-major order and the absmax of each 64 consecutive weights of
    /// the flattened matrix. `cols` must be a multiple of 32 and the
    /// matrix a whole number of blocks of 64.
    pub fn from_nf4(rows: usize, cols: usize, codes: &[u8], absmax: Vec<f32>) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || !(rows * cols).is_multiple_of(NF4_BLOCK) {
            bail!(
                "NF4 matrix: [{rows}, {cols}] needs rows of a multiple of {BLOCK} \
                 and a multiple of {NF4_BLOCK} weights"
            );
        }
        if codes.len() != rows * cols || absmax.len() != rows * cols / NF4_BLOCK {
            bail!(
                "NF4 matrix: {} codes and {} absmax values for [{rows}, {cols}]",
                codes.len(),
                absmax.len()
            );
        }
        if let Some(c) = codes.iter().find(|&&c| c > 15) {
            bail!("NF4 matrix: code {c} is not 4-bit");
        }
        let quants = codes
            .chunks_exact(BLOCK)
            .flat_map(|b| (0..16).map(move |i| b[i] | (b[i + 16] << 4)))
            .collect();
        Ok(Self {
            kind: QuantKind::Nf4,
            rows,
            cols,
            scales: absmax,
            mins: Vec::new(),
            quants,
            striped: Default::default(),
            source: None,
        })
    }
}

/// Half-block `b`'s 32 weights `level[q]·d` as two halves.
#[inline(always)]
pub(super) fn nf4_scaled(q: &[u8], d: f32) -> ([f32; 16], [f32; 16]) {
    let q: &[u8; 16] = q.try_into().expect("16 bytes");
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    for i in 0..16 {
        lo[i] = NF4_LEVELS[(q[i] & 15) as usize] * d;
        hi[i] = NF4_LEVELS[(q[i] >> 4) as usize] * d;
    }
    (lo, hi)
}

multiversion! {
    /// `Σ level[q]·d·x` over each output row's codes for every input row
    /// of `x` (rows of `cols`; `out` is `[rows of x, output rows]`), one
    /// row at a time (the portable path).
    pub(super) fn nf4_rows_portable(quants: &[u8], absmax: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
        let nb = cols / BLOCK;
        let t = x.len() / cols;
        let outs = out.len() / t;
        for o in 0..outs {
            let q = &quants[o * nb * 16..(o + 1) * nb * 16];
            for r in 0..t {
                let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
                for b in 0..nb {
                    // Blocks of 64 run on across rows.
                    let (wl, wh) = nf4_scaled(&q[b * 16..b * 16 + 16], absmax[(o * nb + b) / 2]);
                    let at = r * cols + b * BLOCK;
                    fma16(&mut lo, &wl, &x[at..at + 16]);
                    fma16(&mut hi, &wh, &x[at + 16..at + 32]);
                }
                out[r * outs + o] = sum16(&lo) + sum16(&hi);
            }
        }
    }
}

/// `Σ level[q]·d·x` for every input row, by the kernel `rows` was prepared
/// for.
pub(super) fn nf4_rows(quants: &[u8], absmax: &[f32], rows: &Rows, cols: usize, out: &mut [f32]) {
    match rows {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Grouped` exists only where the CPU has AVX-512F; slices
        // are checked inside.
        Rows::Grouped(x) => unsafe { super::avx512::nf4_rows(quants, absmax, x, cols, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `GroupedAvx2` exists only where the CPU has AVX2 and FMA.
        Rows::GroupedAvx2(x) => unsafe { super::avx2::nf4_rows(quants, absmax, x, cols, out) },
        #[cfg(not(target_arch = "x86_64"))]
        Rows::Grouped(_) | Rows::GroupedAvx2(_) => unreachable!("built on x86-64 only"),
        Rows::Plain { x, .. } => nf4_rows_portable(quants, absmax, x, cols, out),
    }
}
