//! The tiled computation of the fused attention (FlashAttention, Dao et
//! al. 2022, arXiv 2205.14135; backward as in FlashAttention-2, arXiv
//! 2307.08691): a tile is up to 64 queries of all `G` query heads that
//! share one key/value head; it walks the keys it may see in blocks of
//! 256, with an online softmax in forward and the probabilities
//! recomputed from the saved log-sum-exp in backward. Each block's
//! products run on bf16 tiles in a bf16 op, else through the f32 GEMM.

use rayon::prelude::*;

use super::Attention;
use crate::bf16::{
    BothWays, DensePanels, Panels, ROW_ALIGN, RoundedRows, StoredRows, matmul_rounded_serial,
    round_into,
};
use crate::gemm::{Out, View, matmul};
use crate::reused::{Reused, hand_back};
use crate::storage::zeros;
use crate::vec::{dot, exp_shifted_sum, max, scale, times_shifted};

/// Queries per tile (per head).
const TILE: usize = 64;
/// Keys per block within a tile: a block's scores and their gradient stay
/// in cache while its products run.
const KEYS: usize = 256;

/// A call's shapes: `b` sequences of `t` queries over `s` keys, `h` query
/// heads over `k` key/value heads (`g` = `h / k` per key head), width `d`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) s: usize,
    pub(super) h: usize,
    pub(super) k: usize,
    pub(super) d: usize,
    pub(super) g: usize,
}

/// One tile: sequence `b`, key/value head `kh`, queries `i0..i0 + n`.
#[derive(Debug, Clone, Copy)]
struct Tile {
    b: usize,
    kh: usize,
    i0: usize,
    n: usize,
}

