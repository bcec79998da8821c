//! Key/value cache for incremental decoding, with the key padding mask of
//! everything cached so far.

use candle_core::Tensor;

/// Cached keys and values of every layer for a batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer, keys and values `[batch, len, kv_heads, head_dim]`.
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    /// `[batch, len]` row-major: 1 where the cached key is a real token.
    pub(crate) key_mask: Vec<u8>,
    pub(crate) batch: usize,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers and `batch` sequences.
    pub fn new(layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![None; layers],
            key_mask: Vec::new(),
            batch,
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batch size the cache was made for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Key padding mask of cached positions for one row.
    pub fn key_mask_row(&self, row: usize) -> &[u8] {
        &self.key_mask[row * self.len..(row + 1) * self.len]
    }

    /// Appends `t` positions of `chunk` (`[batch, t]` row-major) to the mask.
    pub(crate) fn extend_mask(&mut self, chunk: &[u8], t: usize) {
        let old = std::mem::take(&mut self.key_mask);
        let new_len = self.len + t;
        let mut mask = Vec::with_capacity(self.batch * new_len);
        for b in 0..self.batch {
            mask.extend_from_slice(&old[b * self.len..(b + 1) * self.len]);
            mask.extend_from_slice(&chunk[b * t..(b + 1) * t]);
        }
        self.key_mask = mask;
        self.len = new_len;
    }
}
