//! Matrix products in bf16 with f32 accumulation, the semantics of
//! PyTorch's CPU autocast for a matmul: both operands rounded to bf16
//! (nearest, ties to even), their products (exact in f32) summed in f32.
//!
//! The right operand is packed once ([`Bf16Matrix`]: a frozen weight is
//! packed when first used and kept); the left one is rounded on each call.
//! On Intel AMX (Sapphire Rapids and later) one `tdpbf16ps` multiplies 16
//! rows by 16 columns over 32 positions of the shared dimension; elsewhere
//! the same rounded operands go through the f32 GEMM: the same values up to
//! the order of the f32 sums, except that the tiles (and the vector
//! rounding that feeds them) treat subnormal bf16 values as zero.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout as TensorLayout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::gemm::{Out, View, matmul};
use crate::storage::{slice, tensor, with_f32};

#[cfg(target_arch = "x86_64")]
mod amx;
mod blocks;
#[cfg(target_arch = "x86_64")]
mod dots;
#[cfg(target_arch = "x86_64")]
pub(crate) use amx::{interleave_pairs, transpose16};
pub use blocks::Bf16Blocks;

/// Positions of the shared dimension per tile product (bf16 pairs × 16).
const KSTEP: usize = 32;
/// Rows or columns per tile.
const TILE: usize = 16;

/// `x` rounded to bf16 (nearest, ties to even; NaN stays NaN), as bits.
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// `src` rounded to bf16 into `dst`, 16 at a time where the CPU has
/// AVX512-BF16.
pub(crate) fn round_into(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    amx::round_row(src, dst);
    #[cfg(not(target_arch = "x86_64"))]
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = to_bf16(x);
    }
}

/// The f32 value of bf16 bits.
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Whether bf16 products run natively here: on AMX tiles, or with
/// AVX512-BF16's dot products where the CPU has those and no tiles.
pub fn bf16_accelerated() -> bool {
    kernel().is_some()
}

/// How bf16 products run natively here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AMX tiles (Intel Sapphire Rapids and later).
    Tiles,
    /// AVX512-BF16's `vdpbf16ps` (AMD Zen 4 and 5; Intel Cooper Lake).
    Dots,
}

/// The native bf16 kernel, if any; `SKILLET_BF16_KERNEL=dots` picks the
/// dot products where the tiles exist too (to compare the two).
fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            let dots_asked = std::env::var("SKILLET_BF16_KERNEL").is_ok_and(|v| v == "dots");
            if !dots_asked && crate::tiles::available(crate::tiles::TileType::Bf16) {
                Some(Kernel::Tiles)
            } else if dots::available() {
                Some(Kernel::Dots)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Whether the native bf16 kernel is AMX's tiles (else the dot
/// products); a bf16 product here without either is a caller's bug.
#[cfg(target_arch = "x86_64")]
fn on_tiles() -> bool {
    match kernel() {
        Some(k) => k == Kernel::Tiles,
        None => panic!("bf16 products without AMX or AVX512-BF16"),
    }
}

/// The right operand `B` (`[k, n]`) of bf16 products, rounded and packed
/// for the kernel that runs here.
#[derive(Clone)]
pub struct Bf16Matrix {
    k: usize,
    n: usize,
    layout: Layout,
}

impl std::fmt::Debug for Bf16Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.layout {
            Layout::Tiles { .. } => "tiles",
            Layout::Rounded(_) => "rounded f32",
        };
        write!(f, "Bf16Matrix({}×{}, {kind})", self.k, self.n)
    }
}

#[derive(Clone)]
enum Layout {
    /// For the tiles: `k` padded to 32 and `n` to 16; column block `j`,
    /// position pair `p`, column `c`, element `t` at
    /// `((j · kp/2 + p) · 16 + c) · 2 + t`, holding `B[2p + t][16j + c]`.
    Tiles { kp: usize, data: Vec<u16> },
    /// Row-major `[k, n]` f32 holding bf16 values, for the f32 GEMM.
    Rounded(Vec<f32>),
}

impl Bf16Matrix {
    /// `B` = `w` (`[rows, cols]` row-major), or its transpose.
    pub fn pack(w: &[f32], rows: usize, cols: usize, transposed: bool) -> Self {
        Self::pack_for(w, rows, cols, transposed, bf16_accelerated())
    }

    /// [`Bf16Matrix::pack`] for the tile kernel, or for the f32 GEMM.
    pub(crate) fn pack_for(
        w: &[f32],
        rows: usize,
        cols: usize,
        transposed: bool,
        tiles: bool,
    ) -> Self {
        assert_eq!(
            w.len(),
            rows * cols,
            "bf16 pack: {rows}×{cols} from {}",
            w.len()
        );
        let (k, n) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let at = |kk: usize, nn: usize| {
            if transposed {
                w[nn * cols + kk]
            } else {
                w[kk * cols + nn]
            }
        };
        let layout = if tiles {
            let kp = padded(k);
            let blocks = n.div_ceil(TILE);
            let mut data = vec![0u16; blocks * kp * TILE];
            data.par_chunks_mut(kp * TILE)
                .enumerate()
                .for_each(|(j, block)| {
                    for kk in 0..k {
                        let (p, t) = (kk / 2, kk % 2);
                        for c in 0..TILE.min(n - j * TILE) {
                            block[(p * TILE + c) * 2 + t] = to_bf16(at(kk, j * TILE + c));
                        }
                    }
                });
            Layout::Tiles { kp, data }
        } else {
            let mut data = vec![0f32; k * n];
            data.par_chunks_mut(n.max(1))
                .enumerate()
                .for_each(|(kk, row)| {
                    for (nn, v) in row.iter_mut().enumerate() {
                        *v = from_bf16(to_bf16(at(kk, nn)));
                    }
                });
            Layout::Rounded(data)
        };
        Self { k, n, layout }
    }

