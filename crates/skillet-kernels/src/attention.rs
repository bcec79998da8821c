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

use crate::gemm::{Out, View, matmul};
use crate::rope::{RopeLayout, RopeTable, rotate};
use crate::storage::{slice, tensor, with_f32};
use crate::vec::{dot, exp_shifted_sum, max, scale};

/// Queries per tile (per head).
const TILE: usize = 64;

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

    /// The `[S', D]` view of key/value head `kh` of sequence `b` from key `lo`.
    fn kv<'a>(&self, data: &'a [f32], b: usize, kh: usize, lo: usize) -> View<'a> {
        View::rows(
            &data[((b * self.s + lo) * self.k + kh) * self.d..],
            self.k * self.d,
        )
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

/// What one tile contributes to the gradients (see `tile_backward`).
struct TileGrads {
    lo: usize,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
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
}

impl Attention {
    /// Scaled, masked scores of a tile's queries `qt` (`G·n × D`) against
    /// the keys they may see, and the first of those keys.
    fn scores(&self, dims: &Dims, tile: Tile, qt: &[f32], k: &[f32]) -> (usize, usize, Vec<f32>) {
        let lo = self.mask.range(tile.i0).0;
        let hi = self.mask.range(tile.i0 + tile.n - 1).1;
        let ns = hi - lo;
        let rows = dims.g * tile.n;
        let mut s = vec![0f32; rows * ns];
        let kv = dims.kv(k, tile.b, tile.kh, lo);
        matmul(
            rows,
            ns,
            dims.d,
            View::rows(qt, dims.d),
            kv.t(),
            Out::new(&mut s, ns).scaled(self.scale),
            false,
        );
        let exact = self.mask.key_mask.is_some() || self.mask.segments.is_some();
        for (r, row) in s.chunks_exact_mut(ns).enumerate() {
            let i = tile.i0 + r % tile.n;
            let (a, z) = self.mask.range(i);
            row[..a - lo].fill(f32::NEG_INFINITY);
            row[z - lo..].fill(f32::NEG_INFINITY);
            if exact {
                for j in a..z {
                    if !self.mask.allowed(tile.b, i, j) {
                        row[j - lo] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        (lo, ns, s)
    }

    /// One tile's output rows (`G·n × D`, head-major) and the log-sum-exp
    /// of each of its queries (−∞ when a query sees no key).
    pub(crate) fn tile_forward(
        &self,
        dims: &Dims,
        tile: Tile,
        [q, k, v]: [&[f32]; 3],
    ) -> (Vec<f32>, Vec<f32>) {
        let d = dims.d;
        let qt = dims.gather(q, tile);
        let (lo, ns, mut p) = self.scores(dims, tile, &qt, k);
        let mut lse = Vec::with_capacity(dims.g * tile.n);
        for row in p.chunks_exact_mut(ns) {
            let m = max(row);
            if m == f32::NEG_INFINITY {
                row.fill(0.0);
                lse.push(f32::NEG_INFINITY);
            } else {
                let sum = exp_shifted_sum(row, m);
                scale(row, 1.0 / sum);
                lse.push(m + sum.ln());
            }
        }
        let mut o = vec![0f32; dims.g * tile.n * d];
        matmul(
            dims.g * tile.n,
            d,
            ns,
            View::rows(&p, ns),
            dims.kv(v, tile.b, tile.kh, lo),
            Out::new(&mut o, d),
            false,
        );
        (o, lse)
    }

    /// One tile's share of the gradients: its queries' `dQ` rows, and the
    /// `dK`, `dV` rows of the keys it saw (from key `lo`), to be summed.
    /// `inputs` are `q`, `k`, `v`, the forward output `o` and `dO`.
    fn tile_backward(
        &self,
        dims: &Dims,
        tile: Tile,
        inputs: [&[f32]; 5],
        lse: &[f32],
    ) -> TileGrads {
        let [q, k, v, o, dout] = inputs;
        let (d, rows) = (dims.d, dims.g * tile.n);
        let qt = dims.gather(q, tile);
        let dot_t = dims.gather(dout, tile);
        let ot = dims.gather(o, tile);
        // P again, from the saved log-sum-exp.
        let (lo, ns, mut p) = self.scores(dims, tile, &qt, k);
        for (r, row) in p.chunks_exact_mut(ns).enumerate() {
            let l = lse[dims.lse_at(tile, r / tile.n, r % tile.n)];
            if l == f32::NEG_INFINITY {
                row.fill(0.0);
            } else {
                exp_shifted_sum(row, l);
            }
        }
        // dP = dO Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)).
        let mut ds = vec![0f32; rows * ns];
        let vv = dims.kv(v, tile.b, tile.kh, lo);
        matmul(
            rows,
            ns,
            d,
            View::rows(&dot_t, d),
            vv.t(),
            Out::new(&mut ds, ns),
            false,
        );
        for (r, (dsr, pr)) in ds.chunks_exact_mut(ns).zip(p.chunks_exact(ns)).enumerate() {
            let di = dot(&dot_t[r * d..(r + 1) * d], &ot[r * d..(r + 1) * d]);
            for (x, &pv) in dsr.iter_mut().zip(pr) {
                *x = pv * (*x - di);
            }
        }
        let kk = dims.kv(k, tile.b, tile.kh, lo);
        let mut dq = vec![0f32; rows * d];
        matmul(
            rows,
            d,
            ns,
            View::rows(&ds, ns),
            kk,
            Out::new(&mut dq, d).scaled(self.scale),
            false,
        );
        let mut dk = vec![0f32; ns * d];
        let dst = View::rows(&ds, ns).t();
        matmul(
            ns,
            d,
            rows,
            dst,
            View::rows(&qt, d),
            Out::new(&mut dk, d).scaled(self.scale),
            false,
        );
        let mut dv = vec![0f32; ns * d];
        let pt = View::rows(&p, ns).t();
        matmul(
            ns,
            d,
            rows,
            pt,
            View::rows(&dot_t, d),
            Out::new(&mut dv, d),
            false,
        );
        TileGrads { lo, dq, dk, dv }
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
        let d = dims.d;
        let tiles = dims.tiles();
        let (dq, dk, dv) = with_f32([q, k, v, res, grad], self.name(), |inputs| {
            let parts: Vec<TileGrads> = tiles
                .par_iter()
                .map(|&tile| self.tile_backward(&dims, tile, inputs, &lse))
                .collect();
            let [q, k, v, ..] = inputs;
            let mut dq = vec![0f32; q.len()];
            let mut dk = vec![0f32; k.len()];
            let mut dv = vec![0f32; v.len()];
            for (tile, part) in tiles.iter().zip(&parts) {
                dims.scatter(&mut dq, *tile, &part.dq);
                let rows = part.dk.chunks_exact(d).zip(part.dv.chunks_exact(d));
                for (j, (kr, vr)) in rows.enumerate() {
                    let at = ((tile.b * dims.s + part.lo + j) * dims.k + tile.kh) * d;
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
    apply(q, k, v, mask, scale, None)
}

/// [`attention`] of `q` and `k` rotated by `table` (`q` and `k` at the
/// same positions): the rotated copies are made inside the op, for the
/// call and again in backward, so the graph never keeps them.
pub fn attention_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
    table: &RopeTable,
    layout: RopeLayout,
) -> Result<Tensor> {
    apply(q, k, v, mask, scale, Some((table.clone(), layout)))
}

fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
    rope: Option<(RopeTable, RopeLayout)>,
) -> Result<Tensor> {
    let op = Attention {
        mask: mask.clone(),
        scale,
        lse: Arc::new(Mutex::new(Vec::new())),
        rope,
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
    use crate::testing::{assert_close, check_op, grads, random};

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
                &|a| attention_rope(&a[0], &a[1], &a[2], &mask, scale, &table, layout),
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
