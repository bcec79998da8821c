//! Everything a command needs from a model path: the model source, its
//! config, tokenizer and chat template, loaded the same way for GGUF files
//! and Hugging Face folders.

use std::path::{Path, PathBuf};

use skillet_models::{Llama, LlamaConfig, LoadOptions, ModelSource};
use skillet_tokenizer::{ChatTemplate, Tokenizer};

/// The `--model` option shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArg {
    /// A .gguf file or a Hugging Face folder (config.json, safetensors, tokenizer.json).
    #[arg(long, short = 'm', env = "SKILLET_MODEL")]
    pub model: PathBuf,
}

/// A model's metadata, tokenizer and template (weights loaded on demand).
pub struct Bundle {
    pub source: ModelSource,
    pub config: LlamaConfig,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

impl Bundle {
    /// Opens `path` and reads config, tokenizer and chat template.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let source = ModelSource::open(path)?;
        let config = source.config()?;
        let (tokenizer, template) = match &source {
            ModelSource::Gguf(f) => {
                let tok = Tokenizer::from_gguf(f)?;
                let tmpl = ChatTemplate::from_gguf(f, tok.specials())?;
                (tok, tmpl)
            }
            ModelSource::HfFolder(dir) => {
                let tok = Tokenizer::from_hf_dir(dir)?;
                let tmpl = ChatTemplate::from_hf_dir(dir, tok.specials())?;
                (tok, tmpl)
            }
        };
        Ok(Self {
            source,
            config,
            tokenizer,
            template,
        })
    }

    /// Loads the weights into a model.
    pub fn load_model(&self) -> anyhow::Result<Llama> {
        let weights = self.source.weights(&self.config)?;
        Ok(Llama::load(
            self.config.clone(),
            weights.as_ref(),
            LoadOptions::default(),
        )?)
    }

    /// The chat template, or an error saying the model has none.
    pub fn template(&self) -> anyhow::Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the model has no chat template",
                self.source.path().display()
            )
        })
    }
}