impl Dims {
    /// Every tile, sequence by sequence, head by head, in query order.
    fn tiles(&self) -> Vec<Tile> {
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

    /// Keys `lo..lo + n` of the tile's key/value head (`[n, D]`) as a
    /// product's right operand, or its transpose: from `packed` (the call's
    /// packing of `data`, see [`Packed`]) where given and `lo` is aligned.
    fn kv<'a>(
        &self,
        data: &'a [f32],
        packed: Option<&'a [BothWays]>,
        tile: Tile,
        (lo, n): (usize, usize),
        transposed: bool,
    ) -> Rhs<'a> {
        let Tile { b, kh, .. } = tile;
        let stored = packed
            .filter(|_| lo.is_multiple_of(ROW_ALIGN))
            .map(|heads| {
                let head = &heads[b * self.k + kh];
                match transposed {
                    true => head.rows_t(lo, n),
                    false => head.rows(lo, n),
                }
            });
        Rhs {
            w: &data[((b * self.s + lo) * self.k + kh) * self.d..],
            stride: self.k * self.d,
            transposed,
            stored,
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

    /// Writes every tile's rows (`G·n × D`, head-major) into `x` (`[B,
    /// T, H, D]`), a tile's span of tokens per task: the tiles of one span
    /// (one per key/value head) land in the same rows.
    fn scatter(&self, x: &mut [f32], tiles: &[(Tile, &[f32])]) {
        let (row, spans) = (self.h * self.d, self.t.div_ceil(TILE));
        if x.is_empty() || row == 0 {
            return;
        }
        let mut at: Vec<Option<(Tile, &[f32])>> = vec![None; self.b * spans * self.k];
        for &(tile, rows) in tiles {
            at[(tile.b * spans + tile.i0 / TILE) * self.k + tile.kh] = Some((tile, rows));
        }
        x.par_chunks_mut(self.t * row)
            .enumerate()
            .flat_map(|(b, seq)| {
                seq.par_chunks_mut(TILE * row)
                    .enumerate()
                    .map(move |(i, out)| (b * spans + i, out))
            })
            .for_each(|(span, out)| {
                for (tile, rows) in at[span * self.k..][..self.k].iter().flatten() {
                    for g in 0..self.g {
                        for ii in 0..tile.n {
                            let o = (ii * self.h + tile.kh * self.g + g) * self.d;
                            let r = (g * tile.n + ii) * self.d;
                            out[o..o + self.d].copy_from_slice(&rows[r..r + self.d]);
                        }
                    }
                }
            });
    }

    /// Index of `(b, head, i)` in the `[B, H, T]` statistics.
    fn lse_at(&self, tile: Tile, g: usize, ii: usize) -> usize {
        (tile.b * self.h + tile.kh * self.g + g) * self.t + tile.i0 + ii
    }
}

/// Backward splits each (sequence, key/value head)'s tiles into runs of
/// consecutive tiles, up to `⌈RUNS / heads⌉` per head (never more than its
/// tiles), of the shares of its work [`piece_weights`] gives: the
/// parallel tasks. A run sums its tiles'
/// key and value gradients into its own buffers, in tile order, and the
/// runs' sums are then added in run order: the result depends neither on
/// how the runs were scheduled nor on the thread count (so `RUNS` must
/// not depend on it either).
const RUNS: usize = 32;

thread_local! {
    /// Each thread's scratch for a tile's scores, probabilities and their
    /// gradients, reused from tile to tile.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

thread_local! {
    /// Each thread's room for a tile's rounded probabilities or score
    /// gradients (rows), and for their transposes, reused from tile to tile.
    static ROWS: std::cell::Cell<RoundedRows> = std::cell::Cell::new(RoundedRows::empty());
    static TRANSPOSED: std::cell::Cell<RoundedRows> = std::cell::Cell::new(RoundedRows::empty());
}

/// This thread's scratch, at least `len` values holding anything (another
/// tile started on this thread while one waits gets a new one).
fn scratch(len: usize) -> Vec<f32> {
    taken(&SCRATCH, len)
}

/// `buffer`'s vector, at least `len` values holding anything.
fn taken(buffer: &'static Reused<f32>, len: usize) -> Vec<f32> {
    let mut v = buffer.take();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
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

/// The right operand of a tile product: `W` (`[k, n]`) or, `transposed`,
/// `Wᵀ` (`W` `[n, k]`), its rows `stride` values apart in `w`.
struct Rhs<'a> {
    w: &'a [f32],
    stride: usize,
    transposed: bool,
    /// The same rows already packed for the bf16 products.
    stored: Option<StoredRows<'a>>,
}

/// A product's left operand: f32 rows, and for bf16 products (which
/// need it) their rounding.
#[derive(Clone, Copy)]
struct Left<'a> {
    rows: &'a [f32],
    rounded: Option<&'a RoundedRows>,
}

impl<'a> Left<'a> {
    /// Rows alone (f32 products alone).
    fn plain(rows: &'a [f32]) -> Self {
        Self {
            rows,
            rounded: None,
        }
    }

    /// Rows given only rounded (bf16 products alone).
    fn rounded(rounded: &'a RoundedRows) -> Self {
        Self {
            rows: &[],
            rounded: Some(rounded),
        }
    }

    /// Rows and, where made, their rounding.
    fn with(rows: &'a [f32], rounded: &'a Option<RoundedRows>) -> Self {
        Self {
            rows,
            rounded: rounded.as_ref(),
        }
    }
}

/// `x` (`[m, k]`) rounded once for bf16 products, where they run.
fn rounded_once(bf16: bool, x: &[f32], m: usize, k: usize) -> Option<RoundedRows> {
    bf16.then(|| RoundedRows::new(x, m, k))
}

/// A call's key and value heads packed once for the bf16 products (see
/// [`BothWays`]), `b · K + kh`: each head's keys are read by every tile of
/// its queries, which would otherwise pack them again, block by block.
struct Packed {
    k: Vec<BothWays>,
    v: Vec<BothWays>,
}

impl Packed {
    fn keys(&self) -> &[BothWays] {
        &self.k
    }

