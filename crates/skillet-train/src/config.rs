//! The run configuration: one TOML file with everything (model, data,
//! LoRA, optimizer, schedule, cadence, seed, output), `--set key=value`
//! overrides on top, saved resolved beside the results.
//!
//! ```toml
//! model = "path/to/model.gguf"
//! output_dir = "runs/my-run"
//! seed = 42
//! [data]
//! train = "train.jsonl"
//! validation = "valid.jsonl"      # or validation_fraction = 0.1
//! [lora]
//! r = 8
//! alpha = 16
//! targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
//! [train]
//! epochs = 2
//! lr = 1e-3
//! [method]                        # optional; "sft" by default
//! type = "dpo"
//! beta = 0.1
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Freeze, Result, ScheduleKind, TrainError};

/// The whole run, as the user writes it (every field has a default but
/// `model` and `data.train`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// A .gguf file or a Hugging Face folder.
    pub model: PathBuf,
    /// Where adapter, checkpoints, metrics and report go.
    #[serde(default = "default_output")]
    pub output_dir: PathBuf,
    /// Seed of initialization, data order, split and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Data settings.
    pub data: DataConfig,
    /// Adapter settings.
    #[serde(default)]
    pub lora: LoraConfig,
    /// Optimization settings.
    #[serde(default)]
    pub train: TrainConfig,
    /// Evaluation settings.
    #[serde(default)]
    pub eval: EvalConfig,
    /// The training method and its own options.
    #[serde(default)]
    pub method: MethodConfig,
}

/// `[method]`: what the run optimizes. Data, adapter, optimizer, schedule,
/// checkpoints and evaluation cadence are shared by every method.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum MethodConfig {
    /// Supervised fine-tuning on examples (the default).
    #[default]
    Sft,
    /// Direct preference optimization on preference pairs.
    Dpo(DpoConfig),
    /// A reward model (LoRA plus a scalar head) from preference pairs.
    Reward(RewardConfig),
    /// RL from rewards (GRPO) on prompts.
    Grpo(GrpoConfig),
}

impl MethodConfig {
    /// The method's name as configured.
    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Sft => "sft",
            MethodConfig::Dpo(_) => "dpo",
            MethodConfig::Reward(_) => "reward",
            MethodConfig::Grpo(_) => "grpo",
        }
    }

    /// `(format, max_prompt_length)` where the method trains on pairs.
    pub fn pairs(&self) -> Option<(skillet_data::PairFormat, Option<usize>)> {
        match self {
            MethodConfig::Sft | MethodConfig::Grpo(_) => None,
            MethodConfig::Dpo(d) => Some((d.format, d.max_prompt_length)),
            MethodConfig::Reward(r) => Some((r.format, r.max_prompt_length)),
        }
    }
}

/// `[method] type = "grpo"`, with TRL's names and defaults (except
/// `max_completion_length`, 256 rather than 512, for CPUs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    /// Completions sampled per prompt (G).
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    /// Longest completion in tokens.
    #[serde(default = "default_completion_length")]
    pub max_completion_length: usize,
    /// Sampling temperature.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Nucleus sampling (1: off).
    #[serde(default = "one")]
    pub top_p: f64,
    /// Weight of the KL to the reference (0: no reference pass).
    #[serde(default)]
    pub beta: f64,
    /// Lower clipping bound `1 − epsilon`.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Upper clipping bound `1 + epsilon_high` (default: `epsilon`).
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// Optimizer steps on each set of samples.
    #[serde(default = "one_u64")]
    pub num_iterations: u64,
    /// `dapo`, `grpo` or `dr_grpo`.
    #[serde(default)]
    pub loss_type: crate::GrpoLoss,
    /// `group`, `batch` or `none`.
    #[serde(default)]
    pub scale_rewards: crate::ScaleRewards,
    /// Multiply the KL term by the probability ratio (TRL's default).
    #[serde(default = "yes")]
    pub use_bias_correction_kl: bool,
    /// How the quantized base takes its inputs while sampling: `f32` (the
    /// numbers training multiplies) or `int8` (rounded per block of 32,
    /// as llama.cpp does: faster on CPUs with AMX, within about 1% per
    /// product, so the sampling policy is slightly off the trained one, as
    /// with a separate inference engine).
    #[serde(default)]
    pub sampling_activations: SamplingActivations,
    /// The reward functions, summed with their weights.
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
}

