//! Everything a front end needs from a model path: the model source, its
//! config, tokenizer and chat template, loaded the same way for GGUF files
//! and Hugging Face folders; then its weights and adapters on demand.

use std::path::Path;
use std::sync::Arc;

use skillet_models::{Adapter, LoadOptions, Model, ModelConfig, ModelSource};
use skillet_tokenizer::{ChatTemplate, Message, Tokenizer};

use crate::{AdapterSpec, Result, RuntimeError, load_adapters};

/// A model's metadata, tokenizer and template (weights loaded on demand).
pub struct Bundle {
    /// Where the model comes from.
    pub source: ModelSource,
    /// Its validated config.
    pub config: ModelConfig,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if it has one.
    pub template: Option<ChatTemplate>,
}

impl Bundle {
    /// Opens `path` and reads config, tokenizer and chat template.
    pub fn open(path: &Path) -> Result<Self> {
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
    pub fn load_model(&self, opts: LoadOptions) -> Result<Model> {
        let weights = self.source.weights(&self.config)?;
        Ok(Model::load(self.config.clone(), weights.as_ref(), opts)?)
    }

    /// Loads the weights, and the adapters of `adapters` as one (none, one,
    /// or their weighted sum; see [`load_adapters`]), to pass with each
    /// call, e.g. through `skillet_models::Adapted`.
    pub fn load_with_adapters(
        &self,
        opts: LoadOptions,
        adapters: &[AdapterSpec],
    ) -> Result<(Model, Option<Arc<dyn Adapter>>)> {
        let model = self.load_model(opts)?;
        let adapter = load_adapters(&model, adapters)?;
        Ok((model, adapter))
    }

    /// The padding id for batches (pad, else EOS, else 0; padded positions
    /// are masked, so the value only has to be a valid id).
    pub fn pad_id(&self) -> u32 {
        let s = self.tokenizer.specials();
        s.pad.as_ref().or(s.eos.as_ref()).map_or(0, |t| t.id)
    }

    /// The chat template, or an error saying the model has none.
    pub fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "{}: the model has no chat template",
                self.source.path().display()
            ))
        })
    }

    /// The prompt tokens of a conversation: rendered with the model's chat
    /// template and its generation prompt, tokenized without adding special
    /// tokens (the template holds every one it wants, so no double BOS).
    /// The one rendering path of generate, eval, train and serve.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        Ok(self.template()?.prompt_ids(&self.tokenizer, messages)?)
    }

    /// The prompt tokens of raw text, with what the tokenizer adds (BOS),
    /// as `tokenizer(text)` does.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, true)?)
    }
}
