//! Attention of a ragged batch over per-sequence key/value caches, for
//! inference (no backward): the new tokens of several sequences arrive
//! flattened into one `[N, H, D]` block (a decode step's single token per
//! sequence next to a prefill chunk of another), and each sequence's
//! queries attend causally over its own cache, which already holds the
//! keys and values of its new tokens.
//!
//! A query's numbers depend on its own row and the keys it sees, nothing
//! else: each score adds its products in order of the head width, each
//! softmax sums the query's own keys from its first, and each output adds
//! the value rows in position order. So a prompt prefilled whole, in
//! chunks, after a reused prefix, or next to other sequences gives the
//! same bits, which is what lets a server's answers not depend on what
//! else it is serving.

use candle_core::{Result, Tensor, bail};
use rayon::prelude::*;

use crate::storage::{tensor, with_f32};
use crate::vec::{exp_shifted_sum_in, max_in, multiversion, scale_in};

/// Queries of one sequence per parallel task.
const QUERIES: usize = 16;

/// Positions per block of a key cache: keys are kept in blocks of 16
/// positions, each `[K·D, 16]` (the position fastest), so the score kernel
/// multiplies a query element into 16 keys with one vector and never
/// transposes.
pub const KEY_BLOCK: usize = 16;

/// Floats a key cache of `positions` positions `width` (`K·D`) wide takes:
/// whole blocks.
pub fn key_cache_len(positions: usize, width: usize) -> usize {
    positions.next_multiple_of(KEY_BLOCK) * width
}

/// Writes key rows (`[n, K·D]` row-major) as positions `start..start + n`
/// of a key cache laid out in blocks (see [`KEY_BLOCK`]).
pub fn write_keys(cache: &mut [f32], width: usize, start: usize, rows: &[f32]) {
    for (i, row) in rows.chunks_exact(width).enumerate() {
        let (b, l) = ((start + i) / KEY_BLOCK, (start + i) % KEY_BLOCK);
        let block = &mut cache[b * width * KEY_BLOCK..(b + 1) * width * KEY_BLOCK];
        for (c, &x) in row.iter().enumerate() {
            block[c * KEY_BLOCK + l] = x;
        }
    }
}

/// One sequence of a ragged batch: its cache and where its new tokens sit.
#[derive(Debug, Clone, Copy)]
pub struct CachedSeq<'a> {
    /// Keys in blocks of [`KEY_BLOCK`] positions (written by
    /// [`write_keys`]); positions `0..start + len` are filled, the rest of
    /// their last block is read and ignored.
    pub k: &'a [f32],
    /// Values `[capacity, K, D]` row-major; rows `0..start + len` are filled.
    pub v: &'a [f32],
    /// Positions cached before this call's tokens.
    pub start: usize,
    /// New tokens of this sequence in the batch (consecutive rows of `q`).
    pub len: usize,
}

/// Head counts, width, window and score scale shared by every task.
#[derive(Debug, Clone, Copy)]
struct Heads {
    h: usize,
    k: usize,
    d: usize,
    window: Option<usize>,
    scale: f32,
    /// Whether the AVX-512 kernels run (else portable loops, same bits).
    wide: bool,
}

impl Heads {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.k
    }

    /// Keys `lo..hi` the query at position `pos` sees.
    fn keys(&self, pos: usize) -> (usize, usize) {
        let lo = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        (lo.min(pos + 1), pos + 1)
    }
}

/// One task: queries `i0..i0 + n` of sequence `seq` (whose rows start at
/// `row` of the batch), the query heads of key/value head `kh`.
#[derive(Debug, Clone, Copy)]
struct Task {
    seq: usize,
    row: usize,
    kh: usize,
    i0: usize,
    n: usize,
}