    /// Rows (the shared dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.layout {
            Layout::Tiles { data, .. } => data.len() * 2,
            Layout::Rounded(data) => data.len() * 4,
        }
    }
}

/// The right operand `B` (`[k, n]`) of a tile product, by column block.
pub(crate) trait Panels: Sync {
    /// Rows of `B` (the shared dimension).
    fn k(&self) -> usize;
    /// Columns of `B`.
    fn n(&self) -> usize;
    /// Column block `j` (columns `16j..16j + 16`) in the tile layout (see
    /// `Layout::Tiles`): stored, or written into `scratch` (`kp · 16`
    /// values, handed over with the pairs from pair `k / 2` on zeroed and
    /// the rest holding anything: every position below `k` of the valid
    /// columns must be written, those from `k` on left zero or written as
    /// zero; columns past `n` may hold anything).
    fn panel<'a>(&'a self, j: usize, scratch: &'a mut [u16]) -> &'a [u16];
    /// Whether [`Panels::panel`] computes (then the kernel asks for each
    /// block once per product, for all rows together).
    fn computed(&self) -> bool;
}

/// The shared dimension padded for the tiles.
pub(crate) fn padded(k: usize) -> usize {
    k.next_multiple_of(KSTEP).max(KSTEP)
}

/// Column blocks of a packed [`Bf16Matrix`] in the tile layout.
pub(crate) struct Stored<'a> {
    k: usize,
    n: usize,
    kp: usize,
    data: &'a [u16],
}

impl Panels for Stored<'_> {
    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn panel<'a>(&'a self, j: usize, _: &'a mut [u16]) -> &'a [u16] {
        &self.data[j * self.kp * TILE..(j + 1) * self.kp * TILE]
    }

    fn computed(&self) -> bool {
        false
    }
}

/// Column blocks of `B` = `Wᵀ` (`forward`) or `W`, for a dense f32 `W`
/// (`[rows, cols]`, rows `stride` values apart), rounded as the kernel
/// asks for them.
pub(crate) struct DensePanels<'a> {
    w: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
    forward: bool,
}

impl<'a> DensePanels<'a> {
    /// `W` row-major, its rows back to back.
    pub(crate) fn new(w: &'a [f32], rows: usize, cols: usize, forward: bool) -> Self {
        assert_eq!(w.len(), rows * cols, "dense panels: {rows}×{cols}");
        Self::strided(w, rows, cols, cols, forward)
    }

    /// `W` whose row `r` starts at `w[r · stride]` (a head's rows of a
    /// `[S, heads, D]` tensor, say).
    pub(crate) fn strided(
        w: &'a [f32],
        rows: usize,
        cols: usize,
        stride: usize,
        forward: bool,
    ) -> Self {
        assert!(
            stride >= cols && (rows == 0 || w.len() >= (rows - 1) * stride + cols),
            "dense panels: {rows}×{cols}, rows {stride} apart, over {} values",
            w.len()
        );
        Self {
            w,
            rows,
            cols,
            stride,
            forward,
        }
    }
}

impl Panels for DensePanels<'_> {
    fn k(&self) -> usize {
        if self.forward { self.cols } else { self.rows }
    }

    fn n(&self) -> usize {
        if self.forward { self.rows } else { self.cols }
    }

    fn panel<'a>(&'a self, j: usize, scratch: &'a mut [u16]) -> &'a [u16] {
        #[cfg(target_arch = "x86_64")]
        if amx::panels_vectorized() {
            // SAFETY: the CPU has the features (checked), and the panel
            // has the length the layout needs.
            unsafe {
                amx::dense_panel(
                    self.w,
                    [self.rows, self.cols, self.stride],
                    self.forward,
                    j,
                    scratch,
                )
            };
            return scratch;
        }
        let mut rounded = [0u16; KSTEP];
        if self.forward {
            // Column c is weight row 16j + c; its pair p is
            // (W[o][2p], W[o][2p + 1]).
            for c in 0..TILE.min(self.rows - TILE * j) {
                let row = &self.w[(TILE * j + c) * self.stride..][..self.cols];
                for (chunk, src) in row.chunks(KSTEP).enumerate() {
                    round_into(src, &mut rounded[..src.len()]);
                    for (e, &v) in rounded[..src.len()].iter().enumerate() {
                        let kk = chunk * KSTEP + e;
                        scratch[((kk / 2) * TILE + c) * 2 + kk % 2] = v;
                    }
                }
            }
        } else {
            // Pair p of column c is (W[2p][16j + c], W[2p + 1][16j + c]).
            let (c0, width) = (TILE * j, TILE.min(self.cols - TILE * j));
            for o in 0..self.rows {
                let src = &self.w[o * self.stride + c0..][..width];
                round_into(src, &mut rounded[..width]);
                let base = (o / 2) * TILE * 2 + o % 2;
                for (c, &v) in rounded[..width].iter().enumerate() {
                    scratch[base + 2 * c] = v;
                }
            }
        }
        scratch
    }

    fn computed(&self) -> bool {
        true
    }
}

