//! Opening a model path: a `.gguf` file or a Hugging Face folder, resolved
//! into its config and weight source. Tokenizer and template loading use
//! the same [`ModelSource`] so every part reads one model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use skillet_gguf::GgufFile;

use crate::{
    GgufWeights, LoadOptions, Model, ModelConfig, ModelError, Result, SafetensorsWeights,
    WeightSource,
};

/// Where a model lives.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A single GGUF file (weights, tokenizer and template inside).
    Gguf(Arc<GgufFile>),
    /// A Hugging Face folder (`config.json`, safetensors, tokenizer files).
    HfFolder(PathBuf),
}

impl ModelSource {
    /// Opens `path`, deciding by what it is: a folder with `config.json`, or
    /// a file (read as GGUF whatever its extension, so a wrong file gets
    /// GGUF's "not a GGUF file" message rather than a guess).
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(ModelError::NotAModel {
                    path: path.to_path_buf(),
                });
            }
            return Ok(Self::HfFolder(path.to_path_buf()));
        }
        Ok(Self::Gguf(Arc::new(GgufFile::open(path)?)))
    }

    /// The path given to [`ModelSource::open`].
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(f) => f.path(),
            Self::HfFolder(d) => d,
        }
    }

    /// `"gguf"` or `"hf"`.
    pub fn format_name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => "gguf",
            Self::HfFolder(_) => "hf",
        }
    }

    /// The validated model config.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Gguf(f) => ModelConfig::from_gguf(f),
            Self::HfFolder(d) => ModelConfig::from_hf_file(&d.join("config.json")),
        }
    }

    /// The weights, addressed by Hugging Face names.
    pub fn weights(&self, cfg: &ModelConfig) -> Result<Box<dyn WeightSource>> {
        Ok(match self {
            Self::Gguf(f) => Box::new(GgufWeights::new(f.clone(), cfg)),
            Self::HfFolder(d) => Box::new(SafetensorsWeights::open(d)?),
        })
    }

    /// Config and model in one go.
    pub fn load_model(&self, opts: LoadOptions) -> Result<Model> {
        let cfg = self.config()?;
        let weights = self.weights(&cfg)?;
        Model::load(cfg, weights.as_ref(), opts)
    }
}