    fn values(&self) -> &[BothWays] {
        &self.v
    }

    fn new(dims: &Dims, k: &[f32], v: &[f32]) -> Self {
        let heads: Vec<(usize, usize)> = (0..dims.b)
            .flat_map(|b| (0..dims.k).map(move |kh| (b, kh)))
            .collect();
        let pack = |data: &[f32]| -> Vec<BothWays> {
            heads
                .par_iter()
                .map(|&(b, kh)| {
                    let at = (b * dims.s * dims.k + kh) * dims.d;
                    BothWays::new(&data[at..], dims.s, dims.d, dims.k * dims.d)
                })
                .collect()
        };
        Self {
            k: pack(k),
            v: pack(v),
        }
    }
}

impl Attention {
    /// The output (`[B, T, H, D]`) and the log-sum-exp of each query's
    /// scores (`[B, H, T]`), tile by tile in parallel.
    pub(super) fn forward(&self, dims: &Dims, [q, k, v]: [&[f32]; 3]) -> (Vec<f32>, Vec<f32>) {
        let tiles = dims.tiles();
        let packed = self.bf16.then(|| Packed::new(dims, k, v));
        let results: Vec<(Vec<f32>, Vec<f32>)> = tiles
            .par_iter()
            .map(|&tile| self.tile_forward(dims, tile, [q, k, v], packed.as_ref()))
            .collect();
        let mut out = zeros(q.len());
        let rows: Vec<(Tile, &[f32])> = tiles
            .iter()
            .zip(&results)
            .map(|(t, r)| (*t, &r.0[..]))
            .collect();
        dims.scatter(&mut out, &rows);
        let mut lse = vec![0f32; dims.b * dims.h * dims.t];
        for (tile, (_, l)) in tiles.iter().zip(&results) {
            for g in 0..dims.g {
                for ii in 0..tile.n {
                    lse[dims.lse_at(*tile, g, ii)] = l[g * tile.n + ii];
                }
            }
        }
        (out, lse)
    }

    /// `dQ`, `dK` and `dV` from `inputs` (`q`, `k`, `v`, the output and
    /// its gradient) and forward's log-sum-exp: runs of tiles in parallel
    /// (see [`RUNS`]), their sums added in order.
    pub(super) fn backward(
        &self,
        dims: &Dims,
        inputs: [&[f32]; 5],
        lse: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let tiles = dims.tiles();
        let packed = self.bf16.then(|| Packed::new(dims, inputs[1], inputs[2]));
        let run = |range: std::ops::Range<usize>| {
            let tiles = &tiles[range];
            let first = self.first_key(tiles[0]);
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
                .map(|&t| {
                    let dq = self.tile_backward(dims, t, inputs, lse, &mut sums, packed.as_ref());
                    (t, dq)
                })
                .collect();
            Run { dq, first, dk, dv }
        };
        let runs = largest_first(self.runs(dims, &tiles), run);
        let [q, k, ..] = inputs;
        let mut dq = zeros(q.len());
        let rows: Vec<(Tile, &[f32])> = runs
            .iter()
            .flat_map(|run| run.dq.iter().map(|(t, r)| (*t, &r[..])))
            .collect();
        dims.scatter(&mut dq, &rows);
        let (dk, dv) = key_sums(dims, &runs, k.len());
        (dq, dk, dv)
    }

