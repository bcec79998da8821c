//! Causal self-attention with grouped-query heads, fused: scores, mask,
//! softmax and the value product per tile of queries, with the softmax
//! statistics (`lse`, one float per query and head) kept for backward and
//! the probabilities recomputed there, as FlashAttention does (Dao et al.
//! 2022, arXiv 2205.14135; backward as in FlashAttention-2, arXiv
//! 2307.08691). A tile is up to 64 queries of all `G` query heads that
//! share one key/value head, against the keys they may see, so memory is
//! `O(G·64·S)` per worker instead of the `O(H·T·S)` probability tensor the
//! composed version keeps for backward.
//!
//! Layouts follow the projections, so no transposes are needed: queries
//! `[B, T, H, D]`, keys and values `[B, S, K, D]`, output `[B, T, H, D]`;
//! query head `h` reads key/value head `h / G` (transformers' `repeat_kv`).
//! The mask is causal (queries are the last `T` of `S` positions), with
//! optional key padding, a sliding window, and packing segments (a query
//! sees only keys of its own segment). A query that may see no key gives 0.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, D, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::bf16::{DensePanels, bf16_accelerated, matmul_panels_serial};
use crate::gemm::{Out, View, matmul};
use crate::rope::{RopeLayout, RopeTable, rotate};
use crate::storage::{slice, tensor, with_f32};
use crate::vec::{dot, exp_shifted_sum, max, scale};

/// Queries per tile (per head).
const TILE: usize = 64;
/// Keys per block within a tile: a block's scores and their gradient stay
/// in cache while its products run.
const KEYS: usize = 256;

/// Which keys each query may attend to.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    batch: usize,
    queries: usize,
    keys: usize,
    key_mask: Option<Arc<Vec<u8>>>,
    segments: Option<Arc<Vec<u32>>>,
    window: Option<usize>,
}

impl AttentionMask {
    /// Causal order for `queries` new positions at the end of `keys`
    /// positions (`keys - queries` of them cached), `batch` sequences.
    pub fn causal(batch: usize, queries: usize, keys: usize) -> Result<Self> {
        if keys < queries {
            bail!("attention mask: {queries} queries over only {keys} keys");
        }
        Ok(Self {
            batch,
            queries,
            keys,
            key_mask: None,
            segments: None,
            window: None,
        })
    }

    /// Key padding: `[batch, keys]` row-major, 0 where the key is padding.
    pub fn with_key_mask(mut self, mask: Vec<u8>) -> Result<Self> {
        if mask.len() != self.batch * self.keys {
            bail!(
                "key mask has {} entries, expected {}",
                mask.len(),
                self.batch * self.keys
            );
        }
        self.key_mask = Some(Arc::new(mask));
        Ok(self)
    }

    /// Packing: `[batch, keys]` row-major segment ids; a query sees only
    /// keys whose segment equals its own position's.
    pub fn with_segments(mut self, segments: Vec<u32>) -> Result<Self> {
        if segments.len() != self.batch * self.keys {
            bail!(
                "segments have {} entries, expected {}",
                segments.len(),
                self.batch * self.keys
            );
        }
        self.segments = Some(Arc::new(segments));
        Ok(self)
    }

    /// A sliding window: a query sees at most the last `window` positions,
    /// itself included (Mistral's convention).
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    fn offset(&self) -> usize {
        self.keys - self.queries
    }

    /// Keys `lo..hi` that causality and the window leave to query `i`.
    fn range(&self, i: usize) -> (usize, usize) {
        let q = self.offset() + i;
        let lo = self.window.map_or(0, |w| (q + 1).saturating_sub(w));
        (lo, q + 1)
    }

