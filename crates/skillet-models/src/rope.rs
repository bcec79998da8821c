//! Rotary position embeddings in the Hugging Face layout (`rotate_half`:
//! the two halves of each head are the pair), following transformers'
//! `LlamaRotaryEmbedding` and its `rope_type` variants; the rotation
//! itself is `skillet_kernels::rope` (Su et al. 2021,
//! arXiv 2104.09864; Llama 3.1 scaling from Meta's reference code).

use skillet_kernels::RopeTable;

use crate::config::RopeConfig;
use crate::{Result, RopeScaling};

/// Inverse frequencies of one model; cos/sin are computed per call for the
/// positions at hand, so there is no table and no length limit.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies of `rope` (base, scaling) for heads `dim` wide.
    pub fn new(rope: &RopeConfig, dim: usize) -> Self {
        let base = rope.theta;
        let mut inv: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        match rope.scaling {
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

    /// The cos/sin table for `positions` (one per token, `batch × seq`
    /// row-major), for the fused rotation.
    pub fn table(&self, positions: &[u32]) -> Result<RopeTable> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // f32 product, as transformers computes `inv_freq @ position_ids`.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RopeTable::new(cos, sin, positions.len(), half)?)
    }
}
