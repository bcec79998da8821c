//! Option groups shared by several commands.

use std::path::PathBuf;

/// The `--model` option shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArg {
    /// A .gguf file or a Hugging Face folder (config.json, safetensors, tokenizer.json).
    #[arg(long, short = 'm', env = "SKILLET_MODEL")]
    pub model: PathBuf,
}

/// The `--adapter` option of commands that can run a model with an adapter.
#[derive(Debug, Clone, clap::Args)]
pub struct AdapterArg {
    /// A PEFT LoRA adapter folder to apply (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}