    /// Whether query `i` of sequence `b` may see key `j`.
    fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        let (lo, hi) = self.range(i);
        let row = b * self.keys;
        j >= lo
            && j < hi
            && self.key_mask.as_ref().is_none_or(|m| m[row + j] != 0)
            && self
                .segments
                .as_ref()
                .is_none_or(|s| s[row + j] == s[row + self.offset() + i])
    }

    /// The mask as an additive bias `[batch, 1, 1, queries, keys]` (0 or
    /// -1e30), for the composed reference.
    pub fn bias(&self) -> Result<Tensor> {
        let (t, s) = (self.queries, self.keys);
        let mut bias = vec![-1e30f32; self.batch * t * s];
        for b in 0..self.batch {
            for i in 0..t {
                for j in 0..s {
                    if self.allowed(b, i, j) {
                        bias[(b * t + i) * s + j] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(bias, (self.batch, 1, 1, t, s), &Device::Cpu)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) s: usize,
    pub(crate) h: usize,
    pub(crate) k: usize,
    pub(crate) d: usize,
    pub(crate) g: usize,
}

/// One tile: sequence `b`, key/value head `kh`, queries `i0..i0 + n`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tile {
    b: usize,
    kh: usize,
    i0: usize,
    n: usize,
}

impl Dims {
    pub(crate) fn tiles(&self) -> Vec<Tile> {
        let mut tiles = Vec::new();
        for b in 0..self.b {
            for kh in 0..self.k {
                for i0 in (0..self.t).step_by(TILE) {
                    tiles.push(Tile {
                        b,
                        kh,
                        i0,
                        n: TILE.min(self.t - i0),
                    });
                }
            }
        }
        tiles
    }

    /// Offset of query row `(b, i, head)` in a `[B, T, H, D]` tensor.
    fn q_at(&self, b: usize, i: usize, head: usize) -> usize {
        ((b * self.t + i) * self.h + head) * self.d
    }

    /// Key/value head `kh` of sequence `b` from key `lo` (`[S', D]`) as
    /// a product's right operand, or its transpose.
    fn kv<'a>(&self, data: &'a [f32], b: usize, kh: usize, lo: usize, transposed: bool) -> Rhs<'a> {
        Rhs {
            w: &data[((b * self.s + lo) * self.k + kh) * self.d..],
            stride: self.k * self.d,
            transposed,
        }
    }

    /// The tile's `G·n` query rows of `x` (`[B, T, H, D]`), head-major.
    fn gather(&self, x: &[f32], tile: Tile) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.g * tile.n * self.d);
        for g in 0..self.g {
            for i in tile.i0..tile.i0 + tile.n {
                let at = self.q_at(tile.b, i, tile.kh * self.g + g);
                out.extend_from_slice(&x[at..at + self.d]);
            }
        }
        out
    }

    /// Writes tile rows back into `x` (`[B, T, H, D]`).
    pub(crate) fn scatter(&self, x: &mut [f32], tile: Tile, rows: &[f32]) {
        for g in 0..self.g {
            for ii in 0..tile.n {
                let at = self.q_at(tile.b, tile.i0 + ii, tile.kh * self.g + g);
                let r = (g * tile.n + ii) * self.d;
                x[at..at + self.d].copy_from_slice(&rows[r..r + self.d]);
            }
        }
    }

    /// Index of `(b, head, i)` in the `[B, H, T]` statistics.
    fn lse_at(&self, tile: Tile, g: usize, ii: usize) -> usize {
        (tile.b * self.h + tile.kh * self.g + g) * self.t + tile.i0 + ii
    }
}

/// Backward splits each (sequence, key/value head)'s tiles into runs of
/// consecutive tiles, at least this many runs in all, of about equal work
/// within a head. A run sums its tiles' key and value gradients into its
/// own buffers, in tile order, and the runs' sums are then added in run
/// order: the result depends neither on how the runs were scheduled nor
/// on the thread count.
const RUNS: usize = 8;

/// The most values of a thread's tile scratch kept between tiles (16 MiB).
const KEPT: usize = 4 << 20;