/// Queries `q` (`[N, H, D]`, the sequences' new tokens in order) over each
/// sequence's cached keys and values (`K` heads of width `D`, `H` a
/// multiple of `K`), causal, within `window` positions when set. Returns
/// `[N, H, D]`; a query that sees no key gets zeros.
pub fn cached_attention(
    q: &Tensor,
    kv_heads: usize,
    seqs: &[CachedSeq],
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    attention_over_caches(q, kv_heads, seqs, window, scale, avx512f())
}

/// [`cached_attention`] with the AVX-512 kernels (`wide`) or the portable
/// loops.
fn attention_over_caches(
    q: &Tensor,
    kv_heads: usize,
    seqs: &[CachedSeq],
    window: Option<usize>,
    scale: f32,
    wide: bool,
) -> Result<Tensor> {
    let (n, h, d) = q.dims3()?;
    let plan = CachedAttention::plan(n, h, d, kv_heads, seqs, window, scale, wide)?;
    let out = with_f32([q], "cached attention", |[q]| {
        let parts: Vec<Vec<f32>> = (0..plan.tasks())
            .into_par_iter()
            .map(|t| plan.run(t, q))
            .collect();
        let mut out = vec![0f32; n * h * d];
        for (t, part) in parts.iter().enumerate() {
            plan.place(t, part, &mut out);
        }
        Ok(out)
    })?;
    tensor(out, (n, h, d))
}

/// A ragged batch's cached attention (as [`cached_attention`]) split into
/// independent tasks, for callers that spread them over threads of their
/// own: run every task (in any order, on any thread), then place each
/// result; the same bits as [`cached_attention`].
#[derive(Debug)]
pub struct CachedAttention<'a> {
    heads: Heads,
    seqs: &'a [CachedSeq<'a>],
    tasks: Vec<Task>,
}

impl<'a> CachedAttention<'a> {
    /// The tasks of `n` queries of `h` heads of width `d` (the sequences'
    /// new tokens in order) over `kv_heads` key/value heads of `seqs`.
    pub fn new(
        (n, h, d): (usize, usize, usize),
        kv_heads: usize,
        seqs: &'a [CachedSeq<'a>],
        window: Option<usize>,
        scale: f32,
    ) -> Result<Self> {
        Self::plan(n, h, d, kv_heads, seqs, window, scale, avx512f())
    }

    #[allow(clippy::too_many_arguments)]
    fn plan(
        n: usize,
        h: usize,
        d: usize,
        kv_heads: usize,
        seqs: &'a [CachedSeq<'a>],
        window: Option<usize>,
        scale: f32,
        wide: bool,
    ) -> Result<Self> {
        if kv_heads == 0 || h == 0 || d == 0 || !h.is_multiple_of(kv_heads) {
            bail!("cached attention: {h} query heads of width {d} over {kv_heads} key/value heads");
        }
        if seqs.iter().map(|s| s.len).sum::<usize>() != n {
            bail!("cached attention: the sequences' tokens do not add up to {n} queries");
        }
        let heads = Heads {
            h,
            k: kv_heads,
            d,
            window,
            scale,
            wide,
        };
        let mut tasks = Vec::new();
        let mut row = 0;
        for (seq, s) in seqs.iter().enumerate() {
            let keys = s.start + s.len;
            if s.k.len() < key_cache_len(keys, kv_heads * d) || s.v.len() < keys * kv_heads * d {
                bail!("cached attention: a cache holds fewer than {keys} positions");
            }
            for kh in 0..kv_heads {
                for i0 in (0..s.len).step_by(QUERIES) {
                    tasks.push(Task {
                        seq,
                        row,
                        kh,
                        i0,
                        n: QUERIES.min(s.len - i0),
                    });
                }
            }
            row += s.len;
        }
        Ok(Self { heads, seqs, tasks })
    }

    /// Independent tasks.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// The length of task `t`'s outputs.
    pub fn task_len(&self, t: usize) -> usize {
        self.tasks[t].n * self.heads.group() * self.heads.d
    }

    /// Task `t`'s outputs for the queries `q` (`[N, H, D]`).
    pub fn run(&self, t: usize, q: &[f32]) -> Vec<f32> {
        let (t, Heads { h, d, .. }) = (self.tasks[t], self.heads);
        let s = &self.seqs[t.seq];
        let qs = &q[(t.row + t.i0) * h * d..(t.row + t.i0 + t.n) * h * d];
        let mut o = vec![0f32; t.n * self.heads.group() * d];
        attend(qs, s.k, s.v, &self.heads, s.start + t.i0, t.kh, &mut o);
        o
    }

    /// Puts task `t`'s outputs into `out` (`[N, H, D]`).
    pub fn place(&self, t: usize, part: &[f32], out: &mut [f32]) {
        let (t, Heads { h, d, .. }) = (self.tasks[t], self.heads);
        let g = self.heads.group();
        for (qi, rows) in part.chunks_exact(g * d).enumerate() {
            let at = ((t.row + t.i0 + qi) * h + t.kh * g) * d;
            out[at..at + g * d].copy_from_slice(rows);
        }
    }
}

