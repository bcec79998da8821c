//! `y = x Wᵀ` straight from GGML quantized blocks, for inference on few
//! rows (batch-1 decode), where reading the weights is the cost: a Q4_1
//! matrix is 0.625 bytes per weight against 4 for f32. Blocks are repacked
//! at load into separate scale, min and quant arrays so the inner loop is
//! a plain vector loop (no f16 conversion, no struct strides). Layouts as
//! in ggml (`ggml-common.h`): Q4_1 blocks of 32 weights are `d·q + m` with
//! `q` a nibble, low nibbles the first 16 weights; Q8_0 blocks are `d·q`
//! with `q` a signed byte. No gradient: training's products over many rows
//! are in `training.rs` (the blocks made into the GEMM's operands).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use half::f16;
use rayon::prelude::*;

use crate::input_rounding::{InputRounding, round_inputs};
use crate::storage::{slice, tensor};
use crate::vec::multiversion;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod int8;
pub(crate) use int8::round_block;
mod nf4;
pub use nf4::{NF4_BLOCK, NF4_LEVELS};
#[cfg(target_arch = "x86_64")]
mod panels;
mod slabs;
#[cfg(target_arch = "x86_64")]
mod striped;
mod training;
#[cfg(target_arch = "x86_64")]
mod vnni;

/// The copy of a Q4_1 / Q8_0 weight for int8 products on AVX512-VNNI or
/// AVX2, made on first use (see `striped.rs`).
#[cfg(target_arch = "x86_64")]
type StripedCopy = std::sync::OnceLock<striped::Striped>;
#[cfg(not(target_arch = "x86_64"))]
type StripedCopy = ();

/// Weights per block.
const BLOCK: usize = 32;

/// The block formats with a fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit with a scale and a minimum per 32 weights (20 bytes).
    Q4_1,
    /// 8-bit with a scale per 32 weights (34 bytes).
    Q8_0,
    /// 8-bit with a scale per 16 weights: how Q6_K's blocks are held,
    /// whose 6-bit codes have an 8-bit scale per 16 under the f16 one.
    Q8_16,
    /// bitsandbytes' 4-bit NormalFloat: a code into 16 fixed levels per
    /// weight and an f32 absmax per 64 weights (see `nf4.rs`). Made by
    /// [`QuantMatrix::from_nf4`], never read from GGML blocks; its products
    /// always take f32 activations.
    Nf4,
}

impl QuantKind {
    /// The index of the scale of weights `16·half .. 16·half + 16` of
    /// block `b` (blocks of 32, row-major over the whole matrix).
    #[inline(always)]
    fn scale_index(self, b: usize, half: usize) -> usize {
        match self {
            QuantKind::Q4_1 | QuantKind::Q8_0 => b,
            QuantKind::Q8_16 => 2 * b + half,
            QuantKind::Nf4 => b / 2,
        }
    }

    /// The scales of blocks `b0..b1`, where `b0` starts a scale (NF4's
    /// scales span two blocks; a range ending inside one takes it).
    fn scale_range(self, b0: usize, b1: usize) -> std::ops::Range<usize> {
        match self {
            QuantKind::Q4_1 | QuantKind::Q8_0 => b0..b1,
            QuantKind::Q8_16 => 2 * b0..2 * b1,
            QuantKind::Nf4 => b0 / 2..b1.div_ceil(2),
        }
    }

    /// Scales per block of 32 weights of the byte kinds the Q8_0 kernels
    /// read: Q8_0's one, Q8_16's two.
    fn scales_per_block(self) -> usize {
        match self {
            QuantKind::Q8_16 => 2,
            QuantKind::Q4_1 | QuantKind::Q8_0 | QuantKind::Nf4 => 1,
        }
    }

    /// Bytes of codes per block of 32 weights.
    fn code_bytes(self) -> usize {
        match self {
            QuantKind::Q4_1 | QuantKind::Nf4 => 16,
            QuantKind::Q8_0 | QuantKind::Q8_16 => 32,
        }
    }
}

/// The GGML block formats Skillet's kernels read, each repacked at load
/// into one of the [`QuantKind`]s with the same dequantized values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlBlocks {
    /// 4-bit codes and a scale per 32 weights (18 bytes): held as Q4_1
    /// with a minimum of `−8·scale`.
    Q4_0,
    /// Held as it is.
    Q4_1,
    /// 5-bit codes and a scale per 32 weights (22 bytes): held as Q8_0,
    /// a signed byte per weight (about 1.6× Q5_0's bytes).
    Q5_0,
    /// Held as it is.
    Q8_0,
    /// 4-bit codes in super-blocks of 256 weights (144 bytes): an f16
    /// scale and minimum, and a 6-bit scale and minimum per 32 weights.
    /// Held as Q4_1 with each 32 weights' `d·sc` and `−dmin·m` in f32.
    /// Its int8 products round the inputs per 256 values as llama.cpp
    /// does for the K-quants (Q8_K) and multiply them in f32.
    Q4K,
    /// 6-bit codes in super-blocks of 256 weights (210 bytes): an 8-bit
    /// scale per 16 weights under an f16 one. Held as Q8_16, the signed
    /// byte `q − 32` with each 16 weights' `d·sc` in f32 (about 1.5×
    /// Q6_K's bytes). Int8 products as Q4_K's.
    Q6K,
}

impl GgmlBlocks {
    /// Weights per block in the file.
    fn block_weights(self) -> usize {
        match self {
            GgmlBlocks::Q4K | GgmlBlocks::Q6K => 256,
            _ => BLOCK,
        }
    }

    /// Bytes per block in the file.
    fn block_bytes(self) -> usize {
        match self {
            GgmlBlocks::Q4_0 => 18,
            GgmlBlocks::Q4_1 => 20,
            GgmlBlocks::Q5_0 => 22,
            GgmlBlocks::Q8_0 => 34,
            GgmlBlocks::Q4K => 144,
            GgmlBlocks::Q6K => 210,
        }
    }

    /// The kind the blocks are held and multiplied as. Int8 products
    /// round the inputs as llama.cpp does for the file's format: per 32
    /// values for Q4_0, Q4_1, Q5_0 and Q8_0 (their `vec_dot_type` is Q8_0
    /// or Q8_1), which is the kind's own integer product; per 256 for the
    /// K-quants.
    pub fn held_as(self) -> QuantKind {
        match self {
            GgmlBlocks::Q4_0 | GgmlBlocks::Q4_1 | GgmlBlocks::Q4K => QuantKind::Q4_1,
            GgmlBlocks::Q5_0 | GgmlBlocks::Q8_0 => QuantKind::Q8_0,
            GgmlBlocks::Q6K => QuantKind::Q8_16,
        }
    }