/// `method.sampling_activations` for GRPO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplingActivations {
    /// Exactly as the dequantized weights multiply them.
    #[default]
    F32,
    /// Rounded to 8 bits per block of 32.
    Int8,
}

fn default_generations() -> usize {
    8
}
fn default_completion_length() -> usize {
    256
}
fn one() -> f64 {
    1.0
}
fn one_u64() -> u64 {
    1
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_answer_field() -> String {
    "answer".into()
}
fn default_timeout() -> f64 {
    60.0
}

impl GrpoConfig {
    /// The loss settings.
    pub fn settings(&self) -> crate::GrpoSettings {
        crate::GrpoSettings {
            loss: self.loss_type,
            beta: self.beta,
            epsilon: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            num_generations: self.num_generations,
            max_completion_length: self.max_completion_length,
            temperature: self.temperature,
            scale_rewards: self.scale_rewards,
            num_iterations: self.num_iterations,
            bias_correction_kl: self.use_bias_correction_kl,
        }
    }
}

/// One reward function of `[[method.rewards]]` (GRPO), with its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// 1 when the completion, trimmed, equals the line's `field`, trimmed.
    ExactMatch {
        /// The field of the prompt's line holding the answer.
        #[serde(default = "default_answer_field")]
        field: String,
        /// Weight in the sum.
        #[serde(default = "one")]
        weight: f64,
    },
    /// 1 when the regular expression matches somewhere in the completion
    /// (anchor it with `^…$` to require the whole).
    Regex {
        /// The expression (Rust `regex` syntax).
        pattern: String,
        /// Weight in the sum.
        #[serde(default = "one")]
        weight: f64,
    },
    /// 1 when the completion, trimmed, parses as JSON.
    JsonValid {
        /// Weight in the sum.
        #[serde(default = "one")]
        weight: f64,
    },
    /// 1 when the completion contains `text`, or the line's `field`.
    Contains {
        /// Fixed text.
        #[serde(default)]
        text: Option<String>,
        /// Or a field of the prompt's line.
        #[serde(default)]
        field: Option<String>,
        /// Weight in the sum.
        #[serde(default = "one")]
        weight: f64,
    },
    /// 0 up to `max_tokens` completion tokens, then −(length − max)/max.
    LengthPenalty {
        /// Tokens allowed without penalty.
        max_tokens: usize,
        /// Weight in the sum.
        #[serde(default = "one")]
        weight: f64,
    },
    /// A reward model: a Skillet (or TRL) reward adapter on the same base
    /// model (`adapter`), or a whole reward model folder from full
    /// fine-tuning (`model`); one of the two.
    RewardModel {
        /// The adapter's folder.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        adapter: Option<PathBuf>,
        /// The whole model's folder.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<PathBuf>,
        /// Weight in the sum.
        #[serde(default = "one")]
        weight: f64,
    },
    /// A long-running program: reads one JSON line per completion
    /// (`prompt`, `completion` and the line's other fields) on stdin and
    /// writes one number per line on stdout.
    Program {
        /// The command and its arguments.
        command: Vec<String>,
        /// Seconds to wait for each answer.
        #[serde(default = "default_timeout")]
        timeout_s: f64,
        /// Weight in the sum.
        #[serde(default = "one")]
        weight: f64,
    },
}

impl RewardSpec {
    /// The weight in the sum.
    pub fn weight(&self) -> f64 {
        match self {
            Self::ExactMatch { weight, .. }
            | Self::Regex { weight, .. }
            | Self::JsonValid { weight }
            | Self::Contains { weight, .. }
            | Self::LengthPenalty { weight, .. }
            | Self::RewardModel { weight, .. }
            | Self::Program { weight, .. } => *weight,
        }
    }

    /// The kind's name (`exact_match`, `program`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ExactMatch { .. } => "exact_match",
            Self::Regex { .. } => "regex",
            Self::JsonValid { .. } => "json_valid",
            Self::Contains { .. } => "contains",
            Self::LengthPenalty { .. } => "length_penalty",
            Self::RewardModel { .. } => "reward_model",
            Self::Program { .. } => "program",
        }
    }
}

