//! Borrowing a tensor's f32 host memory, and making tensors from vectors.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

/// The contiguous f32 elements a custom op's input describes.
pub(crate) fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op} expects f32 input, got {:?}", storage.dtype());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op} expects a contiguous input");
    };
    Ok(&data[start..end])
}

/// Runs `f` on the f32 elements of each of `ts` in row-major order (a
/// strided tensor is copied first; a contiguous one is borrowed).
pub(crate) fn with_f32<const N: usize, R>(
    ts: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    with_f32_all(&ts, op, |slices| match <[&[f32]; N]>::try_from(slices) {
        Ok(slices) => f(slices),
        Err(_) => bail!("{op}: {N} inputs expected"),
    })
}

/// [`with_f32`] for any number of tensors.
pub(crate) fn with_f32_all<R>(
    ts: &[&Tensor],
    op: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("{op} runs on the CPU only");
        };
        slices.push(slice(cpu, layout, op)?);
    }
    f(&slices)
}

/// Below this many values [`zeros`] zeroes on the calling thread.
const SERIAL_ZEROS: usize = 1 << 16;

/// `len` zeros, written on the thread pool where there are many: an
/// output of tens of megabytes zeroed on one thread kept the others
/// waiting (about 2% of a long-context training step).
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    if len < SERIAL_ZEROS {
        return vec![0f32; len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len));
    v
}

/// A CPU tensor owning `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}
