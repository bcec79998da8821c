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

/// The `--adapter` option of commands that can run a model with an adapter.
#[derive(Debug, Clone, clap::Args)]
pub struct AdapterArg {
    /// A PEFT LoRA adapter folder to apply (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
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
        self.load_model_opts(LoadOptions::default())
    }

    /// Loads the weights with explicit options (e.g. keep GGUF blocks quantized).
    pub fn load_model_opts(&self, opts: LoadOptions) -> anyhow::Result<Llama> {
        let weights = self.source.weights(&self.config)?;
        Ok(Llama::load(self.config.clone(), weights.as_ref(), opts)?)
    }

    /// Loads the model with a PEFT adapter folder applied (unmerged), if given.
    pub fn load_model_with(&self, adapter: Option<&Path>) -> anyhow::Result<Llama> {
        self.load_model_with_opts(adapter, LoadOptions::default())
    }

    /// [`Self::load_model_with`] with explicit load options.
    pub fn load_model_with_opts(
        &self,
        adapter: Option<&Path>,
        opts: LoadOptions,
    ) -> anyhow::Result<Llama> {
        let mut model = self.load_model_opts(opts)?;
        if let Some(dir) = adapter {
            let (config, weights) = skillet_adapters::load_peft(dir)?;
            let settings = config
                .settings()
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            skillet_adapters::apply_lora(&mut model, &settings, 0, Some(&weights))
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        }
        Ok(model)
    }

    /// The padding id for batches (pad, else EOS, else 0; padded positions
    /// are masked, so the value only has to be a valid id).
    pub fn pad_id(&self) -> u32 {
        let s = self.tokenizer.specials();
        s.pad.as_ref().or(s.eos.as_ref()).map_or(0, |t| t.id)
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