/// `[method] type = "reward"`, with TRL's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Weight of `(r_chosen + r_rejected)²`, pulling rewards toward a
    /// zero mean (TRL: unset).
    #[serde(default)]
    pub center_rewards_coefficient: Option<f64>,
    /// Cut prompts to their first this many tokens (then each side to
    /// `data.max_seq_len`).
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    /// `auto`, `standard`, `conversational` or `openai`.
    #[serde(default = "default_pair_format")]
    pub format: skillet_data::PairFormat,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            center_rewards_coefficient: None,
            max_prompt_length: None,
            format: default_pair_format(),
        }
    }
}

impl RewardConfig {
    /// The loss settings.
    pub fn settings(&self) -> crate::RewardSettings {
        crate::RewardSettings {
            center_rewards_coefficient: self.center_rewards_coefficient,
        }
    }
}

/// `[method] type = "dpo"`, with TRL's names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Strength of the pull toward the reference model.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `sigmoid`, `hinge`, `ipo` or `robust`.
    #[serde(default)]
    pub loss_type: crate::DpoLoss,
    /// `robust` only: the probability that a pair's labels are flipped.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Cut prompts to their first this many tokens (then each side to
    /// `data.max_seq_len`).
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    /// `auto`, `standard`, `conversational` or `openai`.
    #[serde(default = "default_pair_format")]
    pub format: skillet_data::PairFormat,
}

impl DpoConfig {
    /// The loss settings.
    pub fn settings(&self) -> crate::DpoSettings {
        crate::DpoSettings {
            loss: self.loss_type,
            beta: self.beta,
            label_smoothing: self.label_smoothing,
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training JSONL.
    pub train: PathBuf,
    /// Held-out JSONL (else a fraction of the training file).
    #[serde(default)]
    pub validation: Option<PathBuf>,
    /// Fraction of the training file held out when there is no validation file.
    #[serde(default = "default_fraction")]
    pub validation_fraction: f64,
    /// `auto`, `chat`, `sharegpt`, `alpaca`, `completion` or `text`.
    #[serde(default = "default_format")]
    pub format: skillet_data::DataFormat,
    /// Longest sequence in tokens (longer examples keep their first tokens).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Train on prompts too, not only on completions.
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Append EOS to text and prompt/completion examples.
    #[serde(default = "yes")]
    pub add_eos: bool,
    /// Pack several examples per sequence (no attention across them).
    #[serde(default)]
    pub packing: bool,
}

/// `[lora]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub dropout: f32,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row of each adapted module
    /// (PEFT's `use_dora`).
    #[serde(default)]
    pub use_dora: bool,
    /// Module names (list), a regex (string) or "all-linear".
    #[serde(default = "default_targets")]
    pub targets: toml::Value,
    /// Start from this PEFT adapter instead of the default init.
    #[serde(default)]
    pub init_adapter: Option<PathBuf>,
    /// QLoRA on GGUF: keep the base's quantized blocks in memory and
    /// dequantize them inside each frozen matmul (forward and input
    /// gradient) instead of dequantizing the whole model once at load.
    #[serde(default)]
    pub keep_base_quantized: bool,
    /// QLoRA on a dense base (a Hugging Face folder, or an f32/f16/bf16
    /// GGUF): quantize the decoder layers' projections at load, as
    /// bitsandbytes does for `BitsAndBytesConfig(load_in_4bit=True)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize_base: Option<QuantizeBase>,
    /// With `quantize_base`: quantize the absmax values too (bitsandbytes'
    /// `bnb_4bit_use_double_quant`; on by default, as in the QLoRA paper's
    /// recipe and Axolotl's).
    #[serde(default = "default_true")]
    pub double_quant: bool,
}

/// `lora.quantize_base`: the format a dense base is quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizeBase {
    /// bitsandbytes' 4-bit NormalFloat, absmax per 64 weights.
    Nf4,
}