/// Whether the CPU has AVX-512F.
fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Key blocks the score kernel carries at once.
const SCORE_BLOCKS: usize = 4;
/// Query rows the score kernel carries at once.
const SCORE_ROWS: usize = 4;
/// Query rows the value kernel carries at once.
const VALUE_ROWS: usize = 4;

multiversion! {
    /// Attention of consecutive queries (`q`: `[n, H, D]`, the first at
    /// position `pos`) for the query heads of key/value head `kh`, into
    /// `out` (`[n, G, D]`, zeroed).
    ///
    /// Every score is `Σ_e q_e k_e` added in order of `e`, every output
    /// `Σ_j p_j v_j` added in order of the position `j` from the query's
    /// first key, and the softmax sums a slice of exactly the query's own
    /// keys: how queries and keys are grouped into kernels changes no bit.
    fn attend(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: &Heads,
        pos: usize,
        kh: usize,
        out: &mut [f32],
    ) {
        let Heads { h, d, scale, wide, .. } = *heads;
        let (g, width) = (heads.group(), heads.k * d);
        let n = q.len() / (h * d);
        let rows = n * g;
        // Whole key blocks from `lo0` cover every row's keys.
        let lo0 = heads.keys(pos).0 / KEY_BLOCK * KEY_BLOCK;
        let hi1 = heads.keys(pos + n - 1).1;
        let blocks = (hi1 - lo0).div_ceil(KEY_BLOCK);
        let span = blocks * KEY_BLOCK;
        // Row `i·G + g`: query `i`, head `kh·G + g`, and the keys it sees.
        let ranges: Vec<(usize, usize)> = (0..rows).map(|r| heads.keys(pos + r / g)).collect();
        let mut qr = Vec::with_capacity(rows * d);
        for i in 0..n {
            qr.extend_from_slice(&q[(i * h + kh * g) * d..(i * h + kh * g + g) * d]);
        }

        // Scores, row `r` from key `lo0`.
        let mut p = vec![0f32; rows * span];
        let keys = Keys {
            k,
            first: (lo0 / KEY_BLOCK * width + kh * d) * KEY_BLOCK,
            stride: width * KEY_BLOCK,
            d,
            wide,
        };
        let mut b = 0;
        while b < blocks {
            let nb = if blocks - b >= SCORE_BLOCKS { SCORE_BLOCKS } else { 1 };
            let mut r = 0;
            while r < rows {
                let m = SCORE_ROWS.min(rows - r);
                match (m, nb) {
                    (4, SCORE_BLOCKS) => keys.scores::<4, SCORE_BLOCKS>(&qr, r, b, &mut p, span),
                    (3, SCORE_BLOCKS) => keys.scores::<3, SCORE_BLOCKS>(&qr, r, b, &mut p, span),
                    (2, SCORE_BLOCKS) => keys.scores::<2, SCORE_BLOCKS>(&qr, r, b, &mut p, span),
                    (1, SCORE_BLOCKS) => keys.scores::<1, SCORE_BLOCKS>(&qr, r, b, &mut p, span),
                    (4, _) => keys.scores::<4, 1>(&qr, r, b, &mut p, span),
                    (3, _) => keys.scores::<3, 1>(&qr, r, b, &mut p, span),
                    (2, _) => keys.scores::<2, 1>(&qr, r, b, &mut p, span),
                    _ => keys.scores::<1, 1>(&qr, r, b, &mut p, span),
                }
                r += m;
            }
            b += nb;
        }

        // Each row's softmax over exactly its own keys.
        let mut inv = vec![0f32; rows];
        for (r, &(lo, hi)) in ranges.iter().enumerate() {
            let row = &mut p[r * span + lo - lo0..r * span + hi - lo0];
            if !row.is_empty() {
                scale_in(row, scale);
                let m = max_in(row);
                inv[r] = 1.0 / exp_shifted_sum_in(row, m);
            }
        }

        // Values added in position order: a group of rows together over
        // the keys all of them see, each alone before and after.
        let values = Values {
            p: &p,
            span,
            lo0,
            v,
            width,
            off: kh * d,
            d,
            wide,
        };
        let mut r = 0;
        while r < rows {
            let m = VALUE_ROWS.min(rows - r);
            let group = &ranges[r..r + m];
            let a = group.iter().map(|x| x.0).max().unwrap_or(0);
            let b = group.iter().map(|x| x.1).min().unwrap_or(0);
            if m == VALUE_ROWS && a < b {
                for (rr, &(lo, _)) in group.iter().enumerate() {
                    values.add::<1>(out, r + rr, lo, a);
                }
                values.add::<VALUE_ROWS>(out, r, a, b);
                for (rr, &(_, hi)) in group.iter().enumerate() {
                    values.add::<1>(out, r + rr, b, hi);
                }
            } else {
                for (rr, &(lo, hi)) in group.iter().enumerate() {
                    values.add::<1>(out, r + rr, lo, hi);
                }
            }
            r += m;
        }
        for (r, &a) in inv.iter().enumerate() {
            scale_in(&mut out[r * d..(r + 1) * d], a);
        }
    }
}