/// Runs of a matrix's rows start at a multiple of this to be read from a
/// [`BothWays`] packing (whole column blocks of 16 rows, whole pairs).
pub(crate) const ROW_ALIGN: usize = KSTEP;

/// A dense f32 `W` (`[rows, cols]`, rows `stride` values apart: a key or
/// value head of a `[S, heads, D]` tensor) packed once in the tile layout
/// both ways, so that the products of many tiles over runs of its rows
/// (attention's key blocks) read stored column blocks instead of packing
/// the same rows again for each tile. The values are [`DensePanels`]'.
pub(crate) struct BothWays {
    rows: usize,
    cols: usize,
    /// `Wᵀ` (`[cols, rows]`): column block `j` is rows `16j..16j + 16` of
    /// `W`, `padded(cols)` pair positions each.
    t: Vec<u16>,
    /// `W`: column block `j` is columns `16j..16j + 16`, `kp` pair
    /// positions each (zeros from `rows` on).
    w: Vec<u16>,
    /// `padded(rows)` and one more step, so a run ending at the last row
    /// still has its padding inside the block.
    kp: usize,
}

impl BothWays {
    pub(crate) fn new(w: &[f32], rows: usize, cols: usize, stride: usize) -> Self {
        let (cp, kp) = (padded(cols), padded(rows) + KSTEP);
        let mut scratch = vec![0u16; kp.max(cp) * TILE];
        let by_rows = DensePanels::strided(w, rows, cols, stride, true);
        let mut t = vec![0u16; rows.div_ceil(TILE) * cp * TILE];
        for (j, block) in t.chunks_exact_mut(cp * TILE).enumerate() {
            // Only the room the block uses (the scratch is sized for the
            // other way, a whole head's length).
            let room = &mut scratch[..cp * TILE];
            room.fill(0);
            block.copy_from_slice(&by_rows.panel(j, room)[..cp * TILE]);
        }
        let by_cols = DensePanels::strided(w, rows, cols, stride, false);
        let len = padded(rows) * TILE;
        let mut wb = vec![0u16; cols.div_ceil(TILE) * kp * TILE];
        for (j, block) in wb.chunks_exact_mut(kp * TILE).enumerate() {
            let room = &mut scratch[..len];
            room.fill(0);
            block[..len].copy_from_slice(&by_cols.panel(j, room)[..len]);
        }
        Self {
            rows,
            cols,
            t,
            w: wb,
            kp,
        }
    }

    /// `B` = rows `j0..j0 + n` of `W` transposed (`[cols, n]`).
    pub(crate) fn rows_t(&self, j0: usize, n: usize) -> StoredRows<'_> {
        self.view(j0, n, true)
    }

    /// `B` = rows `j0..j0 + n` of `W` (`[n, cols]`).
    pub(crate) fn rows(&self, j0: usize, n: usize) -> StoredRows<'_> {
        self.view(j0, n, false)
    }

    fn view(&self, j0: usize, n: usize, transposed: bool) -> StoredRows<'_> {
        assert!(
            j0.is_multiple_of(ROW_ALIGN) && j0 + n <= self.rows,
            "packed rows {j0}..{} of {}",
            j0 + n,
            self.rows
        );
        StoredRows {
            m: self,
            j0,
            n,
            transposed,
        }
    }
}

/// Rows of a [`BothWays`] as the right operand of a tile product.
pub(crate) struct StoredRows<'a> {
    m: &'a BothWays,
    j0: usize,
    n: usize,
    transposed: bool,
}

impl Panels for StoredRows<'_> {
    fn k(&self) -> usize {
        if self.transposed { self.m.cols } else { self.n }
    }

    fn n(&self) -> usize {
        if self.transposed { self.n } else { self.m.cols }
    }

    fn panel<'a>(&'a self, j: usize, _: &'a mut [u16]) -> &'a [u16] {
        if self.transposed {
            // Rows from j0 are whole column blocks from j0 / 16; columns
            // past `n` are the next rows, which the product ignores.
            let len = padded(self.m.cols) * TILE;
            &self.m.t[(self.j0 / TILE + j) * len..][..len]
        } else {
            // Pair positions from j0 / 2 of column block j; positions past
            // `n` hold the next rows (or zeros), against the left operand's
            // zero padding.
            let len = padded(self.n) * TILE;
            &self.m.w[(j * self.m.kp + self.j0) * TILE..][..len]
        }
    }

    fn computed(&self) -> bool {
        false
    }
}

/// `out = a · B` for `a` (`[m, k]` f32 row-major, rounded to bf16 here)
/// into `out` (`[m, n]` row-major), on the global thread pool.
pub fn matmul_bf16(a: &[f32], m: usize, b: &Bf16Matrix, out: &mut [f32]) {
    let (k, n) = (b.k, b.n);
    match &b.layout {
        Layout::Tiles { kp, data } => matmul_panels(
            a,
            m,
            &Stored {
                k,
                n,
                kp: *kp,
                data,
            },
            out,
        ),
        Layout::Rounded(bw) => {
            if !checked(a, m, k, n, out) {
                return;
            }
            let ar: Vec<f32> = a.par_iter().map(|&x| from_bf16(to_bf16(x))).collect();
            matmul(
                m,
                n,
                k,
                View::rows(&ar, k),
                View::rows(bw, n),
                Out::new(out, n),
                true,
            );
        }
    }
}

