//! `y = x Wᵀ` straight from GGML quantized blocks, for inference on few
//! rows (batch-1 decode), where reading the weights is the cost: a Q4_1
//! matrix is 0.625 bytes per weight against 4 for f32. Blocks are repacked
//! at load into separate scale, min and quant arrays so the inner loop is
//! a plain vector loop (no f16 conversion, no struct strides). Layouts as
//! in ggml (`ggml-common.h`): Q4_1 blocks of 32 weights are `d·q + m` with
//! `q` a nibble, low nibbles the first 16 weights; Q8_0 blocks are `d·q`
//! with `q` a signed byte. No gradient: training dequantizes instead.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use half::f16;
use rayon::prelude::*;

use crate::storage::{slice, tensor};
use crate::vec::multiversion;

/// Weights per block.
const BLOCK: usize = 32;

/// The block formats with a fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit with a scale and a minimum per 32 weights (20 bytes).
    Q4_1,
    /// 8-bit with a scale per 32 weights (34 bytes).
    Q8_0,
}

/// A `[rows, cols]` matrix kept in its quantized blocks, repacked.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
    mins: Vec<f32>,
    quants: Vec<u8>,
}

impl QuantMatrix {
    /// Repacks `bytes`, the ggml blocks of a row-major `[rows, cols]` matrix.
    pub fn from_ggml(kind: QuantKind, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            bail!("quantized matrix: {cols} columns is not a multiple of {BLOCK}");
        }
        let blocks = rows * cols / BLOCK;
        let size = match kind {
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        };
        if bytes.len() != blocks * size {
            bail!(
                "quantized matrix: {} bytes for {blocks} blocks of {size}",
                bytes.len()
            );
        }
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut m = Self {
            kind,
            rows,
            cols,
            scales: Vec::with_capacity(blocks),
            mins: Vec::new(),
            quants: Vec::with_capacity(blocks * (size - 4)),
        };
        for b in bytes.chunks_exact(size) {
            m.scales.push(half(&b[0..2]));
            match kind {
                QuantKind::Q4_1 => {
                    m.mins.push(half(&b[2..4]));
                    m.quants.extend_from_slice(&b[4..20]);
                }
                QuantKind::Q8_0 => m.quants.extend_from_slice(&b[2..34]),
            }
        }
        Ok(m)
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x Wᵀ` for `x` of shape `[..., cols]`; backward gives `x` its
    /// gradient (through the dequantized weight), the weight none.
    pub fn matmul(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op1(QuantizedMatmul { w: self.clone() })
    }

    /// The dense `[rows, cols]` values.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (b, &d) in self.scales.iter().enumerate() {
            match self.kind {
                QuantKind::Q4_1 => {
                    let q = &self.quants[b * 16..b * 16 + 16];
                    let m = self.mins[b];
                    out.extend(q.iter().map(|v| d * (v & 15) as f32 + m));
                    out.extend(q.iter().map(|v| d * (v >> 4) as f32 + m));
                }
                QuantKind::Q8_0 => {
                    out.extend(
                        self.quants[b * 32..b * 32 + 32]
                            .iter()
                            .map(|&v| d * v as i8 as f32),
                    );
                }
            }
        }
        out
    }

    /// `x Wᵀ` over row-major rows of width `cols`.
    fn products(&self, x: &[f32]) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let t = x.len() / self.cols;
        // Per input row, the sum of each block of 32 (for Q4_1's minimums).
        let sums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        // Two tasks per thread: enough to balance, few enough that
        // scheduling stays small next to the work.
        let per_task = self
            .rows
            .div_ceil(2 * rayon::current_num_threads())
            .next_multiple_of(8);
        let range = |task: usize| (task * per_task, ((task + 1) * per_task).min(self.rows));
        let parts: Vec<Vec<f32>> = (0..self.rows.div_ceil(per_task))
            .into_par_iter()
            .map(|task| {
                let (o0, o1) = range(task);
                let mut out = vec![0f32; t * (o1 - o0)];
                let s = &self.scales[o0 * nb..o1 * nb];
                match self.kind {
                    QuantKind::Q4_1 => {
                        let q = &self.quants[o0 * nb * 16..o1 * nb * 16];
                        let m = &self.mins[o0 * nb..o1 * nb];
                        q4_1_rows(q, s, m, x, &sums, self.cols, &mut out);
                    }
                    QuantKind::Q8_0 => {
                        let q = &self.quants[o0 * nb * 32..o1 * nb * 32];
                        q8_0_rows(q, s, x, self.cols, &mut out);
                    }
                }
                out
            })
            .collect();
        let mut y = vec![0f32; t * self.rows];
        for (task, part) in parts.iter().enumerate() {
            let (o0, o1) = range(task);
            for (r, chunk) in part.chunks_exact(o1 - o0).enumerate() {
                y[r * self.rows + o0..r * self.rows + o1].copy_from_slice(chunk);
            }
        }
        y
    }
}

struct QuantizedMatmul {
    w: Arc<QuantMatrix>,
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let dims = layout.dims();
        if dims.last() != Some(&self.w.cols) {
            bail!(
                "quantized matmul: input {dims:?} does not end in {}",
                self.w.cols
            );
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = self.w.rows;
        Ok((CpuStorage::F32(self.w.products(x)), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out, inp) = (self.w.rows, self.w.cols);
        let w = tensor(self.w.dequantize(), (out, inp))?;
        let rows = grad.elem_count() / out;
        Ok(Some(
            grad.reshape((rows, out))?
                .matmul(&w)?
                .reshape(arg.shape())?,
        ))
    }
}

/// Input rows taken together through one pass over a block of weights.
const GROUP: usize = 4;

/// Adds one Q4_1 block's `d·q·x` into the 16 lanes of `acc`, its nibbles
/// already as floats (`lo` the first 16 weights, `hi` the next 16).
#[inline(always)]
fn q4_1_block(acc: &mut [f32; 16], lo: &[f32; 16], hi: &[f32; 16], d: f32, x: &[f32]) {
    let x: &[f32; 32] = x.try_into().expect("32 values");
    for i in 0..16 {
        acc[i] += d * (lo[i] * x[i] + hi[i] * x[16 + i]);
    }
}

/// The nibbles of a Q4_1 block as floats.
#[inline(always)]
fn nibbles(q: &[u8]) -> ([f32; 16], [f32; 16]) {
    let q: &[u8; 16] = q.try_into().expect("16 bytes");
    (
        std::array::from_fn(|i| (q[i] & 15) as f32),
        std::array::from_fn(|i| (q[i] >> 4) as f32),
    )
}

multiversion! {
    /// `Σ (d·q + m)·x` over each output row's Q4_1 blocks for every input
    /// row of `x` (rows of `cols`; `out` is `[rows of x, output rows]`),
    /// the minimums through the block sums `xsum`. Each block is unpacked
    /// once for up to `GROUP` input rows, and every row's sum runs in the
    /// same order whatever the number of rows, so a row's result does not
    /// depend on what else is in its batch.
    fn q4_1_rows(quants: &[u8], scales: &[f32], mins: &[f32], x: &[f32], xsum: &[f32], cols: usize, out: &mut [f32]) {
        let nb = cols / BLOCK;
        let t = x.len() / cols;
        let outs = out.len() / t;
        for o in 0..outs {
            let row = &quants[o * nb * 16..(o + 1) * nb * 16];
            let d = &scales[o * nb..(o + 1) * nb];
            let m = &mins[o * nb..(o + 1) * nb];
            for r0 in (0..t).step_by(GROUP) {
                let g = GROUP.min(t - r0);
                // Two accumulators (even and odd blocks) per row hide the FMA latency.
                let mut acc = [[[0f32; 16]; 2]; GROUP];
                for b in 0..nb {
                    let (lo, hi) = nibbles(&row[b * 16..b * 16 + 16]);
                    for (k, a) in acc.iter_mut().enumerate().take(g) {
                        let at = (r0 + k) * cols + b * BLOCK;
                        q4_1_block(&mut a[b % 2], &lo, &hi, d[b], &x[at..at + BLOCK]);
                    }
                }
                for (k, a) in acc.iter().enumerate().take(g) {
                    let mut bias = 0f32;
                    for (mb, sb) in m.iter().zip(&xsum[(r0 + k) * nb..(r0 + k + 1) * nb]) {
                        bias += mb * sb;
                    }
                    out[(r0 + k) * outs + o] = a[0].iter().sum::<f32>() + a[1].iter().sum::<f32>() + bias;
                }
            }
        }
    }
}

multiversion! {
    /// `Σ d·q·x` over each output row's Q8_0 blocks for every input row of
    /// `x` (rows of `cols`; `out` is `[rows of x, output rows]`); each block
    /// is converted once for up to `GROUP` rows, each row summed in the
    /// same order whatever the number of rows.
    fn q8_0_rows(quants: &[u8], scales: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
        let nb = cols / BLOCK;
        let t = x.len() / cols;
        let outs = out.len() / t;
        for o in 0..outs {
            for r0 in (0..t).step_by(GROUP) {
                let g = GROUP.min(t - r0);
                let mut acc = [[0f32; 32]; GROUP];
                for b in 0..nb {
                    let q: &[u8; 32] = quants[(o * nb + b) * 32..][..32].try_into().expect("32 bytes");
                    let qf: [f32; 32] = std::array::from_fn(|i| q[i] as i8 as f32);
                    let d = scales[o * nb + b];
                    for (k, a) in acc.iter_mut().enumerate().take(g) {
                        let at = (r0 + k) * cols + b * BLOCK;
                        let xb: &[f32; 32] = x[at..at + BLOCK].try_into().expect("32 values");
                        for i in 0..32 {
                            a[i] += d * (qf[i] * xb[i]);
                        }
                    }
                }
                for (k, a) in acc.iter().enumerate().take(g) {
                    out[(r0 + k) * outs + o] = a.iter().sum();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_op, random};

    /// ggml blocks of random values, and their dequantized matrix.
    fn blocks(kind: QuantKind, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for b in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.01 + (b % 7) as f32 * 0.003);
            let m = f16::from_f32(-0.05 + (b % 5) as f32 * 0.01);
            bytes.extend_from_slice(&d.to_le_bytes());
            let q: Vec<u8> = (0..BLOCK)
                .map(|i| ((b * 31 + i * 17) % 251) as u8)
                .collect();
            match kind {
                QuantKind::Q4_1 => {
                    bytes.extend_from_slice(&m.to_le_bytes());
                    let nib: Vec<u8> = q.iter().map(|v| v & 15).collect();
                    bytes.extend((0..16).map(|i| nib[i] | (nib[16 + i] << 4)));
                    dense.extend(nib.iter().map(|&n| d.to_f32() * n as f32 + m.to_f32()));
                }
                QuantKind::Q8_0 => {
                    bytes.extend_from_slice(&q);
                    dense.extend(q.iter().map(|&v| d.to_f32() * v as i8 as f32));
                }
            }
        }
        (bytes, dense)
    }

    #[test]
    fn equals_dequantize_then_matmul() {
        for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
            let (rows, cols) = (70, 96);
            let (bytes, dense) = blocks(kind, rows, cols);
            let m = Arc::new(QuantMatrix::from_ggml(kind, rows, cols, &bytes).unwrap());
            assert_eq!(m.dequantize(), dense);
            let w = Tensor::from_vec(dense, (rows, cols), &candle_core::Device::Cpu).unwrap();
            let wt = w.t().unwrap();
            let x = random(&[3, cols], 1, 1.0);
            check_op(&[x], &|a| m.matmul(&a[0]), &|a| a[0].matmul(&wt), 1e-5);
        }
        assert!(QuantMatrix::from_ggml(QuantKind::Q8_0, 2, 32, &[0; 10]).is_err());
    }
}
