//! LoRA settings: the validated form Skillet uses, and the serde mirror of
//! PEFT's `adapter_config.json`.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{AdapterError, Result};

/// Which linear layers get an adapter.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Module names, matched as PEFT does: the whole name, or its last
    /// dotted segments (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(Regex),
    /// Every linear layer except the output head (PEFT's `all-linear`).
    AllLinear,
}

impl Targets {
    /// Whether module `name` is a target.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Targets::Names(list) => list
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Targets::Regex(re) => re
                .find(name)
                .is_some_and(|m| m.start() == 0 && m.end() == name.len()),
            Targets::AllLinear => name != "lm_head",
        }
    }

    /// The targets as `adapter_config.json` stores them.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Targets::Names(list) => serde_json::json!(list),
            Targets::Regex(re) => serde_json::json!(re.as_str()),
            Targets::AllLinear => serde_json::json!("all-linear"),
        }
    }

    /// From `adapter_config.json`'s `target_modules` (list, regex string or
    /// `"all-linear"`).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        match v {
            serde_json::Value::String(s) if s == "all-linear" => Ok(Targets::AllLinear),
            serde_json::Value::String(s) => Regex::new(s)
                .map(Targets::Regex)
                .map_err(|e| AdapterError::Settings(format!("target_modules regex {s:?}: {e}"))),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_string).ok_or_else(|| {
                        AdapterError::Settings("target_modules list must hold strings".into())
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Targets::Names),
            other => Err(AdapterError::Settings(format!(
                "target_modules must be a list or a string, got {other}"
            ))),
        }
    }
}

/// Validated LoRA hyper-parameters.
#[derive(Debug, Clone)]
pub struct LoraSettings {
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// rsLoRA: scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    /// DoRA (Liu et al. 2024, arXiv 2402.09353): a trained magnitude per
    /// output row times the direction of `W + scale·B·A`. Off unless set
    /// after [`LoraSettings::new`].
    pub use_dora: bool,
    /// Which modules.
    pub targets: Targets,
}

impl LoraSettings {
    /// Checks the ranges.
    pub fn new(
        r: usize,
        alpha: f64,
        dropout: f32,
        use_rslora: bool,
        targets: Targets,
    ) -> Result<Self> {
        if r == 0 {
            return Err(AdapterError::Settings("r must be at least 1".into()));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(AdapterError::Settings(format!(
                "lora_alpha must be positive, got {alpha}"
            )));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(AdapterError::Settings(format!(
                "lora_dropout must be in [0, 1), got {dropout}"
            )));
        }
        Ok(Self {
            r,
            alpha,
            dropout,
            use_rslora,
            use_dora: false,
            targets,
        })
    }

    /// The factor applied to `B·A`: alpha/r, or alpha/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// `adapter_config.json` as PEFT writes it. Unknown keys are ignored when
/// reading (newer PEFT versions add some).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftAdapterConfig {
    /// Always "LORA" here.
    pub peft_type: String,
    /// "CAUSAL_LM".
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f32,
    /// List, regex string or "all-linear".
    pub target_modules: serde_json::Value,
    /// Bias handling; only "none" is supported.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Weights stored transposed (Conv1D models); must be false.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a magnitude vector per module (`lora_magnitude_vector`).
    #[serde(default)]
    pub use_dora: bool,
    /// Whole modules trained and saved besides LoRA (a reward model's
    /// `score`; their weights are in the file, see `read_peft`).
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    /// How the adapter was initialized.
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
    /// Restricts to some layer indices (not supported yet).
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Per-module ranks (not supported yet).
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alphas (not supported yet).
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    /// Saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// PEFT version that wrote the file.
    #[serde(default)]
    pub peft_version: Option<String>,
}

fn bias_none() -> String {
    "none".into()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

impl PeftAdapterConfig {
    /// The config PEFT would write for `s`.
    pub fn from_settings(s: &LoraSettings, base_model: Option<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base_model,
            r: s.r,
            lora_alpha: s.alpha,
            lora_dropout: s.dropout,
            target_modules: s.targets.to_json(),
            bias: "none".into(),
            fan_in_fan_out: false,
            use_rslora: s.use_rslora,
            use_dora: s.use_dora,
            modules_to_save: None,
            init_lora_weights: init_true(),
            layers_to_transform: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            inference_mode: true,
            peft_version: None,
        }
    }

    /// Validated settings, refusing features Skillet does not implement yet
    /// rather than silently ignoring them.
    pub fn settings(&self) -> Result<LoraSettings> {
        let unsupported = |what: &str| {
            Err(AdapterError::Settings(format!(
                "{what} is not supported yet"
            )))
        };
        if self.peft_type != "LORA" {
            return unsupported(&format!("peft_type {:?}", self.peft_type));
        }
        if self.bias != "none" {
            return unsupported(&format!("bias {:?}", self.bias));
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out");
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|l| !l.is_null())
        {
            return unsupported("layers_to_transform");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return unsupported("rank_pattern/alpha_pattern");
        }
        let mut s = LoraSettings::new(
            self.r,
            self.lora_alpha,
            self.lora_dropout,
            self.use_rslora,
            Targets::from_json(&self.target_modules)?,
        )?;
        s.use_dora = self.use_dora;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_like_peft() {
        let names = Targets::Names(vec!["q_proj".into(), "self_attn.v_proj".into()]);
        assert!(names.matches("model.layers.3.self_attn.q_proj"));
        assert!(names.matches("model.layers.3.self_attn.v_proj"));
        assert!(!names.matches("model.layers.3.self_attn.k_proj"));
        assert!(!names.matches("model.layers.3.self_attn.xq_proj"));
        let re = Targets::from_json(&serde_json::json!(r".*\.(q|v)_proj")).unwrap();
        assert!(re.matches("model.layers.0.self_attn.q_proj"));
        assert!(!re.matches("model.layers.0.self_attn.q_proj.extra"));
        assert!(Targets::AllLinear.matches("model.layers.0.mlp.up_proj"));
        assert!(!Targets::AllLinear.matches("lm_head"));
    }

    #[test]
    fn scale_and_validation() {
        let s = LoraSettings::new(16, 32.0, 0.0, false, Targets::AllLinear).unwrap();
        assert_eq!(s.scale(), 2.0);
        let s = LoraSettings::new(16, 32.0, 0.0, true, Targets::AllLinear).unwrap();
        assert_eq!(s.scale(), 8.0);
        assert!(LoraSettings::new(0, 8.0, 0.0, false, Targets::AllLinear).is_err());
        assert!(LoraSettings::new(8, 8.0, 1.0, false, Targets::AllLinear).is_err());
    }

    #[test]
    fn reads_peft_configs_with_unknown_keys_and_dora() {
        let text = r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"lora_dropout":0.05,
            "target_modules":["q_proj","v_proj"],"bias":"none","use_rslora":false,"use_dora":false,
            "some_future_key":{"x":1},"modules_to_save":null,"layers_to_transform":null,
            "rank_pattern":{},"alpha_pattern":{},"peft_version":"0.21.0"}"#;
        let cfg: PeftAdapterConfig = serde_json::from_str(text).unwrap();
        let s = cfg.settings().unwrap();
        assert_eq!((s.r, s.alpha, s.dropout), (8, 16.0, 0.05));
        assert!(!s.use_dora);
        let mut dora = cfg.clone();
        dora.use_dora = true;
        assert!(dora.settings().unwrap().use_dora);
        let back = PeftAdapterConfig::from_settings(&dora.settings().unwrap(), None);
        assert!(back.use_dora);
    }
}