    /// A K-quant (super-blocks of 256): int8 products round the inputs
    /// per 256 values (Q8_K) and multiply them in f32.
    fn k_quant(self) -> bool {
        matches!(self, GgmlBlocks::Q4K | GgmlBlocks::Q6K)
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K
/// super-block's 12 packed bytes (ggml's `get_scale_min_k4`).
fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Appends a Q6_K super-block (`ql[128]`, `qh[64]`, `sc[16]` as signed
/// bytes, then the f16 `d`; ggml's `block_q6_K`) to `m` as Q8_16. Weight
/// `p` of the 256 has the code `q` from four low bits in `ql` and two high
/// bits in `qh`, and the value `d·sc[p/16]·(q − 32)`: held as the signed
/// byte `q − 32` and the f32 scale `d·sc`, exact (an f16 times a byte),
/// so the kernels' `scale·byte` is ggml's value to the bit.
fn push_q6k(m: &mut QuantMatrix, b: &[u8]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
    m.scales.extend(sc.iter().map(|&s| d * s as i8 as f32));
    let mut codes = [0u8; 256];
    // Each half of 128 weights: 64 bytes of `ql`, 32 of `qh`.
    for n in 0..2 {
        let (ql, qh, out) = (&ql[64 * n..], &qh[32 * n..], &mut codes[128 * n..]);
        for l in 0..32 {
            let high = |shift: u32| ((qh[l] >> shift) & 3) << 4;
            out[l] = (ql[l] & 15) | high(0);
            out[l + 32] = (ql[l + 32] & 15) | high(2);
            out[l + 64] = (ql[l] >> 4) | high(4);
            out[l + 96] = (ql[l + 32] >> 4) | high(6);
        }
    }
    m.quants.extend(codes.iter().map(|&q| (q as i8 - 32) as u8));
}

/// A `[rows, cols]` matrix kept in its quantized blocks, repacked.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    /// One per 32 weights (Q8_16: per 16; NF4: one absmax per 64).
    scales: Vec<f32>,
    mins: Vec<f32>,
    quants: Vec<u8>,
    /// Made by the first int8 product where the CPU has AVX512-VNNI or
    /// AVX2 but no AMX tiles (on AMX machines: of at most 16 rows).
    striped: StripedCopy,
    /// The GGML blocks it was read from (none for NF4): the K-quants'
    /// (Q4_K, Q6_K) int8 products round the inputs per 256; Q4_0's
    /// minimums multiply exact input sums.
    source: Option<GgmlBlocks>,
}

impl QuantMatrix {
    /// Repacks `bytes`, the ggml blocks of a row-major `[rows, cols]` matrix
    /// (for [`QuantKind::Q8_16`], Q6_K blocks).
    pub fn from_ggml(kind: QuantKind, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let source = match kind {
            QuantKind::Q4_1 => GgmlBlocks::Q4_1,
            QuantKind::Q8_0 => GgmlBlocks::Q8_0,
            QuantKind::Q8_16 => GgmlBlocks::Q6K,
            QuantKind::Nf4 => bail!("NF4 is not a GGML block type (see `QuantMatrix::from_nf4`)"),
        };
        Self::from_ggml_blocks(source, rows, cols, bytes)
    }

    /// Repacks `bytes`, blocks of `source`'s format of a row-major
    /// `[rows, cols]` matrix, into the kind it is held as
    /// ([`GgmlBlocks::held_as`]), with exactly ggml's dequantized values.
    pub fn from_ggml_blocks(
        source: GgmlBlocks,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self> {
        let per_file_block = source.block_weights();
        if !cols.is_multiple_of(per_file_block) {
            bail!("quantized matrix: {cols} columns is not a multiple of {per_file_block}");
        }
        let blocks = rows * cols / BLOCK;
        let size = source.block_bytes();
        let file_blocks = rows * cols / per_file_block;
        if bytes.len() != file_blocks * size {
            bail!(
                "quantized matrix: {} bytes for {file_blocks} blocks of {size}",
                bytes.len()
            );
        }
        let kind = source.held_as();
        let per_block = kind.code_bytes();
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut m = Self {
            kind,
            rows,
            cols,
            scales: Vec::with_capacity(blocks),
            mins: Vec::new(),
            quants: Vec::with_capacity(blocks * per_block),
            striped: Default::default(),
            source: Some(source),
        };
        for b in bytes.chunks_exact(size) {
            if source == GgmlBlocks::Q6K {
                push_q6k(&mut m, b);
                continue;
            }
            let d = half(&b[0..2]);
            m.scales.push(d);
            match source {
                GgmlBlocks::Q4_1 => {
                    m.mins.push(half(&b[2..4]));
                    m.quants.extend_from_slice(&b[4..20]);
                }
                // ggml's `(q − 8)·d` is `d·q + (−8d)` exactly: with `d` an
                // f16 value, `d·q` (q < 16) and `8d` are exact in f32, and
                // so is their difference.
                GgmlBlocks::Q4_0 => {
                    m.mins.push(-8.0 * d);
                    m.quants.extend_from_slice(&b[2..18]);
                }
                GgmlBlocks::Q8_0 => m.quants.extend_from_slice(&b[2..34]),
                // Per 64 weights, 32 bytes: the first 32 weights in the
                // low nibbles, the next 32 in the high ones. Each 32 is a
                // Q4_1 block of `d·sc·q + (−dmin·m)`, which is ggml's
                // `d·sc·q − dmin·m` to the bit.
                GgmlBlocks::Q4K => {
                    m.scales.pop();
                    let dmin = half(&b[2..4]);
                    let (packed, qs) = (&b[4..16], &b[16..144]);
                    for j in 0..8 {
                        let (sc, mn) = q4k_scale_min(j, packed);
                        m.scales.push(d * sc as f32);
                        m.mins.push(-(dmin * mn as f32));
                        let q = &qs[32 * (j / 2)..][..32];
                        let nibble = |v: u8| if j % 2 == 0 { v & 15 } else { v >> 4 };
                        m.quants
                            .extend((0..16).map(|i| nibble(q[i]) | (nibble(q[i + 16]) << 4)));
                    }
                }
                // 5-bit codes: nibbles as in Q4_0, the fifth bit of weight
                // `j` in bit `j` of `qh`; the value is `(q − 16)·d`, held
                // as the signed byte `q − 16`.
                GgmlBlocks::Q5_0 => {
                    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    let qs = &b[6..22];
                    m.quants.extend((0..BLOCK).map(|j| {
                        let low = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
                        let high = (((qh >> j) & 1) as u8) << 4;
                        ((low | high) as i8 - 16) as u8
                    }));
                }
                GgmlBlocks::Q6K => unreachable!("repacked above"),
            }
        }
        Ok(m)
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The block format.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// Bytes held for the weights (codes, scales and minimums, and the
    /// int8 kernel's copy once made).
    pub fn bytes(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        let copy = self.striped.get().map_or(0, striped::Striped::bytes);
        #[cfg(not(target_arch = "x86_64"))]
        let copy = 0;
        self.quants.len() + 4 * (self.scales.len() + self.mins.len()) + copy
    }

    /// The copy for int8 products on AVX512-VNNI or AVX2, made on first
    /// use by products of `rows` input rows that run on it: every product
    /// where the CPU has VNNI or AVX2 but no AMX tiles, and on AMX machines
    /// those of at most 16 rows (a decode step), where a tile would hold
    /// one useful column of 16. About the bytes of the weight again.
    #[cfg(target_arch = "x86_64")]
    fn striped(&self, rows: usize) -> Option<&striped::Striped> {
        let kinds = matches!(self.kind, QuantKind::Q4_1 | QuantKind::Q8_0);
        let few = rows <= int8::LANES || !amx::available();
        if !kinds || !few || !striped::available() {
            return None;
        }
        Some(self.striped.get_or_init(|| striped::Striped::new(self)))
    }

    /// `x Wᵀ` for `x` of shape `[..., cols]`; backward gives `x` its
    /// gradient (through the dequantized weight), the weight none.
    pub fn matmul(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(QuantizedMatmul {
            w: self.clone(),
            int8: false,
        })
    }

    /// [`QuantMatrix::matmul`] with `x` rounded to 8-bit integers per
    /// block of 32 and integer block products, as llama.cpp computes
    /// quantized products: faster where the CPU has AMX, AVX512-VNNI or
    /// AVX2 (see [`QuantMatrix::int8_accelerated`]), at a relative error of
    /// about 1e-2 per product. A row's result still never depends on the
    /// other rows. Backward is that of the exact product.
    /// (NF4 has no integer path: its product is [`QuantMatrix::matmul`]'s.)
    ///
    /// A matrix read from K-quant blocks rounds `x` per 256 values instead,
    /// as llama.cpp does for the K-quants, and multiplies in f32; no
    /// gradient reaches `x` through that rounding.
    pub fn matmul_int8(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        if self.read_from_k_quant() {
            let flat = x.flatten_all()?.to_vec1::<f32>()?;
            let rounded = round_inputs(&flat, self.cols, InputRounding::Q8K);
            return self.matmul(&Tensor::from_vec(rounded, x.shape(), x.device())?);
        }
        x.contiguous()?.apply_op1(QuantizedMatmul {
            w: self.clone(),
            int8: self.native_int8(),
        })
    }

    /// Whether [`QuantMatrix::matmul_int8`] is this matrix's own integer
    /// product, which passes of several weights ([`QuantMatrix::matmul_each`],
    /// [`PreparedInput`]) can share: not for NF4 (f32 inputs) nor for a
    /// matrix read from K-quant blocks (inputs rounded per 256, then f32).
    pub fn native_int8(&self) -> bool {
        matches!(self.kind, QuantKind::Q4_1 | QuantKind::Q8_0) && !self.read_from_k_quant()
    }

    /// Read from K-quant blocks (Q4_K, Q6_K): its int8 products round the
    /// inputs per 256 values (Q8_K) and multiply them in f32.
    pub fn read_from_k_quant(&self) -> bool {
        self.source.is_some_and(GgmlBlocks::k_quant)
    }

    /// Read from Q4_0 blocks and held as Q4_1: the minimum `−8·d`
    /// multiplies each input block's `d·Σq` in f32, not in f16 as a Q4_1
    /// file's does, so that the product is llama.cpp's Q4_0 product.
    pub(crate) fn exact_min_sums(&self) -> bool {
        self.source == Some(GgmlBlocks::Q4_0)
    }

    /// Whether [`QuantMatrix::matmul_int8`] runs on AMX tiles, on
    /// AVX512-VNNI or on AVX2 here (else it runs plain loops, far slower
    /// than [`QuantMatrix::matmul`]). On VNNI and AVX2, a weight's first
    /// int8 product that runs there (any, without AMX; of at most 16 rows,
    /// with it) makes a copy of it laid out for the instructions.
    pub fn int8_accelerated() -> bool {
        #[cfg(target_arch = "x86_64")]
        return amx::available() || striped::available();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The dense `[rows, cols]` values.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let mut values = [0f32; BLOCK];
        for (b, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
            self.block(b, &mut values);
            dst.copy_from_slice(&values);
        }
        out
    }

    /// Output row `o0`'s blocks onward.
    fn weight_rows(&self, o0: usize) -> int8::WeightRows<'_> {
        let nb = self.cols / BLOCK;
        let per_row = match self.kind {
            QuantKind::Q4_1 => 16,
            QuantKind::Q8_0 => 32,
            QuantKind::Nf4 | QuantKind::Q8_16 => {
                unreachable!("NF4 and Q6_K products take f32 activations")
            }
        };
        int8::WeightRows {
            kind: self.kind,
            quants: &self.quants[o0 * nb * per_row..],
            scales: &self.scales[o0 * nb..],
            mins: if self.kind == QuantKind::Q4_1 {
                &self.mins[o0 * nb..]
            } else {
                &[]
            },
            exact_min_sums: self.exact_min_sums(),
        }
    }

    /// `x Wᵀ` over row-major rows of width `cols`.
    fn products(&self, x: &[f32]) -> Vec<f32> {
        let mut y = products_of(&[self], x, self.cols, false);
        y.pop().expect("one matrix")
    }

    /// Output rows `o0..o1` of `x Wᵀ` into `out` (`[t, o1 - o0]`).
    fn f32_task(&self, rows: &Rows, o0: usize, o1: usize, out: &mut [f32]) {
        let nb = self.cols / BLOCK;
        // Scales per 32 weights (Q8_16: per 16; NF4: per 64, so a task
        // must start on a whole one: the kernels count blocks from the
        // task's first row).
        assert!(
            self.kind != QuantKind::Nf4 || (o0 * nb).is_multiple_of(2),
            "a task starts inside a scale's blocks"
        );
        let s = &self.scales[self.kind.scale_range(o0 * nb, o1 * nb)];
        match self.kind {
            QuantKind::Q4_1 => {
                let q = &self.quants[o0 * nb * 16..o1 * nb * 16];
                let m = &self.mins[o0 * nb..o1 * nb];
                q4_1_rows(q, s, m, rows, self.cols, out);
            }
            QuantKind::Q8_0 | QuantKind::Q8_16 => {
                let q = &self.quants[o0 * nb * 32..o1 * nb * 32];
                q8_0_rows(q, s, self.kind.scales_per_block(), rows, self.cols, out);
            }
            QuantKind::Nf4 => {
                let q = &self.quants[o0 * nb * 16..o1 * nb * 16];
                nf4::nf4_rows(q, s, rows, self.cols, out);
            }
        }
    }

    /// `x Wᵀ` with `x` rounded to integers (see `int8.rs`).
    fn products_int8(&self, x: &[f32]) -> Vec<f32> {
        let mut y = products_of(&[self], x, self.cols, true);
        y.pop().expect("one matrix")
    }

    /// Output rows `o0..o1` of the int8 product into `out` (`[o1 - o0, t]`).
    fn int8_task(&self, rows: &int8::Int8Rows, o0: usize, o1: usize, out: &mut [f32]) {
        let w = self.weight_rows(o0);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if let Some(st) = self.striped(rows.t) {
            // Tasks start on whole stripes; the last may end in a partial
            // one, left to the loops below.
            let stripes = o0 / striped::STRIPE..(o1 / striped::STRIPE).min(st.stripes());
            striped::products(st, rows, stripes.clone(), out);
            done = stripes.len() * striped::STRIPE;
        } else if rows.lanes == int8::LANES && amx::available() {
            // (The tiles read groups of 16 rows side by side: inputs of
            // fewer rows are narrower, see `Int8Rows::lanes`.)
            let stripes = (o1 - o0) / amx::STRIPE;
            // SAFETY: the CPU has AMX and the tile state is granted.
            unsafe { amx::rows(&w, rows, stripes, out) };
            done = stripes * amx::STRIPE;
        }
        int8::rows_portable(&w, rows, done..o1 - o0, out);
    }

    /// `x Wᵢᵀ` for each `Wᵢ` of `ws` (all as wide as `x`'s last
    /// dimension), with `x` rounded to integers where `int8` (as
    /// [`QuantMatrix::matmul_int8`]), in one parallel pass: `x` is prepared
    /// once and every weight's tasks share the threads, where one call per
    /// weight would hand work to the threads and wait for it once per
    /// weight. The same bits as one call each. No gradient (for inference).
    pub fn matmul_each(ws: &[Arc<QuantMatrix>], x: &Tensor, int8: bool) -> Result<Vec<Tensor>> {
        let dims = x.dims();
        let cols = *dims.last().unwrap_or(&0);
        if let Some(w) = ws.iter().find(|w| w.cols != cols) {
            bail!(
                "quantized matmul: input {dims:?} does not end in {}",
                w.cols
            );
        }
        // NF4 has no integer path, nor a matrix read from K-quant blocks:
        // each weight takes its own.
        if int8 && ws.iter().any(|w| !w.native_int8()) {
            return ws.iter().map(|w| w.matmul_int8(x)).collect();
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ms: Vec<&QuantMatrix> = ws.iter().map(|w| w.as_ref()).collect();
        products_of(&ms, &xs, cols, int8)
            .into_iter()
            .zip(ws)
            .map(|(y, w)| {
                let mut out = dims.to_vec();
                *out.last_mut().expect("checked above") = w.rows;
                Tensor::from_vec(y, out, x.device())
            })
            .collect()
    }
}

/// An input of quantized products prepared once (rounded to integers,
/// or regrouped for the f32 kernels) for every weight of a pass and every
/// member of a team that shares the pass (see [`QuantMatrix::claim`]).
pub struct PreparedInput {
    /// Input rows.
    t: usize,
    cols: usize,
    rows: Prepared,
}

enum Prepared {
    F32(Rows),
    Int8(int8::Int8Rows),
}

impl PreparedInput {
    /// `x` (rows of `cols`) for f32 products, or rounded to integers
    /// where `int8` (as [`QuantMatrix::matmul_int8`]; then every weight of
    /// the pass must take its own integer product, see
    /// [`QuantMatrix::native_int8`]).
    pub fn new(x: &[f32], cols: usize, int8: bool) -> Self {
        let rows = match int8 {
            true => Prepared::Int8(int8::Int8Rows::prepare(x, cols)),
            false => Prepared::F32(Rows::prepare(x, cols)),
        };
        Self {
            t: x.len() / cols.max(1),
            cols,
            rows,
        }
    }

    /// [`PreparedInput::new`] in this input's room (for int8 inputs; f32
    /// ones are made anew).
    pub fn refill(&mut self, x: &[f32], cols: usize, int8: bool) {
        match (&mut self.rows, int8) {
            (Prepared::Int8(rows), true) => rows.refill(x, cols),
            _ => *self = Self::new(x, cols, int8),
        }
        self.t = x.len() / cols.max(1);
        self.cols = cols;
    }

    /// Output rows `o0..o1` of `w`'s product into `out`: `[t, o1 - o0]`,
    /// or `[o1 - o0, t]` for int8 inputs (see [`PreparedInput::transposed`]).
    fn task(&self, w: &QuantMatrix, o0: usize, o1: usize, out: &mut [f32]) {
        match &self.rows {
            Prepared::F32(rows) => w.f32_task(rows, o0, o1, out),
            Prepared::Int8(rows) => w.int8_task(rows, o0, o1, out),
        }
    }

    /// Whether tasks write output-row-major parts.
    fn transposed(&self) -> bool {
        matches!(self.rows, Prepared::Int8(_))
    }
}

/// The least weight bytes a member takes at once in
/// [`QuantMatrix::claim`]: enough that taking a piece (one atomic update
/// another core may be reading) costs little next to computing it.
pub const MIN_PIECE_BYTES: usize = 24 << 10;

/// What one member computed of a pass (see [`QuantMatrix::claim`]).
#[derive(Debug, Default)]
pub struct Pieces {
    /// `(weight, o0, o1)`: output rows `o0..o1` of `ws[weight]`.
    ranges: Vec<(usize, usize, usize)>,
    /// Their products, one piece after another, each as a task writes it.
    values: Vec<f32>,
}

/// Each of `ms`'s products `x Wᵀ` (`[t, rows]`) for rows `x` of width
/// `cols`, with `x` rounded to integers where `int8` (then every weight
/// is [`QuantMatrix::native_int8`]), prepared once for all of them, in one
/// parallel pass.
fn products_of(ms: &[&QuantMatrix], x: &[f32], cols: usize, int8: bool) -> Vec<Vec<f32>> {
    let input = PreparedInput::new(x, cols, int8);
    // A weight's first product makes its copy here, not inside one task
    // while the others wait on it.
    ms.iter().for_each(|w| w.ready(int8, input.t));
    // Two tasks per thread and weight: enough to balance, few enough that
    // scheduling stays small next to the work.
    let threads = rayon::current_num_threads();
    let tasks: Vec<(usize, usize, usize)> = ms
        .iter()
        .enumerate()
        .flat_map(|(i, w)| {
            let parts = 2 * threads;
            (0..parts).filter_map(move |k| {
                let (o0, o1) = share_of(w.rows, parts, k);
                (o0 < o1).then_some((i, o0, o1))
            })
        })
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(i, o0, o1)| {
            let mut out = vec![0f32; input.t * (o1 - o0)];
            input.task(ms[i], o0, o1, &mut out);
            out
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = ms.iter().map(|w| vec![0f32; input.t * w.rows]).collect();
    for (&(i, o0, o1), part) in tasks.iter().zip(&parts) {
        place(&mut ys[i], ms[i].rows, &input, o0, o1, part);
    }
    ys
}

/// Output rows `k` of `parts` shares of `rows`: whole AMX / VNNI / AVX2 stripes
/// of 16 (possibly empty at the end).
fn share_of(rows: usize, parts: usize, k: usize) -> (usize, usize) {
    let per = rows.div_ceil(parts).next_multiple_of(16).max(16);
    ((k * per).min(rows), ((k + 1) * per).min(rows))
}

/// Puts a task's part (output rows `o0..o1`) into `y` (`[t, n]`).
fn place(y: &mut [f32], n: usize, input: &PreparedInput, o0: usize, o1: usize, part: &[f32]) {
    let t = input.t;
    if o0 == o1 || t == 0 {
        return;
    }
    // One input row: `[1, n]` and `[n, 1]` are the same layout.
    if input.transposed() && t > 1 {
        for (o, column) in part.chunks_exact(t).enumerate() {
            for (r, &v) in column.iter().enumerate() {
                y[r * n + o0 + o] = v;
            }
        }
    } else {
        for (r, chunk) in part.chunks_exact(o1 - o0).enumerate() {
            y[r * n + o0..r * n + o1].copy_from_slice(chunk);
        }
    }
}

impl QuantMatrix {
    /// Makes what a product of `rows` input rows would make on first use
    /// (the int8 kernel's copy), so that it is not made inside one
    /// thread's share while the others wait.
    pub fn ready(&self, int8: bool, rows: usize) {
        #[cfg(target_arch = "x86_64")]
        if int8 {
            _ = self.striped(rows);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (int8, rows);
    }

    /// A team member's part of one pass over each of `ws`'s products with
    /// `x`: it takes pieces of output rows from `next` (shared by the
    /// members, 0 before the pass) until none are left, so a member
    /// slowed by the other tenants of the memory bus takes fewer, and
    /// puts what it computed in `pieces` (emptied first, its room kept).
    /// [`QuantMatrix::gather`] puts every member's pieces together: the
    /// same bits as [`QuantMatrix::matmul_each`], whoever computes which
    /// piece.
    ///
    /// Pieces shrink as the pass runs out (a quarter of what is left for
    /// two members, down to [`MIN_PIECE_BYTES`] of weights), so the last
    /// ones end close together.
    pub fn claim(
        ws: &[&QuantMatrix],
        x: &PreparedInput,
        next: &AtomicUsize,
        members: usize,
        pieces: &mut Pieces,
    ) -> Result<()> {
        Self::claim_least(ws, x, next, members, MIN_PIECE_BYTES, pieces)
    }

    /// [`QuantMatrix::claim`] with pieces of at least `least_bytes`.
    fn claim_least(
        ws: &[&QuantMatrix],
        x: &PreparedInput,
        next: &AtomicUsize,
        members: usize,
        least_bytes: usize,
        pieces: &mut Pieces,
    ) -> Result<()> {
        pieces.ranges.clear();
        pieces.values.clear();
        Self::check_pass(ws, x)?;
        // Units of 16 output rows (whole AMX / VNNI / AVX2 stripes), weight after
        // weight; a weight's last unit may be partial.
        let units: Vec<usize> = ws.iter().map(|w| w.rows.div_ceil(16)).collect();
        let total: usize = units.iter().sum();
        let unit_bytes = ws.first().map_or(1, |w| {
            let bytes = w.quants.len() + 4 * (w.scales.len() + w.mins.len());
            (16 * bytes / w.rows.max(1)).max(1)
        });
        let least = least_bytes.div_ceil(unit_bytes).max(1);
        loop {
            let at = next.load(Ordering::Relaxed);
            if at >= total {
                break;
            }
            let take = ((total - at) / (2 * members.max(1)))
                .max(least)
                .min(total - at);
            if next
                .compare_exchange_weak(at, at + take, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // Units `at..at + take`, cut where one weight ends.
            let mut first = 0;
            for (i, (w, &n)) in ws.iter().zip(&units).enumerate() {
                let (a, b) = (at.max(first), (at + take).min(first + n));
                if a < b {
                    let (o0, o1) = ((a - first) * 16, ((b - first) * 16).min(w.rows));
                    let from = pieces.values.len();
                    pieces.values.resize(from + x.t * (o1 - o0), 0.0);
                    x.task(w, o0, o1, &mut pieces.values[from..]);
                    pieces.ranges.push((i, o0, o1));
                }
                first += n;
            }
        }
        Ok(())
    }

    /// Each of `ws`'s products (`[t, rows]`) from every member's
    /// [`QuantMatrix::claim`] of one pass, into `ys` (one per weight, their
    /// room kept).
    pub fn gather(
        ws: &[&QuantMatrix],
        x: &PreparedInput,
        parts: &[&Pieces],
        ys: &mut Vec<Vec<f32>>,
    ) {
        ys.resize_with(ws.len(), Vec::new);
        for (y, w) in ys.iter_mut().zip(ws) {
            y.clear();
            y.resize(x.t * w.rows, 0.0);
        }
        for part in parts {
            let mut at = 0;
            for &(i, o0, o1) in &part.ranges {
                let len = x.t * (o1 - o0);
                place(
                    &mut ys[i],
                    ws[i].rows,
                    x,
                    o0,
                    o1,
                    &part.values[at..at + len],
                );
                at += len;
            }
        }
    }

    fn check_pass(ws: &[&QuantMatrix], x: &PreparedInput) -> Result<()> {
        if let Some(w) = ws.iter().find(|w| w.cols != x.cols) {
            bail!(
                "quantized matmul: input of width {} for a weight of {} columns",
                x.cols,
                w.cols
            );
        }
        if x.transposed() && ws.iter().any(|w| !w.native_int8()) {
            bail!(
                "quantized matmul: integer inputs for a weight without its own integer product \
                 (NF4, or K-quant blocks)"
            );
        }
        Ok(())
    }
}

struct QuantizedMatmul {
    w: Arc<QuantMatrix>,
    /// Inputs rounded to 8-bit integers.
    int8: bool,
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let dims = layout.dims();
        if dims.last() != Some(&self.w.cols) {
            bail!(
                "quantized matmul: input {dims:?} does not end in {}",
                self.w.cols
            );
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = self.w.rows;
        let y = if self.int8 {
            self.w.products_int8(x)
        } else {
            self.w.products(x)
        };
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out, inp) = (self.w.rows, self.w.cols);
        let w = tensor(self.w.dequantize(), (out, inp))?;
        let rows = grad.elem_count() / out;
        Ok(Some(
            grad.reshape((rows, out))?
                .matmul(&w)?
                .reshape(arg.shape())?,
        ))
    }
}

/// Input rows taken together through one pass over a block of weights.
const GROUP: usize = 8;

// Plain loops only in the kernels below: a closure (as in
// `array::from_fn`) is a function of its own, compiled without the
// kernel's instruction set, and its `mul_add` becomes a library call.

/// A Q4_1 block's weights without the minimum, `d·q`, as two halves.
#[inline(always)]
fn q4_1_scaled(q: &[u8], d: f32) -> ([f32; 16], [f32; 16]) {
    let q: &[u8; 16] = q.try_into().expect("16 bytes");
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    for i in 0..16 {
        lo[i] = d * (q[i] & 15) as f32;
        hi[i] = d * (q[i] >> 4) as f32;
    }
    (lo, hi)
}

/// `acc += w·x` lane by lane, fused (one rounding, the same on every CPU).
#[inline(always)]
fn fma16(acc: &mut [f32; 16], w: &[f32; 16], x: &[f32]) {
    let x: &[f32; 16] = x.try_into().expect("16 values");
    for i in 0..16 {
        acc[i] = w[i].mul_add(x[i], acc[i]);
    }
}

/// `Σ (d·q + m)·x` of output row `o` for `G` input rows from `r0`, each
/// row with two accumulators (the two halves of every block).
#[inline(always)]
fn q4_1_group<const G: usize>(
    row: &[u8],
    d: &[f32],
    m: &[f32],
    x: &[f32],
    xsum: &[f32],
    cols: usize,
    r0: usize,
) -> [f32; G] {
    let nb = cols / BLOCK;
    let mut lo = [[0f32; 16]; G];
    let mut hi = [[0f32; 16]; G];
    for b in 0..nb {
        let (wl, wh) = q4_1_scaled(&row[b * 16..b * 16 + 16], d[b]);
        for k in 0..G {
            let at = (r0 + k) * cols + b * BLOCK;
            fma16(&mut lo[k], &wl, &x[at..at + 16]);
            fma16(&mut hi[k], &wh, &x[at + 16..at + 32]);
        }
    }
    let mut out = [0f32; G];
    for k in 0..G {
        let mut bias = 0f32;
        for (mb, sb) in m.iter().zip(&xsum[(r0 + k) * nb..(r0 + k + 1) * nb]) {
            bias = mb.mul_add(*sb, bias);
        }
        out[k] = sum16(&lo[k]) + sum16(&hi[k]) + bias;
    }
    out
}

/// The lanes' sum, in a fixed order.
#[inline(always)]
fn sum16(v: &[f32; 16]) -> f32 {
    let mut s = 0f32;
    for x in v {
        s += x;
    }
    s
}

multiversion! {
    /// `Σ (d·q + m)·x` over each output row's Q4_1 blocks for every input
    /// row of `x` (rows of `cols`; `out` is `[rows of x, output rows]`),
    /// the minimums through the block sums `xsum`, each block's weights
    /// made once for up to [`PORTABLE_GROUP`] input rows (the portable path; every
    /// row has its own sums, in the same order in any group, so a row's
    /// result never depends on its batch).
    fn q4_1_rows_portable(quants: &[u8], scales: &[f32], mins: &[f32], x: &[f32], xsum: &[f32], cols: usize, out: &mut [f32]) {
        let nb = cols / BLOCK;
        let t = x.len() / cols;
        let outs = out.len() / t;
        for o in 0..outs {
            let row = &quants[o * nb * 16..(o + 1) * nb * 16];
            let d = &scales[o * nb..(o + 1) * nb];
            let m = &mins[o * nb..(o + 1) * nb];
            let mut r0 = 0;
            while r0 < t {
                let g = PORTABLE_GROUP.min(t - r0);
                let mut ys = [0f32; PORTABLE_GROUP];
                match g {
                    4 => ys = q4_1_group::<4>(row, d, m, x, xsum, cols, r0),
                    3 => ys[..3].copy_from_slice(&q4_1_group::<3>(row, d, m, x, xsum, cols, r0)),
                    2 => ys[..2].copy_from_slice(&q4_1_group::<2>(row, d, m, x, xsum, cols, r0)),
                    _ => ys[..1].copy_from_slice(&q4_1_group::<1>(row, d, m, x, xsum, cols, r0)),
                }
                for (k, &y) in ys[..g].iter().enumerate() {
                    out[(r0 + k) * outs + o] = y;
                }
                r0 += g;
            }
        }
    }
}

/// `(blocks per row, input rows, output rows)` of a kernel's call: `x`
/// holds rows of `cols`, `out` one value per output row for each.
fn call_shape(x: &[f32], cols: usize, out: &[f32]) -> (usize, usize, usize) {
    let t = x.len() / cols.max(1);
    (cols / BLOCK, t, out.len() / t.max(1))
}

/// Input rows whose sums the portable kernels keep at once, each block's
/// weights made once for all of them.
const PORTABLE_GROUP: usize = 4;

/// `Σ d·q·x` of output row `o` for `G` input rows from `r0`, with `per`
/// scales per block (Q8_0: 1; Q8_16: 2, one per 16 weights).
#[inline(always)]
fn q8_0_group<const G: usize>(
    q: &[u8],
    d: &[f32],
    per: usize,
    x: &[f32],
    cols: usize,
    r0: usize,
) -> [f32; G] {
    let nb = cols / BLOCK;
    let mut lo = [[0f32; 16]; G];
    let mut hi = [[0f32; 16]; G];
    for b in 0..nb {
        let qb: &[u8; 32] = q[b * 32..b * 32 + 32].try_into().expect("32 bytes");
        let (dl, dh) = (d[b * per], d[b * per + per - 1]);
        let (mut wl, mut wh) = ([0f32; 16], [0f32; 16]);
        for i in 0..16 {
            wl[i] = dl * qb[i] as i8 as f32;
            wh[i] = dh * qb[16 + i] as i8 as f32;
        }
        for k in 0..G {
            let at = (r0 + k) * cols + b * BLOCK;
            fma16(&mut lo[k], &wl, &x[at..at + 16]);
            fma16(&mut hi[k], &wh, &x[at + 16..at + 32]);
        }
    }
    let mut out = [0f32; G];
    for k in 0..G {
        out[k] = sum16(&lo[k]) + sum16(&hi[k]);
    }
    out
}

multiversion! {
    /// `Σ d·q·x` over each output row's Q8_0 blocks for every input row of
    /// `x` (rows of `cols`; `out` is `[rows of x, output rows]`), as
    /// [`q4_1_rows_portable`] (the portable path); `per` scales per block
    /// (Q8_16: 2).
    fn q8_0_rows_portable(quants: &[u8], scales: &[f32], per: usize, x: &[f32], cols: usize, out: &mut [f32]) {
        let nb = cols / BLOCK;
        let t = x.len() / cols;
        let outs = out.len() / t;
        for o in 0..outs {
            let q = &quants[o * nb * 32..(o + 1) * nb * 32];
            let d = &scales[o * nb * per..(o + 1) * nb * per];
            let mut r0 = 0;
            while r0 < t {
                let g = PORTABLE_GROUP.min(t - r0);
                let mut ys = [0f32; PORTABLE_GROUP];
                match g {
                    4 => ys = q8_0_group::<4>(q, d, per, x, cols, r0),
                    3 => ys[..3].copy_from_slice(&q8_0_group::<3>(q, d, per, x, cols, r0)),
                    2 => ys[..2].copy_from_slice(&q8_0_group::<2>(q, d, per, x, cols, r0)),
                    _ => ys[..1].copy_from_slice(&q8_0_group::<1>(q, d, per, x, cols, r0)),
                }
                for (k, &y) in ys[..g].iter().enumerate() {
                    out[(r0 + k) * outs + o] = y;
                }
                r0 += g;
            }
        }
    }
}

/// The input rows as the kernel for this CPU reads them.
enum Rows {
    /// Regrouped block by block for the AVX-512 kernels (built only where
    /// the CPU has AVX-512F).
    Grouped(Vec<f32>),
    /// The same layout for the AVX2 kernels (built only where the CPU has
    /// AVX2 and FMA but not AVX-512F).
    GroupedAvx2(Vec<f32>),
    /// Row-major, with each row's block sums for Q4_1's minimums.
    Plain { x: Vec<f32>, sums: Vec<f32> },
}

impl Rows {
    fn prepare(x: &[f32], cols: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Rows::Grouped(avx512::interleave(x, cols));
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            return Rows::GroupedAvx2(avx512::interleave(x, cols));
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = cols;
        Rows::Plain {
            x: x.to_vec(),
            sums: x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect(),
        }
    }
}

/// `Σ (d·q + m)·x` for every input row, by the kernel `rows` was prepared for.
fn q4_1_rows(
    quants: &[u8],
    scales: &[f32],
    mins: &[f32],
    rows: &Rows,
    cols: usize,
    out: &mut [f32],
) {
    match rows {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Grouped` exists only where the CPU has AVX-512F; slices
        // are checked inside.
        Rows::Grouped(x) => unsafe { avx512::q4_1_rows(quants, scales, mins, x, cols, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `GroupedAvx2` exists only where the CPU has AVX2 and FMA.
        Rows::GroupedAvx2(x) => unsafe { avx2::q4_1_rows(quants, scales, mins, x, cols, out) },
        #[cfg(not(target_arch = "x86_64"))]
        Rows::Grouped(_) | Rows::GroupedAvx2(_) => unreachable!("built on x86-64 only"),
        Rows::Plain { x, sums } => q4_1_rows_portable(quants, scales, mins, x, sums, cols, out),
    }
}

/// `Σ d·q·x` for every input row, by the kernel `rows` was prepared for;
/// `per` scales per block of 32 (Q8_0: 1, Q8_16: 2).
fn q8_0_rows(quants: &[u8], scales: &[f32], per: usize, rows: &Rows, cols: usize, out: &mut [f32]) {
    match rows {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `q4_1_rows`.
        Rows::Grouped(x) => unsafe { avx512::q8_0_rows(quants, scales, per, x, cols, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `q4_1_rows`.
        Rows::GroupedAvx2(x) => unsafe { avx2::q8_0_rows(quants, scales, per, x, cols, out) },
        #[cfg(not(target_arch = "x86_64"))]
        Rows::Grouped(_) | Rows::GroupedAvx2(_) => unreachable!("built on x86-64 only"),
        Rows::Plain { x, .. } => q8_0_rows_portable(quants, scales, per, x, cols, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_op, random};

    /// ggml blocks of random values, and their dequantized matrix.
    fn blocks(kind: QuantKind, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for b in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.01 + (b % 7) as f32 * 0.003);
            let m = f16::from_f32(-0.05 + (b % 5) as f32 * 0.01);
            bytes.extend_from_slice(&d.to_le_bytes());
            let q: Vec<u8> = (0..BLOCK)
                .map(|i| ((b * 31 + i * 17) % 251) as u8)
                .collect();
            match kind {
                QuantKind::Q4_1 => {
                    bytes.extend_from_slice(&m.to_le_bytes());
                    let nib: Vec<u8> = q.iter().map(|v| v & 15).collect();
                    bytes.extend((0..16).map(|i| nib[i] | (nib[16 + i] << 4)));
                    dense.extend(nib.iter().map(|&n| d.to_f32() * n as f32 + m.to_f32()));
                }
                QuantKind::Q8_0 => {
                    bytes.extend_from_slice(&q);
                    dense.extend(q.iter().map(|&v| d.to_f32() * v as i8 as f32));
                }
                QuantKind::Nf4 | QuantKind::Q8_16 => unreachable!("not made here"),
            }
        }
        (bytes, dense)
    }

    #[test]
    fn equals_dequantize_then_matmul() {
        for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
            let (rows, cols) = (70, 96);
            let (bytes, dense) = blocks(kind, rows, cols);
            let m = Arc::new(QuantMatrix::from_ggml(kind, rows, cols, &bytes).unwrap());
            assert_eq!(m.dequantize(), dense);
            let w = Tensor::from_vec(dense, (rows, cols), &candle_core::Device::Cpu).unwrap();
            let wt = w.t().unwrap();
            let x = random(&[3, cols], 1, 1.0);
            check_op(&[x], &|a| m.matmul(&a[0]), &|a| a[0].matmul(&wt), 1e-5);
        }
        assert!(QuantMatrix::from_ggml(QuantKind::Q8_0, 2, 32, &[0; 10]).is_err());
    }

    /// `product` of every row of `x` on its own.
    fn each_row_alone(x: &Tensor, product: impl Fn(&Tensor) -> Result<Tensor>) -> Vec<Vec<f32>> {
        (0..x.dim(0).unwrap())
            .map(|r| {
                let y = product(&x.narrow(0, r, 1).unwrap()).unwrap();
                y.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect()
    }

    /// The portable kernels, called directly (on AVX-512 machines the
    /// products take the regrouped path): every group size gives each row
    /// the bits it gets alone, the dense product within rounding.
    #[test]
    fn the_portable_kernels_give_a_row_its_own_bits_in_any_group() {
        let (rows, cols) = (24, 256);
        for m in crate::testing::quant_matrices(rows, cols)
            .into_iter()
            .filter(|m| m.kind != QuantKind::Nf4)
        {
            let x = random(&[9, cols], 4, 1.0)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let sums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
            let run = |t: usize, r0: usize| {
                let (x, sums) = (&x[r0 * cols..(r0 + t) * cols], &sums[r0 * cols / BLOCK..]);
                let mut out = vec![f32::NAN; t * rows];
                match m.kind {
                    QuantKind::Q4_1 => {
                        q4_1_rows_portable(&m.quants, &m.scales, &m.mins, x, sums, cols, &mut out)
                    }
                    _ => {
                        let per = m.kind.scales_per_block();
                        q8_0_rows_portable(&m.quants, &m.scales, per, x, cols, &mut out)
                    }
                }
                out
            };
            let alone: Vec<Vec<f32>> = (0..9).map(|r| run(1, r)).collect();
            let dense = m.dequantize();
            for (r, got) in alone.iter().enumerate() {
                let what = format!("{:?}", m.kind);
                let row = &x[r * cols..(r + 1) * cols];
                crate::testing::assert_dense_product(&what, got, &dense, row);
            }
            for t in 1..=9 {
                let y = run(t, 0);
                for (r, want) in alone.iter().take(t).enumerate() {
                    assert_eq!(
                        &y[r * rows..(r + 1) * rows],
                        &want[..],
                        "{:?}: row {r} of {t}",
                        m.kind
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_result_in_any_batch() {
        // Every group size of the kernel (1 to 8 rows, and beyond): each
        // row equals the matrix product within rounding and equals itself
        // computed alone, bit for bit.
        // (Q8_16, read from Q6_K, needs rows of 256.)
        let matrices = crate::testing::quant_matrices(40, 64)
            .into_iter()
            .chain(crate::testing::quant_matrices(24, 256));
        for m in matrices {
            let (rows, cols, kind) = (m.rows, m.cols, m.kind);
            let w =
                Tensor::from_vec(m.dequantize(), (rows, cols), &candle_core::Device::Cpu).unwrap();
            let x = random(&[11, cols], 2, 1.0);
            let alone = each_row_alone(&x, |row| m.matmul(row));
            for t in 1..=11 {
                let y = m
                    .matmul(&x.narrow(0, 0, t).unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let want = x
                    .narrow(0, 0, t)
                    .unwrap()
                    .matmul(&w.t().unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                for r in 0..t {
                    assert_eq!(y[r], alone[r], "{kind:?}: row {r} of {t}");
                    for (a, b) in y[r].iter().zip(&want[r]) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{kind:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn int8_products_are_close_and_the_same_on_every_path() {
        for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
            // 40 output rows: two AMX stripes and a tail of 8; up to 20
            // input rows: a full group of 16 and a partial one.
            let (rows, cols) = (40, 96);
            let (bytes, dense) = blocks(kind, rows, cols);
            let m = Arc::new(QuantMatrix::from_ggml(kind, rows, cols, &bytes).unwrap());
            let w = Tensor::from_vec(dense, (rows, cols), &candle_core::Device::Cpu).unwrap();
            let x = random(&[20, cols], 3, 1.0);
            let alone = each_row_alone(&x, |row| m.matmul_int8(row));
            for t in [1, 3, 4, 5, 16, 17, 20] {
                let xt = x.narrow(0, 0, t).unwrap();
                let y = m.matmul_int8(&xt).unwrap().to_vec2::<f32>().unwrap();
                let want = xt
                    .matmul(&w.t().unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                // The plain loops over every output row give the same bits
                // as the kernel this CPU ran.
                let flat: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
                let prepared = int8::Int8Rows::prepare(&flat, cols);
                let mut portable = vec![0f32; t * rows];
                int8::rows_portable(&m.weight_rows(0), &prepared, 0..rows, &mut portable);
                for r in 0..t {
                    assert_eq!(y[r], alone[r], "{kind:?}: row {r} of {t}");
                    let column: Vec<f32> = (0..rows).map(|o| portable[o * t + r]).collect();
                    assert_eq!(y[r], column, "{kind:?}: row {r}");
                    // Rounding the input to 8 bits: errors of about 1/254
                    // of each block's largest value.
                    let scale = want[r].iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (a, b) in y[r].iter().zip(&want[r]) {
                        assert!((a - b).abs() <= 2e-2 * scale, "{kind:?}: {a} vs {b}");
                    }
                }
            }
        }
        eprintln!(
            "int8 products on AMX, VNNI or AVX2: {}",
            QuantMatrix::int8_accelerated()
        );
    }

    #[test]
    fn products_of_several_weights_at_once_equal_one_call_each() {
        // Weights of 40 and 24 rows (AMX stripes and tails), Q4_1, Q8_0 and
        // NF4, over 1, 3 and 17 input rows, shaped `[b, t, cols]`.
        let mut ws = crate::testing::quant_matrices(40, 128);
        ws.extend(crate::testing::quant_matrices(24, 128));
        let quantized: Vec<_> = ws
            .iter()
            .filter(|w| w.kind != QuantKind::Nf4)
            .cloned()
            .collect();
        for t in [1, 3, 17] {
            let x = random(&[1, t, 128], 5, 1.0);
            for (set, int8) in [(&ws, false), (&quantized, true), (&ws, true)] {
                let got = QuantMatrix::matmul_each(set, &x, int8).unwrap();
                assert_eq!(got.len(), set.len());
                for (w, y) in set.iter().zip(&got) {
                    let alone = if int8 {
                        w.matmul_int8(&x)
                    } else {
                        w.matmul(&x)
                    }
                    .unwrap();
                    assert_eq!(y.dims(), alone.dims());
                    let (y, alone): (Vec<f32>, Vec<f32>) = (
                        y.flatten_all().unwrap().to_vec1().unwrap(),
                        alone.flatten_all().unwrap().to_vec1().unwrap(),
                    );
                    assert_eq!(y, alone, "{:?}, {t} rows, int8 {int8}", w.kind);
                }
                // Shared by a team of 1 to 3 members: the same bits again.
                let refs: Vec<&QuantMatrix> = set.iter().map(|w| w.as_ref()).collect();
                let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let input = PreparedInput::new(&flat, 128, int8);
                let nf4 = set.iter().any(|w| w.kind == QuantKind::Nf4);
                // Pieces of the default size, and of one unit of 16 rows
                // at least (cut inside the weights).
                for (members, least) in [(1, MIN_PIECE_BYTES), (2, MIN_PIECE_BYTES), (2, 1), (3, 1)]
                {
                    // Each member on a thread of its own, taking pieces
                    // as they come.
                    let next = AtomicUsize::new(0);
                    let parts: Result<Vec<Pieces>> = crate::team::run(members, |_| {
                        let mut pieces = Pieces::default();
                        QuantMatrix::claim_least(&refs, &input, &next, members, least, &mut pieces)
                            .map(|_| pieces)
                    })
                    .into_iter()
                    .collect();
                    if int8 && nf4 {
                        assert!(parts.is_err());
                        continue;
                    }
                    let parts = parts.unwrap();
                    let pieces: usize = parts.iter().map(|p| p.ranges.len()).sum();
                    assert!(least > 1 || pieces > set.len(), "{pieces} pieces");
                    let views: Vec<&Pieces> = parts.iter().collect();
                    let mut ys = vec![vec![f32::NAN; 3]; 9];
                    QuantMatrix::gather(&refs, &input, &views, &mut ys);
                    assert_eq!(ys.len(), refs.len());
                    for (y, want) in ys.iter().zip(&got) {
                        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                        assert_eq!(y, &want, "{members} members, {t} rows, int8 {int8}");
                    }
                }
            }
        }
        let narrow = random(&[2, 96], 6, 1.0);
        assert!(QuantMatrix::matmul_each(&ws, &narrow, false).is_err());
    }

    #[test]
    fn nf4_products_are_the_dequantized_ones_on_every_path() {
        let m = crate::testing::quant_matrices(24, 128).pop().unwrap();
        assert_eq!(m.kind(), QuantKind::Nf4);
        // A code per weight, half a byte, and an f32 absmax per 64.
        assert_eq!(m.bytes(), 24 * 128 / 2 + 4 * 24 * 128 / 64);
        let dense = m.dequantize();
        let x = random(&[9, 128], 5, 1.0);
        let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = m
            .matmul(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Integer activations are not offered for NF4: the same product.
        let y8: Vec<f32> = m
            .matmul_int8(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, y8);
        let mut portable = vec![0f32; 9 * 24];
        nf4::nf4_rows_portable(&m.quants, &m.scales, &flat, 128, &mut portable);
        for r in 0..9 {
            for o in 0..24 {
                let want: f32 = (0..128)
                    .map(|c| flat[r * 128 + c] * dense[o * 128 + c])
                    .sum();
                let (a, b) = (y[r * 24 + o], portable[r * 24 + o]);
                assert!(
                    (a - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{a} vs {want}"
                );
                assert!(
                    (b - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{b} vs {want}"
                );
            }
        }
        // Every weight is a level times its block's absmax, rounded once.
        for (i, &v) in dense.iter().enumerate() {
            let d = m.scales[i / 64];
            assert!(
                nf4::NF4_LEVELS.iter().any(|&l| l * d == v),
                "weight {i}: {v}"
            );
        }
        assert!(QuantMatrix::from_nf4(1, 96, &[0; 96], vec![1.0; 2]).is_err());
        assert!(QuantMatrix::from_nf4(2, 48, &[0; 96], vec![1.0; 2]).is_err());
        assert!(QuantMatrix::from_nf4(2, 64, &[16; 128], vec![1.0; 2]).is_err());
        assert!(QuantMatrix::from_ggml(QuantKind::Nf4, 2, 64, &[0; 64]).is_err());
    }
}
