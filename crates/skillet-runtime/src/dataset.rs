//! Loading a data file for a model: read and validate the JSONL, then
//! render and tokenize every example. Shared by training, evaluation and
//! `data check`, so all see the same tokens and masks.

use std::path::{Path, PathBuf};

use skillet_data::{DataFormat, EncodeOptions, Encoder, Example, TokenizedExample, read_jsonl};

use crate::{Bundle, Result};

/// A data file, parsed and tokenized.
pub struct Dataset {
    /// The file.
    pub path: PathBuf,
    /// Its format (detected or given).
    pub format: DataFormat,
    /// Each example with its line number.
    pub examples: Vec<(usize, Example)>,
    /// Each example's tokens and loss mask.
    pub tokenized: Vec<TokenizedExample>,
}

impl Dataset {
    /// Reads and encodes `path`; every problem is reported at once.
    pub fn load(
        path: &Path,
        format: DataFormat,
        bundle: &Bundle,
        options: EncodeOptions,
    ) -> Result<Self> {
        let (format, examples) = read_jsonl(path, format)?;
        let encoder = Encoder::new(&bundle.tokenizer, bundle.template.as_ref(), options);
        let tokenized = encoder.encode_all(path, &examples)?;
        Ok(Self {
            path: path.to_path_buf(),
            format,
            examples,
            tokenized,
        })
    }

    /// Keeps the examples at `indices` (in order).
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            path: self.path.clone(),
            format: self.format,
            examples: indices.iter().map(|&i| self.examples[i].clone()).collect(),
            tokenized: indices.iter().map(|&i| self.tokenized[i].clone()).collect(),
        }
    }

    /// Examples longer than the maximum length.
    pub fn truncated(&self) -> usize {
        self.tokenized.iter().filter(|t| t.truncated()).count()
    }
}