    /// `out` (`[m, n]`) = (or `+=`, where `add`) `a` (`[m, k]` row-major)
    /// times `b` (`[k, n]`): on bf16 tiles (operands rounded to bf16, sums
    /// in f32) in a bf16 op, else by the f32 GEMM; on this thread.
    fn product(&self, a: Left, [m, k, n]: [usize; 3], b: Rhs, out: &mut [f32], add: bool) {
        let out = &mut out[..m * n];
        if self.bf16 {
            let (rows, cols) = if b.transposed { (n, k) } else { (k, n) };
            let dense;
            let panels: &dyn Panels = match &b.stored {
                Some(stored) => stored,
                None => {
                    dense = DensePanels::strided(b.w, rows, cols, b.stride, b.transposed);
                    &dense
                }
            };
            let rounded = a.rounded.expect("bf16 products take rounded rows");
            matmul_rounded_serial(rounded, panels, out, add);
            return;
        }
        let a = &a.rows[..m * k];
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

    /// The first key of a tile's first block: the first its queries may
    /// see, down to a multiple of [`ROW_ALIGN`] (keys before it are
    /// masked like any other the queries may not see), so that every block
    /// starts where the packed keys can be read.
    fn first_key(&self, tile: Tile) -> usize {
        self.mask.range(tile.i0).0 / ROW_ALIGN * ROW_ALIGN
    }

    /// The blocks of keys a tile's queries may see: the first key of each,
    /// and how many.
    fn key_blocks(&self, tile: Tile) -> impl Iterator<Item = (usize, usize)> {
        let lo = self.first_key(tile);
        let hi = self.mask.range(tile.i0 + tile.n - 1).1;
        (lo..hi)
            .step_by(KEYS)
            .map(move |j0| (j0, KEYS.min(hi - j0)))
    }

    /// Masked scores `s` (`G·n × nb`) of a tile's scaled queries `qt`
    /// (`G·n × D`) against keys `j0..j0 + nb`.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        &self,
        dims: &Dims,
        tile: Tile,
        qt: Left,
        k: &[f32],
        packed: Option<&Packed>,
        (j0, nb): (usize, usize),
        s: &mut [f32],
    ) {
        let rows = dims.g * tile.n;
        let keys = dims.kv(k, packed.map(Packed::keys), tile, (j0, nb), true);
        self.product(qt, [rows, dims.d, nb], keys, s, false);
        let exact = self.mask.key_mask.is_some() || self.mask.segments.is_some();
        for (r, row) in s[..rows * nb].chunks_exact_mut(nb).enumerate() {
            let i = tile.i0 + r % tile.n;
            let (a, z) = self.mask.range(i);
            let (a, z) = (a.clamp(j0, j0 + nb), z.clamp(j0, j0 + nb));
            row[..a - j0].fill(f32::NEG_INFINITY);
            row[z - j0..].fill(f32::NEG_INFINITY);
            if exact && a < z {
                self.mask.hide(tile.b, i, a, &mut row[a - j0..z - j0]);
            }
        }
    }