/// Checks the shapes of `a · B` and settles the empty cases; true when
/// there is a product to compute.
fn checked(a: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) -> bool {
    assert_eq!(a.len(), m * k, "bf16 matmul: a is not {m}×{k}");
    assert_eq!(out.len(), m * n, "bf16 matmul: out is not {m}×{n}");
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        out.fill(0.0);
        return false;
    }
    true
}

/// `out = a · B` on the tiles, `B` given by column blocks. Only where
/// [`bf16_accelerated`] (the callers' check).
pub(crate) fn matmul_panels(a: &[f32], m: usize, b: &dyn Panels, out: &mut [f32]) {
    let (k, n) = (b.k(), b.n());
    if !checked(a, m, k, n, out) {
        return;
    }
    // SAFETY: `out` is a live slice of `out.len()` values.
    unsafe { tiles(a, m, b, out.as_mut_ptr(), out.len(), true) };
}

/// A left operand (`[m, k]`) rounded to bf16 once, in the kernel's
/// layout (rows of the padded `k`, whole tiles of rows), for products of
/// the same rows against many right operands: attention's query rows of a
/// tile meet every block of keys.
pub(crate) struct RoundedRows {
    data: Vec<u16>,
    m: usize,
    k: usize,
    kp: usize,
}

impl Default for RoundedRows {
    fn default() -> Self {
        Self::empty()
    }
}

impl RoundedRows {
    /// `a` (`[m, k]` row-major) rounded, on this thread.
    pub(crate) fn new(a: &[f32], m: usize, k: usize) -> Self {
        let mut rounded = Self::empty();
        rounded.refill(a, m, k);
        rounded
    }

    /// `a` (`[m, k]` row-major) rounded, over the thread pool.
    pub(crate) fn new_par(a: &[f32], m: usize, k: usize) -> Self {
        let mut rounded = Self::empty();
        rounded
            .rows_mut(m, k)
            .zip(a.par_chunks(k.max(1)))
            .for_each(|(dst, src)| round_into(src, dst));
        rounded
    }

    /// Becomes `a` (`[m, k]` row-major) rounded, keeping its buffer.
    pub(crate) fn refill(&mut self, a: &[f32], m: usize, k: usize) {
        assert_eq!(a.len(), m * k, "rounded rows: a is not {m}×{k}");
        let kp = padded(k);
        round_rows(a, m, k, kp, &mut self.data, false);
        (self.m, self.k, self.kp) = (m, k, kp);
    }

    /// Becomes an `m × k` operand whose rows `fill(r, row)` writes (the
    /// first `k` values of row `r`, rounded by the caller; the padding is
    /// cleared here), keeping its buffer: for rows rounded as they are
    /// made, while they are in cache.
    pub(crate) fn refill_rows(
        &mut self,
        m: usize,
        k: usize,
        mut fill: impl FnMut(usize, &mut [u16]),
    ) {
        let kp = padded(k);
        for (r, row) in padded_rows(&mut self.data, m, kp)
            .chunks_exact_mut(kp)
            .enumerate()
        {
            fill(r, values_of(row, k));
        }
        (self.m, self.k, self.kp) = (m, k, kp);
    }

    /// Becomes an `m × k` operand whose rows the caller writes, over the
    /// thread pool: the first `k` values of each row, in order (the
    /// padding is cleared here), keeping its buffer.
    pub(crate) fn rows_mut(
        &mut self,
        m: usize,
        k: usize,
    ) -> impl IndexedParallelIterator<Item = &mut [u16]> {
        let kp = padded(k);
        (self.m, self.k, self.kp) = (m, k, kp);
        padded_rows(&mut self.data, m, kp)
            .par_chunks_mut(kp)
            .map(move |row| values_of(row, k))
    }

    /// The rows as they stand (the first `k` values of each), to be
    /// rewritten in place over the thread pool.
    pub(crate) fn values_mut(&mut self) -> impl IndexedParallelIterator<Item = &mut [u16]> {
        let (m, k, kp) = (self.m, self.k, self.kp);
        self.data[..m * kp]
            .par_chunks_mut(kp.max(1))
            .map(move |row| &mut row[..k])
    }

    /// Nothing yet, for [`RoundedRows::refill`] and
    /// [`RoundedRows::refill_transposed`].
    pub(crate) fn empty() -> Self {
        Self {
            data: Vec::new(),
            m: 0,
            k: 0,
            kp: 0,
        }
    }

    /// Becomes `x`ᵀ (`m` = `cols`, `k` = `rows`) rounded, for `x`
    /// (`[rows, cols]` row-major), keeping its buffer: a left operand that
    /// is the transpose of one made for another product.
    pub(crate) fn refill_transposed(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "rounded rows: x is not {rows}×{cols}");
        let kp = padded(rows);
        let len = cols.next_multiple_of(TILE) * kp;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        let data = &mut self.data[..len];
        #[cfg(target_arch = "x86_64")]
        amx::round_transposed(x, [rows, cols], data, kp);
        #[cfg(not(target_arch = "x86_64"))]
        for (c, row) in data.chunks_exact_mut(kp).take(cols).enumerate() {
            for (r, v) in row[..rows].iter_mut().enumerate() {
                *v = to_bf16(x[r * cols + c]);
            }
        }
        // The padding reads as zero: past `rows` in each row, and the rows
        // past `cols`.
        // (Guarded: an empty `fill` still costs a call, once per row.)
        let (valid, pad) = data.split_at_mut(cols * kp);
        if rows < kp {
            valid
                .chunks_exact_mut(kp)
                .for_each(|row| row[rows..].fill(0));
        }
        if !pad.is_empty() {
            pad.fill(0);
        }
        (self.m, self.k, self.kp) = (cols, rows, kp);
    }
}