/// `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the data.
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    /// Optimizer steps instead of epochs (0 = use epochs).
    #[serde(default)]
    pub max_steps: u64,
    /// Examples per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// `constant`, `linear` or `cosine`.
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    /// Linear warmup steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// AdamW beta2.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW epsilon.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the gradient norm (0 = off).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Recompute each layer's activations in backward instead of keeping
    /// them: less memory, about a third more compute.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// `auto`, `f32` or `bf16`: the precision of the weights' products
    /// (bf16 with f32 accumulation, as PyTorch's autocast; the master copy
    /// of every trained parameter, optimizer state, norms and loss stay
    /// f32). `auto` picks bf16 where the CPU multiplies bf16 natively (AMX
    /// tiles, or AVX512-BF16's dot products), for LoRA; full
    /// fine-tuning takes bf16 only by name. In bf16 a dense frozen base is
    /// held in bf16 (half the bytes), and evaluation multiplies it in bf16
    /// too.
    #[serde(default)]
    pub precision: PrecisionSetting,
    /// `lora` (an adapter over the frozen base, `[lora]`) or `full` (every
    /// weight of the model trained, saved as a Hugging Face folder).
    #[serde(default)]
    pub tuning: Tuning,
    /// Full fine-tuning: keep the input embeddings (`model.embed_tokens`,
    /// and a head tied to them) frozen.
    #[serde(default)]
    pub freeze_embeddings: bool,
    /// Full fine-tuning: the weights left frozen, as regular expressions
    /// searched in their checkpoint names (`^model\.layers\.[0-9]\.` for
    /// the first ten layers, `lm_head`, `self_attn`). Each must match some
    /// weight.
    #[serde(default)]
    pub freeze: Vec<String>,
}

impl TrainConfig {
    /// The weights full fine-tuning leaves frozen.
    pub fn frozen(&self) -> Result<Freeze> {
        Freeze::new(self.freeze_embeddings, &self.freeze)
    }
}

/// `train.tuning`: what a run trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tuning {
    /// A LoRA adapter over the frozen base.
    #[default]
    Lora,
    /// Every weight (embeddings, norms, projections; a tied head with its
    /// embedding).
    Full,
}

/// `train.precision`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    /// bf16 where the CPU multiplies it natively and faster, else f32.
    #[default]
    Auto,
    /// Everything in f32.
    F32,
    /// The base weights' products in bf16.
    Bf16,
}