    /// One tile's output rows (`G·n × D`, head-major) and the log-sum-exp
    /// of each of its queries (−∞ when a query sees no key): block by
    /// block of keys, with a running maximum and sum per query and the
    /// output rescaled as the maximum grows (FlashAttention's online
    /// softmax).
    fn tile_forward(
        &self,
        dims: &Dims,
        tile: Tile,
        [q, k, v]: [&[f32]; 3],
        packed: Option<&Packed>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (rows, d) = (dims.g * tile.n, dims.d);
        let qt = self.queries(dims, tile, q);
        let qr = rounded_once(self.bf16, &qt, rows, d);
        let mut o = vec![0f32; rows * d];
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
        let mut p = scratch(rows * KEYS);
        let mut pr = ROWS.take();
        for (j0, nb) in self.key_blocks(tile) {
            let p = &mut p[..rows * nb];
            self.scores(dims, tile, Left::with(&qt, &qr), k, packed, (j0, nb), p);
            // Row `r` of the probabilities, the running statistics updated.
            let mut online = |r: usize, row: &mut [f32]| {
                let top = m[r].max(max(row));
                if top == f32::NEG_INFINITY {
                    row.fill(0.0);
                    return;
                }
                let shrink = (m[r] - top).exp();
                l[r] = l[r] * shrink + exp_shifted_sum(row, top);
                if shrink != 1.0 {
                    scale(&mut o[r * d..(r + 1) * d], shrink);
                }
                m[r] = top;
            };
            let left = if self.bf16 {
                // Each row rounded as it is made, while in cache.
                pr.refill_rows(rows, nb, |r, out| {
                    let row = &mut p[r * nb..(r + 1) * nb];
                    online(r, row);
                    round_into(row, out);
                });
                Left::rounded(&pr)
            } else {
                p.chunks_exact_mut(nb)
                    .enumerate()
                    .for_each(|(r, row)| online(r, row));
                Left::plain(p)
            };
            let values = dims.kv(v, packed.map(Packed::values), tile, (j0, nb), false);
            self.product(left, [rows, nb, d], values, &mut o, true);
        }
        ROWS.set(pr);
        hand_back(&SCRATCH, p);
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
        packed: Option<&Packed>,
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
        // Made once for every block (bf16): the queries and `dO` rounded as
        // the left operands of the scores and of `dP`, and packed as the
        // right operands of the key gradients.
        let qr = rounded_once(self.bf16, &qt, rows, d);
        let dor = rounded_once(self.bf16, &dot_t, rows, d);
        let qp = self.bf16.then(|| BothWays::new(&qt, rows, d, d));
        let dop = self.bf16.then(|| BothWays::new(&dot_t, rows, d, d));
        let (mut dsr, mut wt) = (ROWS.take(), TRANSPOSED.take());
        let mut dq = vec![0f32; rows * d];
        let mut buf = scratch(2 * rows * KEYS);
        for (j0, nb) in self.key_blocks(tile) {
            let (p, ds) = buf.split_at_mut(rows * nb);
            let ds = &mut ds[..rows * nb];
            // P again, from the saved log-sum-exp.
            self.scores(dims, tile, Left::with(&qt, &qr), k, packed, (j0, nb), p);
            for (row, &l) in p.chunks_exact_mut(nb).zip(&lse) {
                if l == f32::NEG_INFINITY {
                    row.fill(0.0);
                } else {
                    exp_shifted_sum(row, l);
                }
            }
            // dP = dO Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)).
            let values = dims.kv(v, packed.map(Packed::values), tile, (j0, nb), true);
            self.product(Left::with(&dot_t, &dor), [rows, d, nb], values, ds, false);
            let ds_row = |r: usize, ds: &mut [f32]| {
                times_shifted(
                    &mut ds[r * nb..(r + 1) * nb],
                    &p[r * nb..(r + 1) * nb],
                    di[r],
                );
            };
            let left = if self.bf16 {
                // Each row rounded as it is made, while in cache.
                dsr.refill_rows(rows, nb, |r, out| {
                    ds_row(r, ds);
                    round_into(&ds[r * nb..(r + 1) * nb], out);
                });
                Left::rounded(&dsr)
            } else {
                (0..rows).for_each(|r| ds_row(r, ds));
                Left::plain(ds)
            };
            let keys = dims.kv(k, packed.map(Packed::keys), tile, (j0, nb), false);
            self.product(left, [rows, nb, d], keys, &mut dq, true);
            // dK = dSᵀ (scale·Q) and dV = Pᵀ dO, added at the block's keys.
            let at = (j0 - sums.first) * d;
            let dims3 = [rows, nb, d];
            self.add_key_grads(ds, (&qt, qp.as_ref()), dims3, &mut sums.dk[at..], &mut wt);
            self.add_key_grads(
                p,
                (&dot_t, dop.as_ref()),
                dims3,
                &mut sums.dv[at..],
                &mut wt,
            );
        }
        ROWS.set(dsr);
        TRANSPOSED.set(wt);
        hand_back(&SCRATCH, buf);
        scale(&mut dq, self.scale);
        dq
    }