/// `out = a · B` (or `+=`, where `add`) for rows rounded once
/// ([`RoundedRows`]), on this thread: the values [`matmul_panels`] gives
/// for the same f32 rows. Only where [`bf16_accelerated`] (the
/// callers' check).
pub(crate) fn matmul_rounded_serial(a: &RoundedRows, b: &dyn Panels, out: &mut [f32], add: bool) {
    product_of_rounded(a, b, out, add, false)
}

/// [`matmul_rounded_serial`] over the thread pool.
pub(crate) fn matmul_rounded(a: &RoundedRows, b: &dyn Panels, out: &mut [f32], add: bool) {
    product_of_rounded(a, b, out, add, true)
}

/// The checked body of [`matmul_rounded`] and [`matmul_rounded_serial`].
fn product_of_rounded(a: &RoundedRows, b: &dyn Panels, out: &mut [f32], add: bool, parallel: bool) {
    let (m, k, n) = (a.m, b.k(), b.n());
    assert_eq!(k, a.k, "bf16 matmul: a has {} columns, B {k} rows", a.k);
    assert_eq!(out.len(), m * n, "bf16 matmul: out is not {m}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            out.fill(0.0);
        }
        return;
    }
    // SAFETY: `out` holds `m · n` initialized values.
    unsafe { rounded_tiles(a, b, out.as_mut_ptr(), out.len(), add, parallel) };
}

/// [`matmul_rounded`] into a new vector whose values are written once,
/// never zeroed first.
pub(crate) fn matmul_rounded_new(a: &RoundedRows, b: &dyn Panels) -> Vec<f32> {
    let (m, k, n) = (a.m, b.k(), b.n());
    assert_eq!(k, a.k, "bf16 matmul: a has {} columns, B {k} rows", a.k);
    if k == 0 {
        return vec![0f32; m * n];
    }
    // SAFETY: the kernel writes all `m · n` values (`add` is false) and
    // reads none.
    unsafe { written_once(m * n, |out| rounded_tiles(a, b, out, m * n, false, true)) }
}

/// The tile product of rounded rows `a` against `b` (`k` matching,
/// non-empty), over the thread pool where `parallel`.
///
/// # Safety
/// `out` is valid for `out_len ≥ m · n` f32 writes, and holds initialized
/// values where `add`.
unsafe fn rounded_tiles(
    a: &RoundedRows,
    b: &dyn Panels,
    out: *mut f32,
    out_len: usize,
    add: bool,
    parallel: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let tiles = on_tiles();
        // SAFETY: the CPU has the kernel's features (`kernel()`, the
        // callers' check), `a` has the layout the kernel reads (by
        // construction, `kp` the padding of `B`'s `k`), and `out` is the
        // caller's promise.
        unsafe { amx::matmul(&a.data, a.m, a.kp, b, out, out_len, parallel, tiles, add) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, out, out_len, add, parallel);
        unreachable!("tiles exist only on x86-64")
    }
}

/// A new vector of `len` values written by `write` through a pointer to
/// them, never zeroed first (zeroing the outputs of every product cost
/// 5–10% of a LoRA step). Empty where `len` is zero, `write` not called.
///
/// # Safety
/// `write` writes every one of the `len` values and reads none.
unsafe fn written_once(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    write(out.spare_capacity_mut().as_mut_ptr().cast());
    // SAFETY: the caller's promise: all `len` values are initialized.
    unsafe { out.set_len(len) };
    out
}

/// [`matmul_panels`] into a new vector whose values are written once,
/// never zeroed first.
pub(crate) fn matmul_panels_new(a: &[f32], m: usize, b: &dyn Panels) -> Vec<f32> {
    let (k, n) = (b.k(), b.n());
    assert_eq!(a.len(), m * k, "bf16 matmul: a is not {m}×{k}");
    if k == 0 {
        return vec![0f32; m * n];
    }
    // SAFETY: the kernel writes all `m · n` values and reads none.
    unsafe { written_once(m * n, |out| tiles(a, m, b, out, m * n, true)) }
}

/// The tile product of [`matmul_panels`] for a non-empty `m × k × n`,
/// writing all `m · n` results through `out`, on the thread pool where
/// `parallel`.
///
/// # Safety
/// `out` is valid for `out_len ≥ m · n` f32 writes.
unsafe fn tiles(
    a: &[f32],
    m: usize,
    b: &dyn Panels,
    out: *mut f32,
    out_len: usize,
    parallel: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let tiles = on_tiles();
        let kp = padded(b.k());
        let mut ar = ROUNDED.take();
        round_rows(a, m, b.k(), kp, &mut ar, parallel);
        // SAFETY: the CPU has the kernel's features (`kernel()`), the
        // operands have the shapes the kernel reads (the callers' checks,
        // and `ar` by construction), and `out` is the caller's promise.
        unsafe { amx::matmul(&ar, m, kp, b, out, out_len, parallel, tiles, false) };
        crate::reused::hand_back(&ROUNDED, ar);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, m, b, out, out_len, parallel);
        unreachable!("tiles exist only on x86-64")
    }
}

