//! Key/value cache for incremental decoding: a fixed number of slots, one
//! per running sequence, each holding up to `capacity` positions in every
//! layer. A slot's memory grows with the longest sequence it has held
//! (doubling, and reserved up front by callers who know a sequence's
//! length) and is kept for the next sequence that takes the slot, so
//! decoding appends in place (no per-token concatenation) and a server's
//! memory stops growing once its slots have seen its longest requests.

use skillet_kernels::{key_cache_len, write_keys};

use crate::{ModelError, Result};

#[derive(Debug, Clone, Default)]
struct Slot {
    len: usize,
    /// Positions the buffers have room for.
    room: usize,
    /// Per layer, keys (in blocks of positions, see
    /// `skillet_kernels::write_keys`) then values (`[room, K, D]`
    /// row-major); empty until the slot is first written.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Cached keys and values of every layer for a set of sequence slots.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: usize,
    /// `K · D`: floats per position per layer, for keys and for values.
    width: usize,
    capacity: usize,
    slots: Vec<Slot>,
}

impl KvCache {
    /// `slots` empty slots of `capacity` positions for a model of `layers`
    /// layers whose keys are `width` floats wide per position.
    pub fn new(layers: usize, width: usize, slots: usize, capacity: usize) -> Self {
        Self {
            layers,
            width,
            capacity,
            slots: vec![Slot::default(); slots],
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Positions each slot can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions cached in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.len)
    }

    /// Forgets what `slot` holds (its memory is kept for reuse).
    pub fn clear(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.len = 0;
        }
    }

    /// Keeps only the first `len` positions of `slot` (a cached prompt
    /// prefix reused by the next sequence).
    pub fn truncate(&mut self, slot: usize, len: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.len = s.len.min(len);
        }
    }

    /// Makes room in `slot` for `positions` positions (at most the
    /// capacity), keeping what it holds.
    pub fn reserve_room(&mut self, slot: usize, positions: usize) {
        if slot < self.slots.len() {
            self.grow(slot, positions.min(self.capacity));
        }
    }

    /// Makes `to` hold the first `len` positions of `from` (at most what
    /// `from` holds): a prompt's start computed once for several sequences.
    pub fn copy_prefix(&mut self, from: usize, to: usize, len: usize) {
        let n = self.slots.len();
        if from == to || from >= n || to >= n {
            return;
        }
        let len = len.min(self.slots[from].len);
        if len == 0 {
            self.slots[to].len = 0;
            return;
        }
        self.grow(to, len);
        let (nk, nv) = (key_cache_len(len, self.width), len * self.width);
        let (src, dst) = if from < to {
            let (a, b) = self.slots.split_at_mut(to);
            (&a[from], &mut b[0])
        } else {
            let (a, b) = self.slots.split_at_mut(from);
            (&b[0], &mut a[to])
        };
        for ((sk, sv), (dk, dv)) in src.layers.iter().zip(dst.layers.iter_mut()) {
            dk[..nk].copy_from_slice(&sk[..nk]);
            dv[..nv].copy_from_slice(&sv[..nv]);
        }
        dst.len = len;
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.slots.len() {
            return Err(ModelError::Input(format!(
                "slot {slot} of a cache with {} slots",
                self.slots.len()
            )));
        }
        Ok(())
    }

    /// Room for at least `needed` positions in `slot`: doubling (at least
    /// 64 positions, at most the capacity), contents kept.
    fn grow(&mut self, slot: usize, needed: usize) {
        let (layers, width, capacity) = (self.layers, self.width, self.capacity);
        let s = &mut self.slots[slot];
        if needed <= s.room && !s.layers.is_empty() {
            return;
        }
        let room = needed.max(2 * s.room).max(64).min(capacity);
        // Key blocks are position-major, so growing appends whole blocks.
        let (nk, nv) = (key_cache_len(room, width), room * width);
        if s.layers.is_empty() {
            s.layers = (0..layers)
                .map(|_| (vec![0f32; nk], vec![0f32; nv]))
                .collect();
        } else {
            for (k, v) in &mut s.layers {
                k.resize(nk, 0.0);
                v.resize(nv, 0.0);
            }
        }
        s.room = room;
    }

    /// Checks that `slot` can take `new` more positions and makes its
    /// memory ready; returns where they start.
    pub(crate) fn reserve(&mut self, slot: usize, new: usize) -> Result<usize> {
        self.check_slot(slot)?;
        let start = self.slots[slot].len;
        if start + new > self.capacity {
            return Err(ModelError::Input(format!(
                "slot {slot} holds {start} positions; {new} more exceed its capacity of {}",
                self.capacity
            )));
        }
        self.grow(slot, start + new);
        Ok(start)
    }

    /// Writes keys and values (`[n, K, D]` row-major each) of `layer` at
    /// position `start` of `slot`.
    pub(crate) fn write(&mut self, layer: usize, slot: usize, start: usize, k: &[f32], v: &[f32]) {
        let at = start * self.width;
        let (dk, dv) = &mut self.slots[slot].layers[layer];
        write_keys(dk, self.width, start, k);
        dv[at..at + v.len()].copy_from_slice(v);
    }

    /// The whole key and value buffers of `layer` in `slot`.
    pub(crate) fn layer(&self, layer: usize, slot: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.slots[slot].layers[layer];
        (k, v)
    }

    /// Records `new` more positions in `slot` (after every layer wrote them).
    pub(crate) fn advance(&mut self, slot: usize, new: usize) {
        self.slots[slot].len += new;
    }
}