    /// `acc` (`nb` rows of `D`) `+= wᵀ x` for `w` (`rows × nb`) and `x`
    /// (`rows × D`). On bf16 tiles (where `packed`, `x` packed once per
    /// tile as the right operand) `wᵀ` is rounded into `wt`, transposed in
    /// registers: the product then lands in `acc`'s rows as they are.
    fn add_key_grads(
        &self,
        w: &[f32],
        (x, packed): (&[f32], Option<&BothWays>),
        [rows, nb, d]: [usize; 3],
        acc: &mut [f32],
        wt: &mut RoundedRows,
    ) {
        let Some(packed) = packed.filter(|_| self.bf16) else {
            let out = Out::new(acc, d).accumulate();
            let w = View::rows(w, nb).t();
            matmul(nb, d, rows, w, View::rows(x, d), out, false);
            return;
        };
        wt.refill_transposed(&w[..rows * nb], rows, nb);
        let right = Rhs {
            w: x,
            stride: d,
            transposed: false,
            stored: Some(packed.rows(0, rows)),
        };
        self.product(Left::rounded(wt), [nb, rows, d], right, acc, true);
    }

    /// Backward's runs (see [`RUNS`]): ranges of `tiles`, each within one
    /// head, in order, with the work of each (scores computed).
    fn runs(&self, dims: &Dims, tiles: &[Tile]) -> Vec<(std::ops::Range<usize>, usize)> {
        let groups = dims.b * dims.k;
        let per_group = tiles.len() / groups.max(1);
        let pieces = RUNS.div_ceil(groups.max(1));
        let weights = piece_weights(pieces);
        let all: usize = weights.iter().sum();
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
            if total == 0 {
                // No query of this head sees a key: one run, which adds nothing.
                runs.push((start..start + per_group, 0));
                continue;
            }
            // Cut where the work done reaches the pieces' shares so far.
            let (mut from, mut done, mut cut_at, mut piece) = (0, 0, 0, 0);
            let mut upto = weights[0];
            for (i, w) in work.iter().enumerate() {
                done += w;
                if i + 1 == per_group || done * all >= total * upto {
                    runs.push((start + from..start + i + 1, done - cut_at));
                    (from, cut_at) = (i + 1, done);
                    while piece + 1 < pieces && done * all >= total * upto {
                        piece += 1;
                        upto += weights[piece];
                    }
                }
            }
        }
        runs
    }
}

/// The last pieces of a head's backward are half the size of the others
/// (weights 2 and 1, the last `HALVES`): run largest first, the small
/// ones even out where the threads finish, where equal runs left one
/// thread idle for up to a whole run at the end of every call.
const HALVES: usize = 4;

/// The relative sizes of a head's `pieces` runs (see [`HALVES`]).
fn piece_weights(pieces: usize) -> Vec<usize> {
    (0..pieces)
        .map(|p| if p + HALVES >= pieces { 1 } else { 2 })
        .collect()
}

/// `run` of every range of `runs` (ranges with their work), on the thread
/// pool, the largest first, each thread taking the next when it is free
/// (greedy, as in list scheduling); the results in the order of `runs`.
fn largest_first<T: Send>(
    runs: Vec<(std::ops::Range<usize>, usize)>,
    run: impl Fn(std::ops::Range<usize>) -> T + Sync,
) -> Vec<T> {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(runs[i].1));
    let slots: Vec<std::sync::Mutex<Option<T>>> =
        runs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || {
        loop {
            let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&i) = order.get(at) else { break };
            let out = run(runs[i].0.clone());
            *slots[i].lock().expect("a run's slot") = Some(out);
        }
    };
    let threads = rayon::current_num_threads().min(runs.len());
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| worker());
        }
        worker();
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .expect("a run's slot")
                .expect("every run ran")
        })
        .collect()
}

/// Keys per task of [`key_sums`].
const KEY_SPAN: usize = 64;