thread_local! {
    /// Each thread's scratch for a tile's scores, probabilities and their
    /// gradients, reused from tile to tile.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's scratch, at least `len` values holding anything (another
/// tile started on this thread while one waits gets a new one).
fn scratch(len: usize) -> Vec<f32> {
    let mut v = SCRATCH.take();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

fn hand_back(v: Vec<f32>) {
    if v.capacity() <= KEPT {
        SCRATCH.set(v);
    }
}

/// A run of a head's tiles: the `dQ` rows of each, and their sums of `dK`
/// and `dV` over keys `first..` of the head (rows of `D`).
struct Run {
    dq: Vec<(Tile, Vec<f32>)>,
    first: usize,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Where a tile adds its keys' gradients: rows of `D` for keys `first..`
/// of its head.
struct KeyGrads<'a> {
    first: usize,
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

pub(crate) struct Attention {
    pub(crate) mask: AttentionMask,
    pub(crate) scale: f32,
    /// `[B, H, T]` log-sum-exp of each query's scaled scores (−∞ when it
    /// sees no key), written by forward for backward.
    pub(crate) lse: Arc<Mutex<Vec<f32>>>,
    /// RoPE applied to `q` and `k` inside the op (rotated copies made for
    /// the call and again in backward, never kept by the graph).
    pub(crate) rope: Option<(RopeTable, RopeLayout)>,
    /// Products on bf16 tiles (see [`attention_rope`]).
    pub(crate) bf16: bool,
}

/// The right operand of a tile product: `W` (`[k, n]`) or, `transposed`,
/// `Wᵀ` (`W` `[n, k]`), its rows `stride` values apart in `w`.
#[derive(Clone, Copy)]
struct Rhs<'a> {
    w: &'a [f32],
    stride: usize,
    transposed: bool,
}

impl Attention {
    /// `out` (`[m, n]`) = (or `+=`, where `add`) `a` (`[m, k]` row-major)
    /// times `b` (`[k, n]`): on bf16 tiles (operands rounded to bf16, sums
    /// in f32) in a bf16 op, else by the f32 GEMM; on this thread.
    fn product(&self, a: &[f32], [m, k, n]: [usize; 3], b: Rhs, out: &mut [f32], add: bool) {
        let (a, out) = (&a[..m * k], &mut out[..m * n]);
        if self.bf16 {
            let (rows, cols) = if b.transposed { (n, k) } else { (k, n) };
            let panels = DensePanels::strided(b.w, rows, cols, b.stride, b.transposed);
            if add {
                let mut part = vec![0f32; m * n];
                matmul_panels_serial(a, m, &panels, &mut part);
                out.iter_mut().zip(&part).for_each(|(o, p)| *o += p);
            } else {
                matmul_panels_serial(a, m, &panels, out);
            }
            return;
        }
        let w = View::rows(b.w, b.stride);
        let w = if b.transposed { w.t() } else { w };
        let out = Out::new(out, n);
        let out = if add { out.accumulate() } else { out };
        matmul(m, n, k, View::rows(a, k), w, out, false);
    }

    /// The tile's query rows (`G·n × D`, head-major), times the scale.
    fn queries(&self, dims: &Dims, tile: Tile, q: &[f32]) -> Vec<f32> {
        let mut qt = dims.gather(q, tile);
        scale(&mut qt, self.scale);
        qt
    }

    /// The blocks of keys a tile's queries may see: the first key of each,
    /// and how many.
    fn key_blocks(&self, tile: Tile) -> impl Iterator<Item = (usize, usize)> {
        let lo = self.mask.range(tile.i0).0;
        let hi = self.mask.range(tile.i0 + tile.n - 1).1;
        (lo..hi)
            .step_by(KEYS)
            .map(move |j0| (j0, KEYS.min(hi - j0)))
    }

    /// Masked scores `s` (`G·n × nb`) of a tile's scaled queries `qt`
    /// (`G·n × D`) against keys `j0..j0 + nb`.
    fn scores(
        &self,
        dims: &Dims,
        tile: Tile,
        qt: &[f32],
        k: &[f32],
        (j0, nb): (usize, usize),
        s: &mut [f32],
    ) {
        let rows = dims.g * tile.n;
        let keys = dims.kv(k, tile.b, tile.kh, j0, true);
        self.product(qt, [rows, dims.d, nb], keys, s, false);
        let exact = self.mask.key_mask.is_some() || self.mask.segments.is_some();
        for (r, row) in s[..rows * nb].chunks_exact_mut(nb).enumerate() {
            let i = tile.i0 + r % tile.n;
            let (a, z) = self.mask.range(i);
            let (a, z) = (a.clamp(j0, j0 + nb), z.clamp(j0, j0 + nb));
            row[..a - j0].fill(f32::NEG_INFINITY);
            row[z - j0..].fill(f32::NEG_INFINITY);
            if exact {
                for j in a..z {
                    if !self.mask.allowed(tile.b, i, j) {
                        row[j - j0] = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// One tile's output rows (`G·n × D`, head-major) and the log-sum-exp
    /// of each of its queries (−∞ when a query sees no key): block by
    /// block of keys, with a running maximum and sum per query and the
    /// output rescaled as the maximum grows (FlashAttention's online
    /// softmax).
    pub(crate) fn tile_forward(
        &self,
        dims: &Dims,
        tile: Tile,
        [q, k, v]: [&[f32]; 3],
    ) -> (Vec<f32>, Vec<f32>) {
        let (rows, d) = (dims.g * tile.n, dims.d);
        let qt = self.queries(dims, tile, q);
        let mut o = vec![0f32; rows * d];
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
        let mut p = scratch(rows * KEYS);
        for (j0, nb) in self.key_blocks(tile) {
            let p = &mut p[..rows * nb];
            self.scores(dims, tile, &qt, k, (j0, nb), p);
            for (r, row) in p.chunks_exact_mut(nb).enumerate() {
                let top = m[r].max(max(row));
                if top == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let shrink = (m[r] - top).exp();
                l[r] = l[r] * shrink + exp_shifted_sum(row, top);
                if shrink != 1.0 {
                    scale(&mut o[r * d..(r + 1) * d], shrink);
                }
                m[r] = top;
            }
            let values = dims.kv(v, tile.b, tile.kh, j0, false);
            self.product(p, [rows, nb, d], values, &mut o, true);
        }
        hand_back(p);
        let lse = m
            .iter()
            .zip(&l)
            .zip(o.chunks_exact_mut(d))
            .map(|((&m, &l), row)| {
                if m == f32::NEG_INFINITY {
                    row.fill(0.0);
                    f32::NEG_INFINITY
                } else {
                    scale(row, 1.0 / l);
                    m + l.ln()
                }
            })
            .collect();
        (o, lse)
    }

    /// One tile's share of the gradients: its queries' `dQ` rows, returned,
    /// and the `dK`, `dV` rows of the keys it saw, added to `sums`; block
    /// by block of keys. `inputs` are `q`, `k`, `v`, the forward output `o`
    /// and `dO`.
    fn tile_backward(
        &self,
        dims: &Dims,
        tile: Tile,
        inputs: [&[f32]; 5],
        lse: &[f32],
        sums: &mut KeyGrads,
    ) -> Vec<f32> {
        let [q, k, v, o, dout] = inputs;
        let (d, rows) = (dims.d, dims.g * tile.n);
        let qt = self.queries(dims, tile, q);
        let dot_t = dims.gather(dout, tile);
        // rowsum(dO ∘ O), the same for every block.
        let ot = dims.gather(o, tile);
        let di: Vec<f32> = dot_t
            .chunks_exact(d)
            .zip(ot.chunks_exact(d))
            .map(|(a, b)| dot(a, b))
            .collect();
        let lse: Vec<f32> = (0..rows)
            .map(|r| lse[dims.lse_at(tile, r / tile.n, r % tile.n)])
            .collect();
        let (qtt, dott) = match self.bf16 {
            true => (transposed(&qt, rows, d), transposed(&dot_t, rows, d)),
            false => (Vec::new(), Vec::new()),
        };
        let mut dq = vec![0f32; rows * d];
        let mut buf = scratch(2 * rows * KEYS);
        for (j0, nb) in self.key_blocks(tile) {
            let (p, ds) = buf.split_at_mut(rows * nb);
            let ds = &mut ds[..rows * nb];
            // P again, from the saved log-sum-exp.
            self.scores(dims, tile, &qt, k, (j0, nb), p);
            for (row, &l) in p.chunks_exact_mut(nb).zip(&lse) {
                if l == f32::NEG_INFINITY {
                    row.fill(0.0);
                } else {
                    exp_shifted_sum(row, l);
                }
            }
            // dP = dO Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)).
            let values = dims.kv(v, tile.b, tile.kh, j0, true);
            self.product(&dot_t, [rows, d, nb], values, ds, false);
            for ((dsr, pr), &di) in ds.chunks_exact_mut(nb).zip(p.chunks_exact(nb)).zip(&di) {
                for (x, &pv) in dsr.iter_mut().zip(pr) {
                    *x = pv * (*x - di);
                }
            }
            let keys = dims.kv(k, tile.b, tile.kh, j0, false);
            self.product(ds, [rows, nb, d], keys, &mut dq, true);
            // dK = dSᵀ (scale·Q) and dV = Pᵀ dO, added at the block's keys.
            let at = (j0 - sums.first) * d;
            self.add_key_grads(ds, [&qt, &qtt], [rows, nb, d], &mut sums.dk[at..]);
            self.add_key_grads(p, [&dot_t, &dott], [rows, nb, d], &mut sums.dv[at..]);
        }
        hand_back(buf);
        scale(&mut dq, self.scale);
        dq
    }

    /// `acc` (`nb` rows of `D`) `+= wᵀ x` for `w` (`rows × nb`) and `x`
    /// (`rows × D`; `xt` its transpose, made once per tile, for bf16). On
    /// bf16 tiles `(xᵀ w)ᵀ`, the product's shared dimension being the
    /// tile's rows: only `x` and the `D × nb` result are transposed, never
    /// the wide `w`.
    fn add_key_grads(
        &self,
        w: &[f32],
        [x, xt]: [&[f32]; 2],
        [rows, nb, d]: [usize; 3],
        acc: &mut [f32],
    ) {
        if !self.bf16 {
            let out = Out::new(acc, d).accumulate();
            let w = View::rows(w, nb).t();
            matmul(nb, d, rows, w, View::rows(x, d), out, false);
            return;
        }
        let by_rows = Rhs {
            w,
            stride: nb,
            transposed: false,
        };
        let mut t = vec![0f32; d * nb];
        self.product(xt, [d, rows, nb], by_rows, &mut t, false);
        add_transposed(&t, d, nb, acc);
    }

    /// Backward's runs (see [`RUNS`]): ranges of `tiles`, each within one
    /// head, in order.
    fn runs(&self, dims: &Dims, tiles: &[Tile]) -> Vec<std::ops::Range<usize>> {
        let groups = dims.b * dims.k;
        let per_group = tiles.len() / groups.max(1);
        let pieces = RUNS.div_ceil(groups.max(1));
        let mut runs = Vec::new();
        for g in 0..groups {
            let start = g * per_group;
            let work: Vec<usize> = tiles[start..start + per_group]
                .iter()
                .map(|t| {
                    let lo = self.mask.range(t.i0).0;
                    (self.mask.range(t.i0 + t.n - 1).1 - lo) * t.n
                })
                .collect();
            let total: usize = work.iter().sum();
            let (mut from, mut done, mut piece) = (0, 0, 1);
            for (i, w) in work.iter().enumerate() {
                done += w;
                let last = i + 1 == per_group;
                if last || done * pieces >= total * piece {
                    runs.push(start + from..start + i + 1);
                    from = i + 1;
                    while done * pieces >= total * piece {
                        piece += 1;
                    }
                }
            }
        }
        runs
    }

    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, t, h, d) = q.shape().dims4()?;
        let (kb, s, kh, kd) = k.shape().dims4()?;
        if k.dims() != v.dims() || kb != b || kd != d || kh == 0 || h % kh != 0 {
            bail!(
                "attention: queries {:?}, keys {:?}, values {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let m = &self.mask;
        if (m.batch, m.queries, m.keys) != (b, t, s) {
            bail!(
                "attention: mask for {}×{}×{}, inputs {b}×{t}×{s}",
                m.batch,
                m.queries,
                m.keys
            );
        }
        Ok(Dims {
            b,
            t,
            s,
            h,
            k: kh,
            d,
            g: h / kh,
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql, kl, vl)?;
        let (q, k, v) = (
            slice(qs, ql, "attention")?,
            slice(ks, kl, "attention")?,
            slice(vs, vl, "attention")?,
        );
        let rotated = match &self.rope {
            Some((table, layout)) => Some((
                rotate(q, ql.dims(), table, *layout, false)?,
                rotate(k, kl.dims(), table, *layout, false)?,
            )),
            None => None,
        };
        let (q, k) = match &rotated {
            Some((q, k)) => (q.as_slice(), k.as_slice()),
            None => (q, k),
        };
        let tiles = dims.tiles();
        let results: Vec<(Vec<f32>, Vec<f32>)> = tiles
            .par_iter()
            .map(|&tile| self.tile_forward(&dims, tile, [q, k, v]))
            .collect();
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; dims.b * dims.h * dims.t];
        for (tile, (o, l)) in tiles.iter().zip(&results) {
            dims.scatter(&mut out, *tile, o);
            for g in 0..dims.g {
                for ii in 0..tile.n {
                    lse[dims.lse_at(*tile, g, ii)] = l[g * tile.n + ii];
                }
            }
        }
        if let Ok(mut saved) = self.lse.lock() {
            *saved = lse;
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().map(|l| l.clone()).unwrap_or_default();
        // With RoPE inside: the rotated inputs again here, and their
        // gradients rotated back at the end (a rotation keeps the shape).
        let (qr, kr) = match &self.rope {
            Some((table, layout)) => (
                Some(rotated(q, table, *layout, false)?),
                Some(rotated(k, table, *layout, false)?),
            ),
            None => (None, None),
        };
        let (q, k) = (qr.as_ref().unwrap_or(q), kr.as_ref().unwrap_or(k));
        let (ql, kl) = (q.layout().clone(), k.layout().clone());
        let dims = self.dims(&ql, &kl, v.layout())?;
        if lse.len() != dims.b * dims.h * dims.t {
            bail!("attention backward without its forward statistics");
        }
        let tiles = dims.tiles();
        let (dq, dk, dv) = with_f32([q, k, v, res, grad], self.name(), |inputs| {
            let runs: Vec<Run> = self
                .runs(&dims, &tiles)
                .into_par_iter()
                .map(|run| {
                    let tiles = &tiles[run];
                    let first = self.mask.range(tiles[0].i0).0;
                    let last = tiles[tiles.len() - 1];
                    let len = (self.mask.range(last.i0 + last.n - 1).1 - first) * dims.d;
                    let (mut dk, mut dv) = (vec![0f32; len], vec![0f32; len]);
                    let mut sums = KeyGrads {
                        first,
                        dk: &mut dk,
                        dv: &mut dv,
                    };
                    let dq = tiles
                        .iter()
                        .map(|&t| (t, self.tile_backward(&dims, t, inputs, &lse, &mut sums)))
                        .collect();
                    Run { dq, first, dk, dv }
                })
                .collect();
            let [q, k, ..] = inputs;
            let (d, mut dq) = (dims.d, vec![0f32; q.len()]);
            let (mut dk, mut dv) = (vec![0f32; k.len()], vec![0f32; k.len()]);
            for run in &runs {
                for (tile, rows) in &run.dq {
                    dims.scatter(&mut dq, *tile, rows);
                }
                let (b, kh) = (run.dq[0].0.b, run.dq[0].0.kh);
                let rows = run.dk.chunks_exact(d).zip(run.dv.chunks_exact(d));
                for (j, (kr, vr)) in rows.enumerate() {
                    let at = ((b * dims.s + run.first + j) * dims.k + kh) * d;
                    dk[at..at + d].iter_mut().zip(kr).for_each(|(a, b)| *a += b);
                    dv[at..at + d].iter_mut().zip(vr).for_each(|(a, b)| *a += b);
                }
            }
            Ok((dq, dk, dv))
        })?;
        let (dq, dk) = (tensor(dq, q.shape())?, tensor(dk, k.shape())?);
        let (dq, dk) = match &self.rope {
            Some((table, layout)) => (
                rotated(&dq, table, *layout, true)?,
                rotated(&dk, table, *layout, true)?,
            ),
            None => (dq, dk),
        };
        Ok((Some(dq), Some(dk), Some(tensor(dv, v.shape())?)))
    }
}

/// `x` (`[rows, cols]` row-major) transposed.
fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for (r, row) in x.chunks_exact(cols).enumerate().take(rows) {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

/// `acc` (`[cols, rows]` row-major) `+= xᵀ` for `x` (`[rows, cols]`).
fn add_transposed(x: &[f32], rows: usize, cols: usize, acc: &mut [f32]) {
    assert!(x.len() >= rows * cols && acc.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature; the lengths are checked above.
        unsafe { add_transposed_avx512(x, rows, cols, acc) };
        return;
    }
    for (r, row) in x[..rows * cols].chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            acc[c * rows + r] += v;
        }
    }
}

/// [`add_transposed`] by 16 × 16 blocks transposed in registers, the
/// ragged edges one by one.
///
/// # Safety
/// The CPU has AVX-512F; `x` and `acc` hold `rows · cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_transposed_avx512(x: &[f32], rows: usize, cols: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    const B: usize = 16;
    let (rb, cb) = (rows / B * B, cols / B * B);
    for r0 in (0..rb).step_by(B) {
        for c0 in (0..cb).step_by(B) {
            // SAFETY: whole blocks lie inside both `rows · cols` buffers,
            // and the CPU has the feature (the caller's promise).
            unsafe {
                let mut t = [_mm512_setzero_si512(); B];
                for (i, line) in t.iter_mut().enumerate() {
                    let src = x.as_ptr().add((r0 + i) * cols + c0);
                    *line = _mm512_castps_si512(_mm512_loadu_ps(src));
                }
                crate::bf16::transpose16(&mut t);
                for (i, line) in t.iter().enumerate() {
                    let dst = acc.as_mut_ptr().add((c0 + i) * rows + r0);
                    let sum = _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_castsi512_ps(*line));
                    _mm512_storeu_ps(dst, sum);
                }
            }
        }
    }
    for r in 0..rows {
        let from = if r < rb { cb } else { 0 };
        for c in from..cols {
            acc[c * rows + r] += x[r * cols + c];
        }
    }
}

/// `x` (`[B, T, heads, D]`) rotated by `table` (or back, `inverse`).
fn rotated(x: &Tensor, table: &RopeTable, layout: RopeLayout, inverse: bool) -> Result<Tensor> {
    let y = with_f32([x], "attention", |[xs]| {
        rotate(xs, x.dims(), table, layout, inverse)
    })?;
    tensor(y, x.shape())
}

/// Attention of queries `q` (`[B, T, H, D]`) over keys `k` and values `v`
/// (`[B, S, K, D]`, `H` a multiple of `K`) under `mask`, scores scaled by
/// `scale`; fused, with gradients for all three. Returns `[B, T, H, D]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
) -> Result<Tensor> {
    apply(q, k, v, mask, scale, None, false)
}

/// [`attention`] of `q` and `k` rotated by `table` (`q` and `k` at the
/// same positions): the rotated copies are made inside the op, for the
/// call and again in backward, so the graph never keeps them.
///
/// With `bf16`, its five matrix products per tile (scores, output, and in
/// backward `dP`, `dQ`, `dK`, `dV`) run on bf16 tiles where the CPU has
/// them ([`bf16_accelerated`]): their operands (scaled queries, keys,
/// values, probabilities, `dO`, `dS`) rounded to bf16, sums in f32, the
/// mask, softmax and its statistics in f32, as PyTorch's fused attention
/// computes under bf16 autocast. Elsewhere it is the f32 op.
#[allow(clippy::too_many_arguments)]
pub fn attention_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
    table: &RopeTable,
    layout: RopeLayout,
    bf16: bool,
) -> Result<Tensor> {
    let rope = Some((table.clone(), layout));
    apply(q, k, v, mask, scale, rope, bf16 && bf16_accelerated())
}

fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
    rope: Option<(RopeTable, RopeLayout)>,
    bf16: bool,
) -> Result<Tensor> {
    let op = Attention {
        mask: mask.clone(),
        scale,
        lse: Arc::new(Mutex::new(Vec::new())),
        rope,
        bf16,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same from composed candle ops with the full probability tensor
/// (the reference the fused op is tested against).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
) -> Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    let (_, s, kh, _) = k.dims4()?;
    let g = h / kh;
    let q = q
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, kh, g * t, d))?;
    let k = k.transpose(1, 2)?.contiguous()?; // [B,K,S,D]
    let v = v.transpose(1, 2)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale as f64)?.reshape((b, kh, g, t, s))?;
    let scores = scores.broadcast_add(&mask.bias()?)?;
    let m = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&m)?.exp()?;
    let probs = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .reshape((b, kh, g * t, s))?;
    probs
        .matmul(&v)?
        .reshape((b, h, t, d))?
        .transpose(1, 2)?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_op, grads, max_abs_diff, random};

    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        t: usize,
        s: usize,
        h: usize,
        k: usize,
        d: usize,
        mask: AttentionMask,
        seed: u64,
    ) {
        let q = random(&[b, t, h, d], seed, 1.0);
        let kk = random(&[b, s, k, d], seed + 1, 1.0);
        let v = random(&[b, s, k, d], seed + 2, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        check_op(
            &[q, kk, v],
            &|a| attention(&a[0], &a[1], &a[2], &mask, scale),
            &|a| attention_composed(&a[0], &a[1], &a[2], &mask, scale),
            5e-5,
        );
    }

    #[test]
    fn rope_inside_matches_rope_then_attention() {
        // Two sequences of 70 (two query tiles), GQA 6/2, packed segments
        // with positions restarting, in both RoPE layouts.
        let (b, t, h, k, d) = (2, 70, 6, 2, 8);
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for row in 0..b * t {
            let pos = (row % t) % 40; // a second packed example from 40
            for i in 0..half {
                let angle = pos as f32 * 10_000f32.powf(-(i as f32) / half as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = RopeTable::new(cos, sin, b * t, half).unwrap();
        let segments: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= 40)).collect();
        let mask = AttentionMask::causal(b, t, t)
            .unwrap()
            .with_segments(segments)
            .unwrap();
        let q = random(&[b, t, h, d], 11, 1.0);
        let kk = random(&[b, t, k, d], 12, 1.0);
        let v = random(&[b, t, k, d], 13, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
            check_op(
                &[q.clone(), kk.clone(), v.clone()],
                &|a| attention_rope(&a[0], &a[1], &a[2], &mask, scale, &table, layout, false),
                &|a| {
                    let q = crate::rope(&a[0], &table, layout)?;
                    let k = crate::rope(&a[1], &table, layout)?;
                    attention(&q, &k, &a[2], &mask, scale)
                },
                5e-5,
            );
        }
    }

    #[test]
    fn causal_gqa_matches_composed_across_tiles() {
        // 70 queries: two tiles, the second partial; 3 query heads per key head.
        check(
            2,
            70,
            70,
            6,
            2,
            8,
            AttentionMask::causal(2, 70, 70).unwrap(),
            1,
        );
        // Multi-head (G = 1) and a single query over a cache of 9 keys.
        check(
            1,
            5,
            5,
            2,
            2,
            16,
            AttentionMask::causal(1, 5, 5).unwrap(),
            2,
        );
        check(
            2,
            1,
            10,
            4,
            1,
            8,
            AttentionMask::causal(2, 1, 10).unwrap(),
            3,
        );
        // Three new queries after 4 cached keys.
        check(1, 3, 7, 2, 1, 4, AttentionMask::causal(1, 3, 7).unwrap(), 4);
    }

    #[test]
    fn window_padding_and_segments_match_composed() {
        let m = AttentionMask::causal(1, 80, 80)
            .unwrap()
            .with_window(Some(5));
        check(1, 80, 80, 2, 1, 8, m, 5);
        // Right padding: the last three keys are padding (their queries
        // still see the real keys before them).
        let mut km = vec![1u8; 2 * 12];
        km[9..12].fill(0);
        let m = AttentionMask::causal(2, 12, 12)
            .unwrap()
            .with_key_mask(km)
            .unwrap();
        check(2, 12, 12, 2, 1, 8, m, 6);
        // Three packed examples in one row, two in the other.
        let mut seg = vec![0u32; 5];
        seg.extend([1, 1, 1, 2, 2]);
        seg.extend([0, 0, 0, 0, 0, 0, 0, 1, 1, 1]);
        let m = AttentionMask::causal(2, 10, 10)
            .unwrap()
            .with_segments(seg)
            .unwrap();
        check(2, 10, 10, 4, 2, 8, m, 7);
    }

    #[test]
    fn a_query_that_sees_nothing_gives_zero_and_passes_no_gradient() {
        // Left padding: query 0 is padding and may see no key.
        let m = AttentionMask::causal(1, 4, 4)
            .unwrap()
            .with_key_mask(vec![0, 1, 1, 1])
            .unwrap();
        let q = random(&[1, 4, 2, 4], 1, 1.0);
        let k = random(&[1, 4, 1, 4], 2, 1.0);
        let v = random(&[1, 4, 1, 4], 3, 1.0);
        let out = attention(&q, &k, &v, &m, 0.5).unwrap();
        let first = out
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(first.to_scalar::<f32>().unwrap(), 0.0);
        let composed = attention_composed(&q, &k, &v, &m, 0.5).unwrap();
        assert_close(
            &out.narrow(1, 1, 3).unwrap(),
            &composed.narrow(1, 1, 3).unwrap(),
            1e-5,
            "real rows",
        );
        let g = grads(&[q, k, v], &|a| attention(&a[0], &a[1], &a[2], &m, 0.5));
        let dq0 = g[0]
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(dq0.to_scalar::<f32>().unwrap(), 0.0);
        let dk0 = g[1]
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(
            dk0.to_scalar::<f32>().unwrap(),
            0.0,
            "a padding key got a gradient"
        );
    }

    /// RoPE tables for `rows` positions restarting at `period`.
    fn table(rows: usize, period: usize, d: usize) -> RopeTable {
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for row in 0..rows {
            let pos = row % period;
            for i in 0..half {
                let angle = pos as f32 * 10_000f32.powf(-(i as f32) / half as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable::new(cos, sin, rows, half).unwrap()
    }

    #[test]
    fn bf16_products_stay_within_bf16_rounding_of_f32() {
        // 300 positions: five query tiles, two key blocks; GQA 6/2; a
        // second packed example from 290; width 40 (padded to 64 on the
        // tiles).
        let (b, t, h, k, d) = (1, 300, 6, 2, 40);
        let segments: Vec<u32> = (0..t).map(|i| u32::from(i >= 290)).collect();
        let mask = AttentionMask::causal(b, t, t)
            .unwrap()
            .with_segments(segments)
            .unwrap();
        let rope = table(t, 290, d);
        let inputs = [
            random(&[b, t, h, d], 21, 1.0),
            random(&[b, t, k, d], 22, 1.0),
            random(&[b, t, k, d], 23, 1.0),
        ];
        let scale = 1.0 / (d as f32).sqrt();
        let run = |bf16: bool| {
            let f = |a: &[Tensor]| {
                attention_rope(
                    &a[0],
                    &a[1],
                    &a[2],
                    &mask,
                    scale,
                    &rope,
                    RopeLayout::Half,
                    bf16,
                )
            };
            let mut out = vec![f(&inputs).unwrap()];
            out.extend(grads(&inputs, &f));
            out
        };
        let (low, exact) = (run(true), run(false));
        for (i, (a, b)) in low.iter().zip(&exact).enumerate() {
            assert_close(
                a,
                b,
                2e-2,
                &format!("output {i} (0: values, then gradients)"),
            );
            if bf16_accelerated() {
                assert!(
                    max_abs_diff(a, b) > 0.0,
                    "output {i}: the tiles did not run"
                );
            }
        }
    }

    #[test]
    fn backward_sums_do_not_depend_on_the_thread_count() {
        // Four heads' worth of runs at two lengths: the key and value
        // gradients are summed over tiles in a fixed order.
        for t in [70, 330] {
            let (b, h, k, d) = (2, 4, 2, 8);
            let mask = AttentionMask::causal(b, t, t).unwrap();
            let inputs = [
                random(&[b, t, h, d], 31, 1.0),
                random(&[b, t, k, d], 32, 1.0),
                random(&[b, t, k, d], 33, 1.0),
            ];
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| grads(&inputs, &|a| attention(&a[0], &a[1], &a[2], &mask, 0.3)))
            };
            let (one, three) = (on(1), on(3));
            for (a, b) in one.iter().zip(&three) {
                assert_eq!(max_abs_diff(a, b), 0.0, "{t} positions");
            }
        }
    }

    #[test]
    fn blocks_transposed_in_registers_add_as_one_by_one() {
        for (rows, cols) in [(16, 16), (37, 21), (64, 256), (5, 3)] {
            let x: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let start: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32).collect();
            let mut got = start.clone();
            add_transposed(&x, rows, cols, &mut got);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(got[c * rows + r], start[c * rows + r] + x[r * cols + c]);
                }
            }
        }
    }

    #[test]
    fn long_sequence_tiles_agree_with_composed() {
        check(
            1,
            300,
            300,
            3,
            1,
            16,
            AttentionMask::causal(1, 300, 300).unwrap(),
            8,
        );
    }
}
