//! Per-thread buffers reused from call to call: a kernel takes its
//! thread's buffer for the call (a nested call on the same thread finds
//! it taken and makes its own) and hands it back after, so the buffer's
//! pages are touched once rather than once per call.

use std::cell::Cell;
use std::thread::LocalKey;

/// A thread's reusable buffer.
pub(crate) type Reused<T> = LocalKey<Cell<Vec<T>>>;

/// The most values a buffer keeps between calls (8 MiB of bf16, 16 MiB of
/// f32): a projection's operands and an attention tile's scores fit; a
/// whole LM head's share is made afresh rather than held while everything
/// else runs.
const KEPT: usize = 4 << 20;

/// Hands `v` back to `buffer` for the next call on this thread, unless it
/// grew past [`KEPT`] values.
pub(crate) fn hand_back<T>(buffer: &'static Reused<T>, v: Vec<T>) {
    if v.capacity() <= KEPT {
        buffer.set(v);
    }
}
