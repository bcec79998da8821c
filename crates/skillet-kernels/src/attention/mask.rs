//! Which keys each query of a fused attention may see: causal order,
//! key padding, a sliding window and packing segments (one of which may be
//! a prefix that every segment after it continues).

use std::sync::Arc;

use candle_core::{Device, Result, Tensor, bail};

/// The segment id of a shared prefix: its keys are seen by every later
/// query of their row, whatever that query's segment (several completions
/// of one prompt packed after a single copy of it).
pub const SHARED_SEGMENT: u32 = u32::MAX;

/// Which keys each query may attend to.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    pub(super) batch: usize,
    pub(super) queries: usize,
    pub(super) keys: usize,
    pub(super) key_mask: Option<Arc<Vec<u8>>>,
    pub(super) segments: Option<Arc<Vec<u32>>>,
    pub(super) window: Option<usize>,
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
    /// keys whose segment equals its own position's, and keys of
    /// [`SHARED_SEGMENT`].
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
    /// itself included (Mistral's convention). A window of 0 means none,
    /// as a GGUF's missing window does.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window.filter(|&w| w > 0);
        self
    }

    pub(super) fn offset(&self) -> usize {
        self.keys - self.queries
    }

    /// Keys `lo..hi` that causality and the window leave to query `i`.
    pub(super) fn range(&self, i: usize) -> (usize, usize) {
        let q = self.offset() + i;
        let lo = self.window.map_or(0, |w| (q + 1).saturating_sub(w));
        (lo, q + 1)
    }

    /// Whether query `i` of sequence `b` may see key `j`.
    pub(super) fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        let (lo, hi) = self.range(i);
        let row = b * self.keys;
        j >= lo
            && j < hi
            && self.key_mask.as_ref().is_none_or(|m| m[row + j] != 0)
            && self.segments.as_ref().is_none_or(|s| {
                s[row + j] == SHARED_SEGMENT || s[row + j] == s[row + self.offset() + i]
            })
    }

    /// Sets to −∞ the scores in `row` (keys `j0..j0 + row.len()`, all
    /// inside query `i`'s causal range) of keys that padding or segments
    /// hide from query `i` of sequence `b`: [`Self::allowed`] for a run of
    /// keys, with the query's segment looked up once.
    pub(super) fn hide(&self, b: usize, i: usize, j0: usize, row: &mut [f32]) {
        let at = b * self.keys + j0;
        let keys = at..at + row.len();
        // Selects rather than branches, so the loops vectorize.
        if let Some(m) = &self.key_mask {
            for (v, &m) in row.iter_mut().zip(&m[keys.clone()]) {
                *v = if m == 0 { f32::NEG_INFINITY } else { *v };
            }
        }
        if let Some(s) = &self.segments {
            let own = s[b * self.keys + self.offset() + i];
            for (v, &k) in row.iter_mut().zip(&s[keys]) {
                let hidden = k != own && k != SHARED_SEGMENT;
                *v = if hidden { f32::NEG_INFINITY } else { *v };
            }
        }
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
