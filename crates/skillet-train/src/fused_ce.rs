//! LM head + cross-entropy in one op, in chunks of rows, for a frozen head:
//! the `[N, V]` logits (200 MB at 4×256 tokens and a 49k vocabulary) are
//! never stored. Forward sums `logsumexp(h Wᵀ) - (h Wᵀ)[label]` chunk by
//! chunk; backward recomputes each chunk's logits and returns
//! `dh = (softmax(h Wᵀ) - onehot(label)) W · dloss`. The head gets no
//! gradient (it is frozen, as in LoRA). Matches the composed version
//! (tested), the way Liger-Kernel's fused linear cross-entropy does on GPUs.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

/// Rows per chunk: 256 × 49,152 logits is 50 MB.
const CHUNK: usize = 256;

/// Per-call results the loss also reports.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CeStats {
    pub correct: usize,
}

pub(crate) struct FusedLinearCrossEntropy {
    pub weight: Tensor,
    pub labels: Vec<u32>,
    pub stats: Arc<Mutex<CeStats>>,
}

fn input(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(Vec<f32>, usize, usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fused cross-entropy expects f32 hidden states");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused cross-entropy expects contiguous hidden states");
    };
    let (n, c) = layout.shape().dims2()?;
    Ok((data[start..end].to_vec(), n, c))
}

impl FusedLinearCrossEntropy {
    /// Logit rows of hidden rows `from..to`.
    fn logits(
        &self,
        h: &[f32],
        c: usize,
        from: usize,
        to: usize,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let x = Tensor::from_slice(&h[from * c..to * c], (to - from, c), &Device::Cpu)?;
        x.matmul(&self.weight.t()?)?.to_vec2::<f32>()
    }
}

impl CustomOp1 for FusedLinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, n, c) = input(storage, layout)?;
        let mut total = 0f64;
        let mut correct = 0;
        for from in (0..n).step_by(CHUNK) {
            let to = (from + CHUNK).min(n);
            for (k, row) in self.logits(&h, c, from, to)?.iter().enumerate() {
                let label = self.labels[from + k] as usize;
                let (mut max, mut arg) = (f32::NEG_INFINITY, 0);
                for (j, &v) in row.iter().enumerate() {
                    if v > max {
                        max = v;
                        arg = j;
                    }
                }
                let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
                total += max as f64 + sum.ln() - row[label] as f64;
                correct += usize::from(arg == label);
            }
        }
        if let Ok(mut s) = self.stats.lock() {
            s.correct = correct;
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let scale = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let arg = arg.contiguous()?;
        let (n, c) = arg.dims2()?;
        let h = arg.flatten_all()?.to_vec1::<f32>()?;
        let mut parts = Vec::new();
        for from in (0..n).step_by(CHUNK) {
            let to = (from + CHUNK).min(n);
            let mut probs = Vec::with_capacity((to - from) * self.weight.dim(0)?);
            for (k, row) in self.logits(&h, c, from, to)?.iter().enumerate() {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                let label = self.labels[from + k] as usize;
                probs.extend(
                    exps.iter()
                        .enumerate()
                        .map(|(j, &e)| (e / sum - if j == label { 1.0 } else { 0.0 }) * scale),
                );
            }
            let p = Tensor::from_vec(probs, (to - from, self.weight.dim(0)?), &Device::Cpu)?;
            parts.push(p.matmul(&self.weight)?); // [chunk, C]
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}