/// `dK` and `dV` (`len` values each, `[B, S, K, D]`): every run's sums
/// added at its head's keys, in run order for each key (so the result does
/// not depend on the tasks), a span of keys per task.
fn key_sums(dims: &Dims, runs: &[Run], len: usize) -> (Vec<f32>, Vec<f32>) {
    let (d, row) = (dims.d, dims.k * dims.d);
    let (mut dk, mut dv) = (zeros(len), zeros(len));
    if len == 0 || row == 0 {
        return (dk, dv);
    }
    let seqs = dk
        .par_chunks_mut(dims.s * row)
        .zip(dv.par_chunks_mut(dims.s * row));
    seqs.enumerate()
        .flat_map(|(b, (sk, sv))| {
            let spans = sk
                .par_chunks_mut(KEY_SPAN * row)
                .zip(sv.par_chunks_mut(KEY_SPAN * row));
            spans
                .enumerate()
                .map(move |(i, out)| (b, i * KEY_SPAN, out))
        })
        .for_each(|(b, j0, (ok, ov))| {
            let j1 = j0 + ok.len() / row;
            for run in runs.iter().filter(|r| r.dq[0].0.b == b) {
                let kh = run.dq[0].0.kh;
                let (lo, hi) = (j0.max(run.first), j1.min(run.first + run.dk.len() / d));
                for j in lo..hi {
                    let (o, r) = (((j - j0) * dims.k + kh) * d, (j - run.first) * d);
                    let (kr, vr) = (&run.dk[r..r + d], &run.dv[r..r + d]);
                    ok[o..o + d].iter_mut().zip(kr).for_each(|(a, b)| *a += b);
                    ov[o..o + d].iter_mut().zip(vr).for_each(|(a, b)| *a += b);
                }
            }
        });
    (dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AttentionMask;

    #[test]
    fn runs_cover_each_head_in_order_with_the_last_pieces_halved() {
        // SmolLM2's three key/value heads at 4096 causal positions (64
        // tiles and 11 pieces each), and two sequences of three heads of
        // 200 (4 tiles each: never more runs than tiles).
        for (b, t, k) in [(1, 4096, 3), (2, 200, 3)] {
            let attention = Attention {
                mask: AttentionMask::causal(b, t, t).unwrap(),
                scale: 1.0,
                lse: Default::default(),
                rope: None,
                bf16: false,
                width: None,
            };
            let dims = Dims {
                b,
                t,
                s: t,
                h: k,
                k,
                d: 8,
                g: 1,
            };
            let tiles = dims.tiles();
            let runs = attention.runs(&dims, &tiles);
            let mut next = 0;
            for (range, _) in &runs {
                assert_eq!(range.start, next, "runs in order, none empty");
                assert!(range.end > range.start);
                let head = |i: usize| (tiles[i].b, tiles[i].kh);
                assert_eq!(
                    head(range.start),
                    head(range.end - 1),
                    "a run within a head"
                );
                next = range.end;
            }
            assert_eq!(next, tiles.len());
            if t == 4096 {
                let pieces = RUNS.div_ceil(3);
                assert_eq!(runs.len(), 3 * pieces);
                for head in runs.chunks(pieces) {
                    let work: Vec<usize> = head.iter().map(|r| r.1).collect();
                    let total: usize = work.iter().sum();
                    // Shares 2:1, the last HALVES the small ones, to
                    // within a tile's work.
                    let unit = total as f64 / (2 * (pieces - HALVES) + HALVES) as f64;
                    let tile = (64 * 4096) as f64;
                    for (i, &w) in work.iter().enumerate() {
                        let want = if i + HALVES >= pieces {
                            unit
                        } else {
                            2.0 * unit
                        };
                        assert!((w as f64 - want).abs() <= tile, "run {i}: {w} for {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn largest_first_returns_results_in_the_order_of_the_runs() {
        let runs: Vec<(std::ops::Range<usize>, usize)> =
            [(0..3, 5), (3..4, 9), (4..10, 1), (10..12, 9)]
                .into_iter()
                .collect();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| largest_first(runs.clone(), |r| r.start * 100 + r.end));
            assert_eq!(got, vec![3, 304, 410, 1012], "{threads} threads");
        }
    }
}