/// One key/value head's blocks of a key cache.
struct Keys<'a> {
    k: &'a [f32],
    /// Where the first block's `[D, 16]` part of this head starts.
    first: usize,
    /// Floats from one block to the next.
    stride: usize,
    d: usize,
    /// Whether the AVX-512 kernels run (else portable loops, same bits).
    wide: bool,
}

impl Keys<'_> {
    /// Scores of query rows `r..r + R` (`q`, `[rows, D]`) against key
    /// blocks `b..b + B` into `p` (`span` per row): each a sum over the
    /// width in order, one fused multiply-add per term.
    #[inline(always)]
    fn scores<const R: usize, const B: usize>(
        &self,
        q: &[f32],
        r: usize,
        b: usize,
        p: &mut [f32],
        span: usize,
    ) {
        let d = self.d;
        let qs = &q[r * d..(r + R) * d];
        let base = self.first + b * self.stride;
        let last = base + (B - 1) * self.stride + d * KEY_BLOCK;
        let ks = &self.k[base..last];
        let mut acc = [[[0f32; KEY_BLOCK]; B]; R];
        #[cfg(target_arch = "x86_64")]
        if self.wide {
            // SAFETY: `wide` is set only where the CPU has AVX-512F, and the
            // kernel reads `qs` and `ks` within the bounds checked above.
            unsafe { avx512::scores::<R, B>(qs, ks, self.stride, d, &mut acc) };
        }
        if !self.wide {
            for e in 0..d {
                for rr in 0..R {
                    let x = qs[rr * d + e];
                    for bb in 0..B {
                        let kv = &ks[bb * self.stride + e * KEY_BLOCK..][..KEY_BLOCK];
                        for l in 0..KEY_BLOCK {
                            acc[rr][bb][l] = x.mul_add(kv[l], acc[rr][bb][l]);
                        }
                    }
                }
            }
        }
        for (rr, row) in acc.iter().enumerate() {
            let at = (r + rr) * span + b * KEY_BLOCK;
            for (bb, a) in row.iter().enumerate() {
                p[at + bb * KEY_BLOCK..at + (bb + 1) * KEY_BLOCK].copy_from_slice(a);
            }
        }
    }
}

