//! Borrowing a tensor's f32 host memory, and making tensors from vectors.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, Layout, Result, Shape, Storage, Tensor, bail};

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
    let ts = ts
        .into_iter()
        .map(Tensor::contiguous)
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("{op} runs on the CPU only");
        };
        slices.push(slice(cpu, layout, op)?);
    }
    match <[&[f32]; N]>::try_from(slices) {
        Ok(slices) => f(slices),
        Err(_) => bail!("{op}: {N} inputs expected"),
    }
}

/// A CPU tensor owning `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}