/// A frozen `[out, in]` weight packed for bf16 products both ways: `x Wᵀ`
/// forward and `dy W` backward (for the tiles, twice the bytes of the bf16
/// weight, as much as the f32 one; without them, two f32 copies).
#[derive(Debug)]
pub struct Bf16Weight {
    fwd: Bf16Matrix,
    bwd: Bf16Matrix,
}

impl Bf16Weight {
    /// Packs `w` (`[out, in]` f32).
    pub fn new(w: &Tensor) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        with_f32([w], "bf16 weight", |[w]| {
            Ok(Self {
                fwd: Bf16Matrix::pack(w, out, inp, true),
                bwd: Bf16Matrix::pack(w, out, inp, false),
            })
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.bytes()
    }

    /// `Wᵀ` (`[in, out]`), the right operand of `x Wᵀ`.
    pub(crate) fn forward(&self) -> &Bf16Matrix {
        &self.fwd
    }

    /// `W` (`[out, in]`), the right operand of `dy W`.
    pub(crate) fn backward(&self) -> &Bf16Matrix {
        &self.bwd
    }
}

struct Bf16Linear(Arc<Bf16Weight>);

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16 linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &TensorLayout) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let (inp, out) = (self.0.fwd.k, self.0.fwd.n);
        let dims = xl.dims();
        if dims.last() != Some(&inp) {
            bail!("bf16 linear: input {dims:?} does not end in {inp}");
        }
        let rows = x.len() / inp;
        let mut y = vec![0f32; rows * out];
        matmul_bf16(x, rows, &self.0.fwd, &mut y);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (out, inp) = (self.0.bwd.k, self.0.bwd.n);
        let dx = with_f32([dy], self.name(), |[dy]| {
            let rows = dy.len() / out;
            let mut dx = vec![0f32; rows * inp];
            matmul_bf16(dy, rows, &self.0.bwd, &mut dx);
            Ok(dx)
        })?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// `x Wᵀ` in bf16 with f32 accumulation, for `x` of shape `[..., in]` and
/// a frozen weight packed as `w`; backward gives `x` its gradient `dy W`,
/// in bf16 too (autocast's semantics).
pub fn frozen_matmul_bf16(x: &Tensor, w: &Arc<Bf16Weight>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Bf16Linear(w.clone()))
}

/// `a · B` over bf16-rounded operands into `out` (`[m, n]`), `B` = `w`
/// (`[rows, cols]` row-major) or, where `transposed`, `wᵀ`: on the tiles,
/// each 16-column block of `B` rounded as the product reaches it (no copy
/// kept); else through the f32 GEMM on a rounded copy.
pub(crate) fn rounded_product_into(
    a: &[f32],
    m: usize,
    w: &[f32],
    (rows, cols): (usize, usize),
    transposed: bool,
    out: &mut [f32],
) {
    if bf16_accelerated() {
        // `DensePanels`' forward orientation is `wᵀ`.
        matmul_panels(a, m, &DensePanels::new(w, rows, cols, transposed), out);
    } else {
        let b = Bf16Matrix::pack_for(w, rows, cols, transposed, false);
        matmul_bf16(a, m, &b, out);
    }
}

/// [`rounded_product_into`] into a new vector (on the tiles written once,
/// not zeroed first).
pub(crate) fn rounded_product(
    a: &[f32],
    m: usize,
    w: &[f32],
    dims: (usize, usize),
    transposed: bool,
) -> Vec<f32> {
    if bf16_accelerated() {
        return matmul_panels_new(a, m, &DensePanels::new(w, dims.0, dims.1, transposed));
    }
    let n = if transposed { dims.0 } else { dims.1 };
    let mut out = vec![0f32; m * n];
    rounded_product_into(a, m, w, dims, transposed, &mut out);
    out
}