impl PrecisionSetting {
    /// What the setting means on this CPU.
    pub fn resolve(self) -> skillet_models::Precision {
        match self {
            PrecisionSetting::Auto => skillet_models::Precision::fastest(),
            PrecisionSetting::F32 => skillet_models::Precision::F32,
            PrecisionSetting::Bf16 => skillet_models::Precision::Bf16,
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Validate every N steps (0 = only at the end).
    #[serde(default)]
    pub every: u64,
    /// Checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub save_every: u64,
    /// Checkpoint at the end of every epoch instead (as OpenAI's jobs do).
    #[serde(default)]
    pub save_each_epoch: bool,
    /// Batch size for evaluation.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Generate answers for the held-out set before and after (exact match).
    #[serde(default = "yes")]
    pub generate: bool,
    /// Longest generated answer.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// General text for the forgetting check (perplexity before and after).
    #[serde(default)]
    pub general: Option<PathBuf>,
}

fn default_beta() -> f64 {
    0.1
}
fn default_pair_format() -> skillet_data::PairFormat {
    skillet_data::PairFormat::Auto
}
fn default_output() -> PathBuf {
    PathBuf::from("runs/skillet")
}
fn default_seed() -> u64 {
    42
}
fn default_fraction() -> f64 {
    0.1
}
fn default_format() -> skillet_data::DataFormat {
    skillet_data::DataFormat::Auto
}
fn default_max_seq_len() -> usize {
    1024
}
fn yes() -> bool {
    true
}
fn default_true() -> bool {
    true
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> toml::Value {
    toml::Value::Array(
        ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .map(|s| toml::Value::String((*s).into()))
            .collect(),
    )
}
fn default_epochs() -> u64 {
    1
}
fn default_batch() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_lr() -> f64 {
    2e-4
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_eval_batch() -> usize {
    8
}
fn default_new_tokens() -> usize {
    64
}

impl Default for LoraConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}
impl Default for TrainConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}
impl Default for EvalConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// Parses a `--set` value as TOML (number, bool, list, quoted string),
/// else takes it as a bare string.
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

impl RunConfig {
    /// Reads `path` and applies `overrides` (`section.key=value`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, overrides)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Parses TOML text and applies overrides.
    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| TrainError::Invalid(e.to_string()))?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| TrainError::Invalid(format!("--set {o:?}: expected key=value")))?;
            let parts: Vec<&str> = key.trim().split('.').collect();
            let mut t = &mut table;
            for p in &parts[..parts.len() - 1] {
                let entry = t
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                t = entry.as_table_mut().ok_or_else(|| {
                    TrainError::Invalid(format!("--set {key}: '{p}' is not a section"))
                })?;
            }
            t.insert(
                parts[parts.len() - 1].to_string(),
                parse_value(value.trim()),
            );
        }
        let cfg: RunConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Invalid(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.train.batch_size == 0 || self.train.grad_accum == 0 || self.eval.batch_size == 0 {
            return bad("batch_size and grad_accum must be at least 1".into());
        }
        if self.train.epochs == 0 && self.train.max_steps == 0 {
            return bad("set train.epochs or train.max_steps".into());
        }
        if !(self.train.lr.is_finite() && self.train.lr > 0.0) {
            return bad(format!("train.lr must be positive, got {}", self.train.lr));
        }
        if !(0.0..1.0).contains(&self.data.validation_fraction) {
            return bad(format!(
                "data.validation_fraction must be in [0, 1), got {}",
                self.data.validation_fraction
            ));
        }
        if self.data.max_seq_len < 2 {
            return bad("data.max_seq_len must be at least 2".into());
        }
        if self.eval.save_each_epoch && self.eval.save_every > 0 {
            return bad("set eval.save_every or eval.save_each_epoch, not both".into());
        }
        if let MethodConfig::Dpo(d) = &self.method {
            if !(d.beta.is_finite() && d.beta > 0.0) {
                return bad(format!("method.beta must be positive, got {}", d.beta));
            }
            if !(0.0..0.5).contains(&d.label_smoothing) {
                return bad(format!(
                    "method.label_smoothing must be in [0, 0.5), got {}",
                    d.label_smoothing
                ));
            }
            if d.label_smoothing != 0.0 && d.loss_type != crate::DpoLoss::Robust {
                return bad("method.label_smoothing applies to loss_type = \"robust\" only".into());
            }
        }
        if let MethodConfig::Reward(r) = &self.method
            && let Some(c) = r.center_rewards_coefficient
            && !(c.is_finite() && c >= 0.0)
        {
            return bad(format!(
                "method.center_rewards_coefficient must be at least 0, got {c}"
            ));
        }
        if let MethodConfig::Grpo(g) = &self.method {
            self.check_grpo(g)?;
        }
        if self.lora.quantize_base.is_some() && self.lora.keep_base_quantized {
            return bad("lora.quantize_base quantizes a dense base; lora.keep_base_quantized keeps a GGUF base's own blocks: set one".into());
        }
        if self.train.tuning == Tuning::Full {
            if self.lora.keep_base_quantized {
                return bad("lora.keep_base_quantized applies to LoRA; full fine-tuning trains dequantized weights".into());
            }
            if self.lora.use_dora {
                return bad(
                    "lora.use_dora applies to LoRA; full fine-tuning trains the weights themselves"
                        .into(),
                );
            }
            if self.lora.quantize_base.is_some() {
                return bad("lora.quantize_base applies to LoRA (QLoRA); full fine-tuning trains every weight in f32".into());
            }
            if self.lora.init_adapter.is_some() {
                return bad("lora.init_adapter applies to LoRA; for full fine-tuning start from a merged model (skillet merge) as `model`".into());
            }
            self.train.frozen()?;
        } else if self.train.freeze_embeddings || !self.train.freeze.is_empty() {
            return bad("train.freeze and train.freeze_embeddings apply to full fine-tuning (train.tuning = \"full\"); LoRA leaves the base frozen and trains lora.target_modules".into());
        }
        if let Some((_, max_prompt)) = self.method.pairs() {
            if self.data.packing {
                return bad("data.packing applies to SFT only".into());
            }
            if max_prompt == Some(0) {
                return bad("method.max_prompt_length must be at least 1".into());
            }
        }
        Ok(())
    }

    fn check_grpo(&self, g: &GrpoConfig) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if g.num_generations < 2 {
            return bad(format!(
                "method.num_generations must be at least 2 (advantages compare completions of one prompt), got {}",
                g.num_generations
            ));
        }
        if !self.train.batch_size.is_multiple_of(g.num_generations) {
            return bad(format!(
                "train.batch_size counts completions for GRPO and must be a multiple of method.num_generations ({}), got {}",
                g.num_generations, self.train.batch_size
            ));
        }
        if g.max_completion_length == 0 || g.max_completion_length >= self.data.max_seq_len {
            return bad(format!(
                "method.max_completion_length must be at least 1 and below data.max_seq_len ({}), got {}",
                self.data.max_seq_len, g.max_completion_length
            ));
        }
        if !(g.temperature.is_finite() && g.temperature > 0.0) {
            return bad(format!(
                "method.temperature must be positive, got {}",
                g.temperature
            ));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return bad(format!("method.top_p must be in (0, 1], got {}", g.top_p));
        }
        if !(g.beta.is_finite() && g.beta >= 0.0) {
            return bad(format!("method.beta must be at least 0, got {}", g.beta));
        }
        for (name, e) in [
            ("epsilon", Some(g.epsilon)),
            ("epsilon_high", g.epsilon_high),
        ] {
            if let Some(e) = e
                && !(e.is_finite() && e > 0.0)
            {
                return bad(format!("method.{name} must be positive, got {e}"));
            }
        }
        if g.epsilon >= 1.0 {
            return bad(format!("method.epsilon must be below 1, got {}", g.epsilon));
        }
        let k = g.num_iterations;
        if k == 0 {
            return bad("method.num_iterations must be at least 1".into());
        }
        if !self.eval.save_every.is_multiple_of(k) || !self.train.max_steps.is_multiple_of(k) {
            return bad(format!(
                "eval.save_every and train.max_steps must be multiples of method.num_iterations ({k}): \
                 checkpoints fall between sets of samples"
            ));
        }
        if self.data.packing {
            return bad("data.packing applies to SFT only".into());
        }
        if g.rewards.is_empty() {
            return bad("GRPO needs at least one [[method.rewards]]".into());
        }
        for r in &g.rewards {
            if !r.weight().is_finite() {
                return bad(format!("a {} reward has weight {}", r.kind(), r.weight()));
            }
            match r {
                RewardSpec::Contains { text, field, .. } if text.is_some() == field.is_some() => {
                    return bad("a contains reward needs exactly one of text and field".into());
                }
                RewardSpec::Program {
                    command, timeout_s, ..
                } if command.is_empty() || timeout_s.is_nan() || *timeout_s <= 0.0 => {
                    return bad("a program reward needs a command and a positive timeout_s".into());
                }
                RewardSpec::LengthPenalty { max_tokens: 0, .. } => {
                    return bad("a length_penalty reward needs max_tokens of at least 1".into());
                }
                RewardSpec::RewardModel { adapter, model, .. }
                    if adapter.is_some() == model.is_some() =>
                {
                    return bad("a reward_model reward needs exactly one of adapter (on the same base) and model (a whole reward model folder)".into());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The resolved config as TOML (saved in the output folder).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// The LoRA targets.
    pub fn targets(&self) -> Result<skillet_adapters::Targets> {
        let json = serde_json::to_value(&self.lora.targets)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        Ok(skillet_adapters::Targets::from_json(&json)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_errors() {
        let text = "model = \"m.gguf\"\n[data]\ntrain = \"t.jsonl\"\n[train]\nlr = 1e-3\n";
        let c = RunConfig::from_toml(text, &[]).unwrap();
        assert_eq!((c.lora.r, c.train.epochs, c.train.lr), (8, 1, 1e-3));
        let c = RunConfig::from_toml(
            text,
            &[
                "train.lr=5e-4".into(),
                "lora.targets=\"all-linear\"".into(),
                "output_dir=runs/x".into(),
                "data.packing=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 5e-4);
        assert!(matches!(
            c.targets().unwrap(),
            skillet_adapters::Targets::AllLinear
        ));
        assert_eq!(c.output_dir, PathBuf::from("runs/x"));
        assert!(c.data.packing);
        let again = RunConfig::from_toml(&c.to_toml(), &[]).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
        let e = RunConfig::from_toml(text, &["train.lr=0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.lr"), "{e}");
        let e = RunConfig::from_toml(
            text,
            &[
                "eval.save_each_epoch=true".into(),
                "eval.save_every=5".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("save_each_epoch"), "{e}");
        let e = RunConfig::from_toml(&format!("{text}typo = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("typo"), "{e}");
    }

    #[test]
    fn the_method_section_selects_and_checks_dpo_and_reward() {
        let text = "model = \"m.gguf\"\n[data]\ntrain = \"t.jsonl\"\n";
        assert_eq!(
            RunConfig::from_toml(text, &[]).unwrap().method,
            MethodConfig::Sft
        );
        let c = RunConfig::from_toml(
            &format!("{text}[method]\ntype = \"dpo\"\nloss_type = \"ipo\"\n"),
            &["method.beta=0.5".into()],
        )
        .unwrap();
        let MethodConfig::Dpo(d) = &c.method else {
            panic!("{:?}", c.method)
        };
        assert_eq!((d.beta, d.loss_type), (0.5, crate::DpoLoss::Ipo));
        assert_eq!(
            RunConfig::from_toml(&c.to_toml(), &[]).unwrap().method,
            c.method
        );
        let e = RunConfig::from_toml(
            text,
            &[
                "method.type=\"dpo\"".into(),
                "method.label_smoothing=0.1".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("robust"), "{e}");
        let c = RunConfig::from_toml(
            &format!("{text}[method]\ntype = \"reward\"\ncenter_rewards_coefficient = 0.01\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.method,
            MethodConfig::Reward(RewardConfig {
                center_rewards_coefficient: Some(0.01),
                ..Default::default()
            })
        );
        assert_eq!(
            RunConfig::from_toml(&c.to_toml(), &[]).unwrap().method,
            c.method
        );
        let e = RunConfig::from_toml(
            text,
            &[
                "method.type=\"reward\"".into(),
                "method.center_rewards_coefficient=-1".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("center_rewards_coefficient"), "{e}");
        let e = RunConfig::from_toml(text, &["method.type=\"dpo\"".into(), "method.bta=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bta"), "{e}");
    }

    #[test]
    fn full_tuning_and_whole_reward_models_are_checked() {
        let text = "model = \"m.gguf\"\n[data]\ntrain = \"t.jsonl\"\n";
        let full = || "train.tuning=\"full\"".to_string();
        let c = RunConfig::from_toml(text, &[full()]).unwrap();
        assert_eq!(c.train.tuning, Tuning::Full);
        assert_eq!(
            RunConfig::from_toml(&c.to_toml(), &[])
                .unwrap()
                .train
                .tuning,
            Tuning::Full
        );
        for (set, word) in [
            ("lora.keep_base_quantized=true", "keep_base_quantized"),
            ("lora.init_adapter=\"a\"", "init_adapter"),
            ("lora.quantize_base=\"nf4\"", "quantize_base"),
        ] {
            let e = RunConfig::from_toml(text, &[full(), set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{e}");
        }
        let grpo = format!(
            "{text}[train]\nbatch_size = 8\n[method]\ntype = \"grpo\"\n[[method.rewards]]\ntype = \"reward_model\"\n"
        );
        for (extra, ok) in [
            ("adapter = \"a\"\n", true),
            ("model = \"m\"\n", true),
            ("", false),
            ("adapter = \"a\"\nmodel = \"m\"\n", false),
        ] {
            let r = RunConfig::from_toml(&format!("{grpo}{extra}"), &[]);
            assert_eq!(r.is_ok(), ok, "{extra}: {r:?}");
        }
    }
}
