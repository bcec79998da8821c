//! A reward model as TRL's `RewardTrainer` makes one with PEFT: a LoRA
//! adapter on the body of a causal LM and a scalar head `score` (Linear
//! hidden → 1, no bias) trained whole, read on the final hidden state of a
//! sequence's last token. Saved as transformers + PEFT load it into
//! `AutoModelForSequenceClassification` unchanged: `task_type` `SEQ_CLS`,
//! `modules_to_save` `["score"]`, and `base_model.model.score.weight`
//! `[1, hidden]` beside the LoRA factors.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use skillet_models::{CausalLm, Rng};

use crate::peft::{PeftFile, read_peft, write_peft};
use crate::{AdapterError, LoraAdapter, LoraSettings, PeftAdapterConfig, Result};

/// The saved name of the head's weight.
pub const SCORE_WEIGHT: &str = "score.weight";

/// transformers' `initializer_range` default, the head's initial std.
const INIT_STD: f64 = 0.02;

/// LoRA on the body plus the `score` head.
#[derive(Debug, Clone)]
pub struct RewardAdapter {
    /// The body's adapter.
    pub lora: LoraAdapter,
    /// `[1, hidden]`, f32 (a variable's tensor when trainable).
    pub score: Tensor,
    /// The head's variable when trainable.
    score_var: Option<Var>,
}

impl RewardAdapter {
    /// A trainable reward adapter for `model`, starting from `initial`
    /// (read with `read_peft`): its LoRA factors, and its head where it has
    /// one. Whatever `initial` lacks starts fresh: PEFT's LoRA init, and
    /// the head drawn from N(0, 0.02²) as transformers initializes a new
    /// `score` (so a plain LoRA adapter, e.g. from SFT, gets a new head).
    pub fn new(
        model: &dyn CausalLm,
        settings: &LoraSettings,
        seed: u64,
        initial: Option<&PeftFile>,
    ) -> Result<Self> {
        let hidden = model.config().hidden_size;
        let lora = LoraAdapter::start(model, settings, seed, initial)?;
        let score = match initial {
            Some(f) if !f.modules.is_empty() => {
                head_of(f, hidden, Path::new("the starting adapter"))?
            }
            _ => fresh_score_head(hidden, seed)?,
        };
        let var = Var::from_tensor(&score)?;
        Ok(Self {
            lora,
            score: var.as_tensor().clone(),
            score_var: Some(var),
        })
    }

    /// A frozen reward adapter read from a PEFT folder (Skillet's or
    /// TRL's): the LoRA factors must fit `model` as for
    /// [`LoraAdapter::load`], and the folder must hold the `score` head.
    pub fn load(model: &dyn CausalLm, dir: &Path) -> Result<Self> {
        let file = read_peft(dir)?;
        let weights = dir.join("adapter_model.safetensors");
        let score = head_of(&file, model.config().hidden_size, &weights)?;
        let lora = LoraAdapter::from_file(model, dir, &file)?;
        Ok(Self {
            lora,
            score,
            score_var: None,
        })
    }

    /// Every trainable variable: the LoRA factors, then the head.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = self.lora.vars();
        v.extend(self.score_var.clone());
        v
    }

    /// Number of parameters (LoRA and head).
    pub fn parameter_count(&self) -> usize {
        self.lora.parameter_count() + self.score.elem_count()
    }

    /// Writes the adapter into `dir` (created) as PEFT writes a sequence
    /// classification adapter.
    pub fn save(&self, dir: &Path, base_model: Option<String>) -> Result<()> {
        let mut config = PeftAdapterConfig::from_settings(&self.lora.settings, base_model);
        config.task_type = Some("SEQ_CLS".into());
        config.modules_to_save = Some(serde_json::json!(["score"]));
        write_peft(dir, &config, &self.lora, &[(SCORE_WEIGHT, &self.score)])
    }
}

/// A new `score` head (`[1, hidden]`) drawn from N(0, 0.02²), as
/// transformers initializes one, seeded by `seed`.
pub fn fresh_score_head(hidden: usize, seed: u64) -> Result<Tensor> {
    let mut rng = Rng::new(seed ^ 0x5C0E_5C0E_5C0E_5C0E);
    let w: Vec<f32> = (0..hidden)
        .map(|_| (normal(&mut rng) * INIT_STD) as f32)
        .collect();
    Ok(Tensor::from_vec(w, (1, hidden), &Device::Cpu)?)
}

/// The `score` head of a read reward adapter, checked: `[1, hidden]`,
/// finite, and no other whole module beside it.
fn head_of(file: &PeftFile, hidden: usize, path: &Path) -> Result<Tensor> {
    let bad = |message: String| AdapterError::File {
        path: path.to_path_buf(),
        message,
    };
    if let Some(other) = file.modules.keys().find(|k| k.as_str() != SCORE_WEIGHT) {
        return Err(bad(format!(
            "the adapter saves '{other}' besides the score head; only LoRA and score.weight are supported"
        )));
    }
    let w = file.modules.get(SCORE_WEIGHT).ok_or_else(|| {
        bad("no score.weight: this is not a reward model (a sequence-classification adapter with one label)".into())
    })?;
    if w.dims() != [1, hidden] {
        return Err(bad(format!(
            "score.weight is {:?}; a reward head of this model is [1, {hidden}] (one label)",
            w.dims()
        )));
    }
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    if !w.abs()?.max_all()?.to_scalar::<f32>()?.is_finite() {
        return Err(bad("score.weight is not all finite".into()));
    }
    Ok(w)
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut Rng) -> f64 {
    let u = 1.0 - rng.next_f64(); // (0, 1]
    let v = rng.next_f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}