/// `a` (`[rows, cols]` row-major) transposed, on the thread pool.
pub(crate) fn transposed(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    t.par_chunks_mut(rows.max(1))
        .enumerate()
        .for_each(|(c, col)| {
            for (r, v) in col.iter_mut().enumerate() {
                *v = a[r * cols + c];
            }
        });
    t
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's buffer for the rounded left operand.
    static ROUNDED: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `a` (`[m, k]`) rounded to bf16 into the first `⌈m/16⌉·16 · kp` values
/// of `ar` in rows of `kp` (zero-padded) and `m` padded to whole tiles
/// with zero rows, for the tile kernel. Each of those values is written
/// (`ar` may hold an earlier product's). On the thread pool where
/// `parallel`.
fn round_rows(a: &[f32], m: usize, k: usize, kp: usize, ar: &mut Vec<u16>, parallel: bool) {
    let rows = padded_rows(ar, m, kp);
    let round = |(dst, src): (&mut [u16], &[f32])| round_into(src, values_of(dst, k));
    if k == 0 {
        rows.fill(0);
    } else if parallel {
        rows.par_chunks_mut(kp).zip(a.par_chunks(k)).for_each(round);
    } else {
        rows.chunks_mut(kp).zip(a.chunks(k)).for_each(round);
    }
}

/// The first `m` rows of `kp` values in `ar`, for the caller to write,
/// after the zero rows that pad `m` to whole tiles (`ar` grown to hold
/// them, never shrunk: shrinking and growing again would zero the growth
/// each time, only for it to be overwritten).
fn padded_rows(ar: &mut Vec<u16>, m: usize, kp: usize) -> &mut [u16] {
    let mp = m.next_multiple_of(TILE);
    if ar.len() < mp * kp {
        ar.resize(mp * kp, 0);
    }
    let (rows, pad) = ar[..mp * kp].split_at_mut(m * kp);
    // (Guarded: an empty `fill` still costs a call, once per row.)
    if !pad.is_empty() {
        pad.fill(0);
    }
    rows
}

/// The first `k` values of a padded row, for the caller to write, its
/// padding past them zeroed.
fn values_of(row: &mut [u16], k: usize) -> &mut [u16] {
    let (values, tail) = row.split_at_mut(k);
    if !tail.is_empty() {
        tail.fill(0);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_rounded_transposed_equal_the_transpose_rounded() {
        // One buffer refilled: large first, so a smaller refill must clear
        // what the larger one left in its padding.
        let mut got = RoundedRows::empty();
        for (rows, cols) in [(192, 256), (16, 16), (37, 21), (64, 40), (5, 3), (0, 4)] {
            let x = values(rows * cols, 3);
            let mut xt = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    xt[c * rows + r] = x[r * cols + c];
                }
            }
            let want = RoundedRows::new(&xt, cols, rows);
            got.refill_transposed(&x, rows, cols);
            assert_eq!((got.m, got.k, got.kp), (want.m, want.k, want.kp));
            let len = want.data.len();
            assert_eq!(got.data[..len], want.data[..], "{rows}×{cols}");
        }
    }

    #[test]
    fn rows_packed_both_ways_read_as_the_dense_panels() {
        // A short run of wide rows (a head of 200 over 20 positions) and a
        // long run of narrow ones, rows 3 heads apart.
        for (rows, cols) in [(20usize, 200usize), (300, 40)] {
            let stride = 3 * cols;
            let w = values((rows - 1) * stride + cols, 7);
            let both = BothWays::new(&w, rows, cols, stride);
            for j0 in (0..rows).step_by(ROW_ALIGN) {
                for n in [1, 17, rows - j0] {
                    let n = n.min(rows - j0);
                    let at = &w[j0 * stride..];
                    for transposed in [true, false] {
                        let dense = DensePanels::strided(at, n, cols, stride, transposed);
                        let stored = match transposed {
                            true => both.rows_t(j0, n),
                            false => both.rows(j0, n),
                        };
                        assert_eq!((stored.k(), stored.n()), (dense.k(), dense.n()));
                        let kp = padded(dense.k());
                        for j in 0..dense.n().div_ceil(TILE) {
                            let mut scratch = vec![0u16; kp * TILE];
                            let want = dense.panel(j, &mut scratch).to_vec();
                            let got = stored.panel(j, &mut []);
                            // Every pair position below k of every column
                            // that exists; the stored block holds the next
                            // rows past them.
                            for p in 0..dense.k().div_ceil(2) {
                                for c in 0..TILE.min(dense.n() - TILE * j) {
                                    for t in 0..2 {
                                        if 2 * p + t >= dense.k() {
                                            continue;
                                        }
                                        let i = (p * TILE + c) * 2 + t;
                                        assert_eq!(
                                            got[i], want[i],
                                            "{rows}x{cols} from {j0}, {n} rows, transposed {transposed}, block {j}"
                                        );
                                    }
                                }
                            }
                            assert_eq!(got.len(), want.len().min(kp * TILE));
                        }
                    }
                }
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.731 + seed as f32 * 1.37).sin() * 1.5)
            .collect()
    }

    /// `a · B` in f64 over bf16-rounded operands (`B` = `w` or `wᵀ`).
    fn reference(a: &[f32], m: usize, w: &[f32], rows: usize, cols: usize, t: bool) -> Vec<f64> {
        let (k, n) = if t { (cols, rows) } else { (rows, cols) };
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|kk| {
                        let b = if t {
                            w[j * cols + kk]
                        } else {
                            w[kk * cols + j]
                        };
                        r(a[i * k + kk]) * r(b)
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway to an odd neighbour: up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn products_equal_the_rounded_operands_product() {
        // Ragged shapes: rows, columns and the shared dimension off the
        // tile sizes; both orientations of the packed operand.
        for (m, rows, cols, t) in [
            (37, 50, 70, true),
            (16, 64, 32, false),
            (5, 33, 17, false),
            (64, 96, 576, true),
            // More than one task of rows (256) and of column blocks (8 × 16).
            (300, 150, 64, true),
        ] {
            let (k, n) = if t { (cols, rows) } else { (rows, cols) };
            let a = values(m * k, 1);
            let w = values(rows * cols, 2);
            let want = reference(&a, m, &w, rows, cols, t);
            // The tile kernel where this CPU has it, and the f32 GEMM.
            let layouts: &[bool] = if bf16_accelerated() {
                &[true, false]
            } else {
                &[false]
            };
            for &tiles in layouts {
                let b = Bf16Matrix::pack_for(&w, rows, cols, t, tiles);
                assert_eq!((b.k(), b.n()), (k, n));
                let mut out = vec![f32::NAN; m * n];
                matmul_bf16(&a, m, &b, &mut out);
                for (i, (&g, &r)) in out.iter().zip(&want).enumerate() {
                    // f32 sums of exact products: a few ulps of the magnitudes.
                    assert!(
                        (g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()) * (k as f64).sqrt(),
                        "{m}×{k}×{n}, tiles {tiles}, at {i}: {g} vs {r}"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_dot_kernel_equals_the_rounded_operands_product() {
        // AVX512-BF16's dot products on the tile kernel's operands, even
        // where the tiles are the kernel chosen: ragged shapes (rows off
        // the 8-row blocks, columns off the 3 × 16 blocks, the shared
        // dimension off 32), stored and computed column blocks, serial
        // and parallel.
        if !dots::available() {
            eprintln!("skipped: no AVX512-BF16 here");
            return;
        }
        for (m, rows, cols, t) in [(37, 50, 70, true), (5, 33, 17, false), (300, 150, 64, true)] {
            let (k, n) = if t { (cols, rows) } else { (rows, cols) };
            let a = values(m * k, 3);
            let w = values(rows * cols, 4);
            let want = reference(&a, m, &w, rows, cols, t);
            let packed = Bf16Matrix::pack_for(&w, rows, cols, t, true);
            let Layout::Tiles { kp, data } = &packed.layout else {
                panic!("packed for the tiles")
            };
            let stored = Stored {
                k,
                n,
                kp: *kp,
                data,
            };
            let computed = DensePanels::new(&w, rows, cols, t);
            let mut ar = Vec::new();
            round_rows(&a, m, k, *kp, &mut ar, true);
            for (b, parallel) in [
                (&stored as &dyn Panels, true),
                (&computed, true),
                (&stored, false),
            ] {
                let mut out = vec![f32::NAN; m * n];
                // SAFETY: the CPU has AVX512-BF16 (checked above); `out`
                // holds m · n values.
                unsafe {
                    amx::matmul(
                        &ar,
                        m,
                        *kp,
                        b,
                        out.as_mut_ptr(),
                        out.len(),
                        parallel,
                        false,
                        false,
                    )
                };
                for (i, (&g, &r)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()) * (k as f64).sqrt(),
                        "{m}×{k}×{n}, computed {}, at {i}: {g} vs {r}",
                        b.computed()
                    );
                }
            }
        }
    }

    #[test]
    fn the_frozen_op_is_the_f32_one_to_bf16_precision() {
        use crate::frozen_matmul;
        use crate::testing::random;
        let w = random(&[40, 70], 1, 1.0);
        let x = random(&[3, 5, 70], 2, 1.0);
        let packed = Arc::new(Bf16Weight::new(&w).unwrap());
        assert!(packed.bytes() >= 2 * 40 * 70 * 2);
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let y = frozen_matmul_bf16(xv.as_tensor(), &packed).unwrap();
        let want = frozen_matmul(&x, &w).unwrap();
        let dy = random(&[3, 5, 40], 3, 1.0);
        let gx = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = gx.get(&xv).unwrap();
        let want_gx = dy.broadcast_matmul(&w).unwrap();
        // bf16 keeps 8 bits: about 0.4% per operand, less once summed.
        for (got, want) in [(&y, &want), (gx, &want_gx)] {
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap();
            let rel = (err / scale).unwrap().to_scalar::<f32>().unwrap();
            assert!(rel > 0.0 && rel < 1e-2, "relative error {rel}");
        }
    }

    #[test]
    fn the_trained_op_multiplies_rounded_operands_both_ways() {
        use crate::linear_bf16;
        use crate::testing::random;
        use candle_core::{DType, Var};
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        // Ragged against the tiles: 37 rows, 70 in, 40 out.
        let w = Var::from_tensor(&random(&[40, 70], 1, 1.0)).unwrap();
        let x = Var::from_tensor(&random(&[37, 70], 2, 1.0)).unwrap();
        let dy = random(&[37, 40], 3, 1.0);
        let y = linear_bf16(x.as_tensor(), w.as_tensor()).unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let (rx, rw, rdy) = (round(x.as_tensor()), round(w.as_tensor()), round(&dy));
        let want = [
            (y.clone(), rx.matmul(&rw.t().unwrap()).unwrap()),
            (g.get(&x).unwrap().clone(), rdy.matmul(&rw).unwrap()),
            (
                g.get(&w).unwrap().clone(),
                rdy.t().unwrap().matmul(&rx).unwrap(),
            ),
        ];
        for (i, (got, want)) in want.iter().enumerate() {
            // The same rounded operands: only the f32 sums' order differs.
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            let err = err.to_scalar::<f32>().unwrap();
            assert!(err < 2e-5, "product {i}: {err}");
            // And bf16, not f32: the unrounded product is measurably off.
            if i == 0 {
                let exact = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
                let off = (got - exact).unwrap().abs().unwrap().max_all().unwrap();
                assert!(off.to_scalar::<f32>().unwrap() > 1e-3);
            }
        }
        // A detached weight gets no gradient, its input still does.
        let y = linear_bf16(x.as_tensor(), &w.as_tensor().detach()).unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none() && g.get(&x).is_some());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_rounding_equals_the_scalar_one() {
        // Normal values, halfway cases, infinities; 37 = two vectors + 5.
        let mut src: Vec<f32> = values(35, 7).iter().map(|x| x * 1e3).collect();
        src.extend([1.0 + 1.0 / 256.0, f32::INFINITY]);
        let mut got = vec![0u16; src.len()];
        amx::round_row(&src, &mut got);
        let want: Vec<u16> = src.iter().map(|&x| to_bf16(x)).collect();
        assert_eq!(got, want);
    }
}
