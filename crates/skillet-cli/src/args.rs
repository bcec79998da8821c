//! Option groups shared by several commands.

use std::path::PathBuf;

use skillet_runtime::AdapterSpec;
use skillet_train::PrecisionSetting;

/// The `--model` option shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArg {
    /// A .gguf file or a Hugging Face folder (config.json, safetensors, tokenizer.json).
    #[arg(long, short = 'm', env = "SKILLET_MODEL")]
    pub model: PathBuf,
}

/// How quantized weights take their inputs in batched decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivationsArg {
    /// int8 where the CPU has AMX, AVX512-VNNI or AVX2 (faster there), else
    /// f32.
    Auto,
    /// f32: the dequantized model's numbers.
    F32,
    /// Rounded as llama.cpp rounds them for each weight type: 8 bits per
    /// block of 32 (Q4_0, Q4_1, Q5_x, Q8_0) or of 256 (K-quants) (slow
    /// without AMX, AVX512-VNNI or AVX2).
    Int8,
}

impl ActivationsArg {
    /// The setting this choice means on this CPU.
    pub fn resolve(self) -> skillet_models::Activations {
        match self {
            ActivationsArg::Auto => skillet_models::Activations::for_batches(),
            ActivationsArg::F32 => skillet_models::Activations::F32,
            ActivationsArg::Int8 => skillet_models::Activations::Int8,
        }
    }
}

/// The precision of the frozen weights' products in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// bf16 where the CPU multiplies it natively (AMX tiles, or AVX512-BF16), else f32.
    Auto,
    /// Everything in f32.
    F32,
    /// bf16 products with f32 accumulation (PyTorch autocast's semantics).
    Bf16,
}

impl PrecisionArg {
    /// The setting this choice means on this CPU (as `train.precision`).
    pub fn resolve(self) -> skillet_models::Precision {
        match self {
            PrecisionArg::Auto => PrecisionSetting::Auto,
            PrecisionArg::F32 => PrecisionSetting::F32,
            PrecisionArg::Bf16 => PrecisionSetting::Bf16,
        }
        .resolve()
    }

    /// The value as typed on the command line.
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }
}

/// The `--adapter` option of commands that can run a model with adapters.
#[derive(Debug, Clone, clap::Args)]
pub struct AdapterArg {
    /// A PEFT LoRA adapter folder to apply (adapter_config.json +
    /// adapter_model.safetensors), optionally with a weight on its update
    /// (`DIR:0.5`). Repeat to use several at once: their updates are summed,
    /// each times its weight.
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    pub adapters: Vec<AdapterSpec>,
}
