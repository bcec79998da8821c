//! Loading a data file for a model: read and validate the JSONL, then
//! render and tokenize every example. Shared by `train`, `eval` and
//! `data check` so all three see the same tokens and masks.

use std::path::{Path, PathBuf};

use skillet_data::{DataFormat, EncodeOptions, Encoder, Example, TokenizedExample, read_jsonl};

use crate::bundle::Bundle;

/// A data file, parsed and tokenized.
pub struct Dataset {
    pub path: PathBuf,
    pub format: DataFormat,
    pub examples: Vec<(usize, Example)>,
    pub tokenized: Vec<TokenizedExample>,
}

impl Dataset {
    /// Reads and encodes `path`; every problem is reported at once.
    pub fn load(
        path: &Path,
        format: DataFormat,
        bundle: &Bundle,
        options: EncodeOptions,
    ) -> anyhow::Result<Self> {
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
