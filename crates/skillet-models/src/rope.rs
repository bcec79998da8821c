//! Rotary position embeddings in the Hugging Face layout (`rotate_half`:
//! the two halves of each head are the pair), following transformers'
//! `LlamaRotaryEmbedding` and its `rope_type` variants (Su et al. 2021,
//! arXiv 2104.09864; Llama 3.1 scaling from Meta's reference code).

use candle_core::{D, Device, Tensor};

use crate::{LlamaConfig, Result, RopeScaling};

/// Inverse frequencies of one model; cos/sin are computed per call for the
/// positions at hand, so there is no table and no length limit.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `cfg` (base, head width, scaling).
    pub fn new(cfg: &LlamaConfig) -> Self {
        let dim = cfg.head_dim;
        let base = cfg.rope_theta;
        let mut inv: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        match cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self {
            inv_freq: inv.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// `cos` and `sin` of shape `[batch, 1, t, head_dim]` for `positions`
    /// (`[batch, t]` row-major), halves duplicated as transformers does.
    pub fn cos_sin(
        &self,
        positions: &[u32],
        batch: usize,
        t: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(positions.len() * dim);
        let mut sin = Vec::with_capacity(positions.len() * dim);
        for &p in positions {
            let start = cos.len();
            for &f in &self.inv_freq {
                // f32 product, as transformers computes `inv_freq @ position_ids`.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let shape = (batch, 1, t, dim);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }

    /// Rotates `x` of shape `[batch, heads, t, head_dim]`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
    }
}
