//! What a run trains: the parameters the optimizer updates, how the model
//! sees them (an adapter passed with every call, or nothing where the
//! model's own weights are the variables), and how they are saved.

use std::path::Path;
use std::sync::Arc;

use candle_core::Var;
use skillet_adapters::{LoraAdapter, RewardAdapter, save_peft};
use skillet_models::Adapter;

use crate::Result;

/// Trainable parameters.
pub trait Trainable {
    /// The variables, in the optimizer's order.
    fn vars(&self) -> Vec<Var>;
    /// The adapter the model runs with (`None`: the model's own weights).
    fn adapter(&self) -> Option<Arc<dyn Adapter>>;
    /// Writes the parameters into `dir` (created) in their usual format.
    fn save(&self, dir: &Path, base_model: Option<String>) -> Result<()>;
    /// Number of trained parameters.
    fn parameter_count(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }
}

impl Trainable for LoraAdapter {
    fn vars(&self) -> Vec<Var> {
        LoraAdapter::vars(self)
    }

    fn adapter(&self) -> Option<Arc<dyn Adapter>> {
        // A clone shares the variables: updates show through.
        Some(Arc::new(self.clone()))
    }

    fn save(&self, dir: &Path, base_model: Option<String>) -> Result<()> {
        Ok(save_peft(self, dir, base_model)?)
    }
}

impl Trainable for RewardAdapter {
    fn vars(&self) -> Vec<Var> {
        RewardAdapter::vars(self)
    }

    fn adapter(&self) -> Option<Arc<dyn Adapter>> {
        Some(Arc::new(self.lora.clone()))
    }

    fn save(&self, dir: &Path, base_model: Option<String>) -> Result<()> {
        Ok(RewardAdapter::save(self, dir, base_model)?)
    }
}

/// Every weight of a model loaded trainable: full fine-tuning. Saved as
/// one safetensors file under the model's own tensor names.
pub struct FullWeights {
    /// The weights and their names.
    pub named: Vec<(String, Var)>,
}

impl Trainable for FullWeights {
    fn vars(&self) -> Vec<Var> {
        self.named.iter().map(|(_, v)| v.clone()).collect()
    }

    fn adapter(&self) -> Option<Arc<dyn Adapter>> {
        None
    }

    fn save(&self, dir: &Path, _base_model: Option<String>) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::TrainError::Invalid(format!("{}: {e}", dir.display())))?;
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = self
            .named
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        Ok(())
    }
}