/// Softmax weights and the value rows they multiply.
struct Values<'a> {
    /// Weights, row `r` from key `lo0` (`span` per row).
    p: &'a [f32],
    span: usize,
    lo0: usize,
    /// Value cache, `width` per position, this head from `off`.
    v: &'a [f32],
    width: usize,
    off: usize,
    d: usize,
    /// Whether the AVX-512 kernels run (else portable loops, same bits).
    wide: bool,
}

impl Values<'_> {
    /// Adds keys `a..b` to output rows `r..r + R` (`out`, `[rows, D]`), in
    /// order of position, one fused multiply-add per term.
    #[inline(always)]
    fn add<const R: usize>(&self, out: &mut [f32], r: usize, a: usize, b: usize) {
        if a >= b {
            return;
        }
        let d = self.d;
        let p: [&[f32]; R] = std::array::from_fn(|rr| {
            let at = (r + rr) * self.span;
            &self.p[at + a - self.lo0..at + b - self.lo0]
        });
        let v = &self.v[a * self.width..(b - 1) * self.width + self.off + d];
        let o = &mut out[r * d..(r + R) * d];
        let mut c = 0;
        #[cfg(target_arch = "x86_64")]
        if self.wide {
            while c + 64 <= d {
                // SAFETY: `wide` is set only where the CPU has AVX-512F; the
                // kernel reads `b - a` positions of `v` and `p` and columns
                // `c..c + 64` of `o`, all within the slices above.
                unsafe { avx512::values::<R>(&p, v, self.width, self.off + c, o, d, c) };
                c += 64;
            }
        }
        for rr in 0..R {
            let row = &mut o[rr * d..(rr + 1) * d];
            for (j, &pj) in p[rr].iter().enumerate() {
                let vj = &v[j * self.width + self.off..][..d];
                for e in c..d {
                    row[e] = pj.mul_add(vj[e], row[e]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::KEY_BLOCK;

    /// `acc[r][b][l] += q[r][e] · k_b[e][l]` for `e` in order (block `b` of
    /// `ks` at `b · stride`, each `[d, 16]`): the portable loop's bits.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores<const R: usize, const B: usize>(
        qs: &[f32],
        ks: &[f32],
        stride: usize,
        d: usize,
        acc: &mut [[[f32; KEY_BLOCK]; B]; R],
    ) {
        let mut a = [[_mm512_setzero_ps(); B]; R];
        let (q, k) = (qs.as_ptr(), ks.as_ptr());
        for e in 0..d {
            let mut kv = [_mm512_setzero_ps(); B];
            for (bb, x) in kv.iter_mut().enumerate() {
                // SAFETY (all loads): the caller sliced `ks` to hold B
                // blocks of `d · 16` and `qs` to hold R rows of `d`.
                *x = unsafe { _mm512_loadu_ps(k.add(bb * stride + e * KEY_BLOCK)) };
            }
            for (rr, row) in a.iter_mut().enumerate() {
                let x = _mm512_set1_ps(unsafe { *q.add(rr * d + e) });
                for (s, &kb) in row.iter_mut().zip(&kv) {
                    *s = _mm512_fmadd_ps(x, kb, *s);
                }
            }
        }
        for (row, out) in a.iter().zip(acc.iter_mut()) {
            for (s, o) in row.iter().zip(out.iter_mut()) {
                // SAFETY: `o` is 16 floats.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *s) };
            }
        }
    }

    /// `o[r][c..c + 64] += p[r][j] · v[j][off..off + 64]` for `j` in order
    /// (value rows `width` apart): the portable loop's bits.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values<const R: usize>(
        p: &[&[f32]; R],
        v: &[f32],
        width: usize,
        off: usize,
        o: &mut [f32],
        d: usize,
        c: usize,
    ) {
        let n = p[0].len();
        let mut a = [[_mm512_setzero_ps(); 4]; R];
        for (rr, row) in a.iter_mut().enumerate() {
            for (w, x) in row.iter_mut().enumerate() {
                // SAFETY: the caller checked `c + 64 <= d`, `o` holds R rows of `d`.
                *x = unsafe { _mm512_loadu_ps(o.as_ptr().add(rr * d + c + w * 16)) };
            }
        }
        let vp = v.as_ptr();
        for j in 0..n {
            let mut vj = [_mm512_setzero_ps(); 4];
            for (w, x) in vj.iter_mut().enumerate() {
                // SAFETY: the caller's `v` holds `n` rows `width` apart and
                // each reaches column `off + 64` (it checked `c + 64 <= d`).
                *x = unsafe { _mm512_loadu_ps(vp.add(j * width + off + w * 16)) };
            }
            for (row, pr) in a.iter_mut().zip(p) {
                // SAFETY: every `p[r]` has `n` weights.
                let pj = _mm512_set1_ps(unsafe { *pr.get_unchecked(j) });
                for (s, &x) in row.iter_mut().zip(&vj) {
                    *s = _mm512_fmadd_ps(pj, x, *s);
                }
            }
        }
        for (rr, row) in a.iter().enumerate() {
            for (w, x) in row.iter().enumerate() {
                // SAFETY: as the loads above.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(rr * d + c + w * 16), *x) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random};
    use crate::{AttentionMask, attention};

    /// A value cache of `capacity` rows holding the rows of `v` (`[T, K, D]`).
    fn value_cache(v: &Tensor, capacity: usize) -> Vec<f32> {
        let mut c = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let width = v.dim(1).unwrap() * v.dim(2).unwrap();
        c.resize(capacity * width, f32::NAN); // unfilled rows must never be used
        c
    }

    /// A key cache of `capacity` positions holding the rows of `k`, in blocks.
    fn key_cache(k: &Tensor, capacity: usize) -> Vec<f32> {
        let rows = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let width = k.dim(1).unwrap() * k.dim(2).unwrap();
        let mut c = vec![f32::NAN; key_cache_len(capacity, width)];
        write_keys(&mut c, width, 0, &rows);
        c
    }

    #[test]
    fn keys_are_written_in_blocks_of_positions() {
        let width = 3;
        let mut c = vec![0f32; key_cache_len(20, width)];
        assert_eq!(c.len(), 32 * width);
        let rows: Vec<f32> = (0..2 * width).map(|x| x as f32 + 1.0).collect();
        write_keys(&mut c, width, 15, &rows);
        // Position 15: last lane of block 0; position 16: first of block 1.
        assert_eq!([c[15], c[16 + 15], c[32 + 15]], [1.0, 2.0, 3.0]);
        let b1 = width * KEY_BLOCK;
        assert_eq!([c[b1], c[b1 + 16], c[b1 + 32]], [4.0, 5.0, 6.0]);
        assert_eq!(c.iter().filter(|&&x| x != 0.0).count(), 2 * width);
    }

    #[test]
    fn ragged_batch_equals_each_sequence_alone() {
        let (h, kh, d) = (6, 2, 8);
        let window = Some(5);
        // (cached, new): a decode step, a prefill chunk after a cache, a
        // fresh prompt longer than a tile.
        let shapes = [(9usize, 1usize), (4, 7), (0, 70)];
        let mut qs = Vec::new();
        let mut caches = Vec::new();
        let mut expected = Vec::new();
        for (i, &(start, len)) in shapes.iter().enumerate() {
            let q = random(&[1, len, h, d], 10 + i as u64, 0.5);
            let k = random(&[1, start + len, kh, d], 20 + i as u64, 0.5);
            let v = random(&[1, start + len, kh, d], 30 + i as u64, 0.5);
            let mask = AttentionMask::causal(1, len, start + len)
                .unwrap()
                .with_window(window);
            expected.push(
                attention(&q, &k, &v, &mask, 0.3)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
            qs.push(q.squeeze(0).unwrap());
            caches.push((
                key_cache(&k.squeeze(0).unwrap(), 100),
                value_cache(&v.squeeze(0).unwrap(), 100),
            ));
        }
        let q = Tensor::cat(&qs, 0).unwrap();
        let seqs: Vec<CachedSeq> = shapes
            .iter()
            .zip(&caches)
            .map(|(&(start, len), (k, v))| CachedSeq { k, v, start, len })
            .collect();
        let got = cached_attention(&q, kh, &seqs, window, 0.3).unwrap();
        let want = Tensor::cat(&expected, 0).unwrap();
        assert_close(&got, &want, 1e-6, "ragged batch vs each sequence");
    }

    /// Rows `a..b` of a `[N, H, D]` tensor, flat.
    fn rows(x: &Tensor, a: usize, b: usize) -> Vec<f32> {
        x.narrow(0, a, b - a)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn a_query_gets_the_same_bits_however_its_prompt_is_split_or_batched() {
        // A head width of 64 + 8: the wide value kernel and its tail.
        let (h, kh, d, t) = (6, 2, 72, 150);
        let q = random(&[t, h, d], 1, 0.8);
        let k = key_cache(&random(&[t, kh, d], 2, 0.8), 160);
        let v = value_cache(&random(&[t, kh, d], 3, 0.8), 160);
        let other_q = random(&[9, h, d], 4, 0.8);
        let other_k = key_cache(&random(&[30, kh, d], 5, 0.8), 40);
        let other_v = value_cache(&random(&[30, kh, d], 6, 0.8), 40);
        for window in [None, Some(40)] {
            let whole_seq = CachedSeq {
                k: &k,
                v: &v,
                start: 0,
                len: t,
            };
            let whole = cached_attention(&q, kh, &[whole_seq], window, 0.2).unwrap();
            let whole = rows(&whole, 0, t);
            for splits in [&[1, 149][..], &[37, 27, 86], &[64, 64, 22], &[149, 1]] {
                let mut got = Vec::new();
                let mut start = 0;
                for &len in splits {
                    // Each chunk next to another sequence's decode rows.
                    let chunk = q.narrow(0, start, len).unwrap();
                    let batch = Tensor::cat(&[&other_q, &chunk], 0).unwrap();
                    let seqs = [
                        CachedSeq {
                            k: &other_k,
                            v: &other_v,
                            start: 21,
                            len: 9,
                        },
                        CachedSeq {
                            k: &k,
                            v: &v,
                            start,
                            len,
                        },
                    ];
                    let out = cached_attention(&batch, kh, &seqs, window, 0.2).unwrap();
                    got.extend(rows(&out, 9, 9 + len));
                    start += len;
                }
                assert!(got == whole, "{window:?} split {splits:?}");
            }
        }
    }

    #[test]
    fn portable_loops_give_the_avx512_kernels_bits() {
        if !avx512f() {
            return; // nothing to compare on this CPU
        }
        let (h, kh, d, t) = (8, 2, 80, 45);
        let q = random(&[t, h, d], 7, 0.8);
        let k = key_cache(&random(&[t, kh, d], 8, 0.8), 48);
        let v = value_cache(&random(&[t, kh, d], 9, 0.8), 48);
        let seqs = [CachedSeq {
            k: &k,
            v: &v,
            start: 0,
            len: t,
        }];
        for window in [None, Some(7)] {
            let wide = attention_over_caches(&q, kh, &seqs, window, 0.3, true).unwrap();
            let portable = attention_over_caches(&q, kh, &seqs, window, 0.3, false).unwrap();
            assert!(rows(&wide, 0, t) == rows(&portable, 0, t), "{window:?}");
        }
    }
}
