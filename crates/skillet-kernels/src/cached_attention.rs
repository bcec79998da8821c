//! Attention of a ragged batch over per-sequence key/value caches, for
//! inference (no backward): the new tokens of several sequences arrive
//! flattened into one `[N, H, D]` block (a decode step's single token per
//! sequence next to a prefill chunk of another), and each sequence's
//! queries attend causally over its own cache, which already holds the
//! keys and values of its new tokens. Every sequence reuses the tile of the
//! fused training kernel (`attention.rs`), so both compute the same
//! numbers; tiles of all sequences run in one parallel pass.

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, bail};
use rayon::prelude::*;

use crate::AttentionMask;
use crate::attention::{Attention, Dims, Tile};
use crate::storage::{tensor, with_f32};

/// One sequence of a ragged batch: its cache and where its new tokens sit.
#[derive(Debug, Clone, Copy)]
pub struct CachedSeq<'a> {
    /// Keys `[capacity, K, D]` row-major; rows `0..start + len` are filled.
    pub k: &'a [f32],
    /// Values, laid out as the keys.
    pub v: &'a [f32],
    /// Positions cached before this call's tokens.
    pub start: usize,
    /// New tokens of this sequence in the batch (consecutive rows of `q`).
    pub len: usize,
}

/// Queries `q` (`[N, H, D]`, the sequences' new tokens in order) over each
/// sequence's cached keys and values (`K` heads of width `D`, `H` a
/// multiple of `K`), causal, within `window` positions when set. Returns
/// `[N, H, D]`.
pub fn cached_attention(
    q: &Tensor,
    kv_heads: usize,
    seqs: &[CachedSeq],
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let (n, h, d) = q.dims3()?;
    if kv_heads == 0 || h % kv_heads != 0 {
        bail!("cached attention: {h} query heads over {kv_heads} key/value heads");
    }
    if seqs.iter().map(|s| s.len).sum::<usize>() != n {
        bail!("cached attention: the sequences' tokens do not add up to {n} queries");
    }
    let width = kv_heads * d;
    let mut plans = Vec::with_capacity(seqs.len());
    let mut row = 0;
    for s in seqs {
        let keys = s.start + s.len;
        if s.k.len() < keys * width || s.v.len() < keys * width {
            bail!("cached attention: a cache holds fewer than {keys} positions");
        }
        let dims = Dims {
            b: 1,
            t: s.len,
            s: keys,
            h,
            k: kv_heads,
            d,
            g: h / kv_heads,
        };
        let op = Attention {
            mask: AttentionMask::causal(1, s.len, keys)?.with_window(window),
            scale,
            lse: Arc::new(Mutex::new(Vec::new())),
        };
        plans.push((row, dims, op));
        row += s.len;
    }
    let work: Vec<(usize, Tile)> = plans
        .iter()
        .enumerate()
        .flat_map(|(i, (_, dims, _))| dims.tiles().into_iter().map(move |t| (i, t)))
        .collect();
    let out = with_f32([q], "cached attention", |[q]| {
        let parts: Vec<Vec<f32>> = work
            .par_iter()
            .map(|&(i, tile)| {
                let (row, dims, op) = &plans[i];
                let qs = &q[row * h * d..(row + dims.t) * h * d];
                op.tile_forward(dims, tile, [qs, seqs[i].k, seqs[i].v]).0
            })
            .collect();
        let mut out = vec![0f32; n * h * d];
        for (&(i, tile), o) in work.iter().zip(&parts) {
            let (row, dims, _) = &plans[i];
            dims.scatter(&mut out[row * h * d..(row + dims.t) * h * d], tile, o);
        }
        Ok(out)
    })?;
    tensor(out, (n, h, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention;
    use crate::testing::{assert_close, random};

    /// A cache of `capacity` rows holding `keys` rows of `k`.
    fn cache(k: &Tensor, capacity: usize) -> Vec<f32> {
        let mut v = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let width = k.dim(1).unwrap() * k.dim(2).unwrap();
        v.resize(capacity * width, f32::NAN); // unfilled rows must never be read
        v
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
                cache(&k.squeeze(0).unwrap(), 100),
                cache(&v.squeeze(0).unwrap(), 100),
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
}
