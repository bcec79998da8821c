//! Preference data for a model: read and validate the JSONL pairs, encode
//! them with the model's tokenizer and template, and keep each pair's
//! reference log-probabilities, which a run computes once and saves beside
//! its checkpoints so that a resume reuses them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use skillet_data::{
    EncodeOptions, Encoder, Example, PairFormat, PairPrompt, PreferencePair, TokenizedPair, Turn,
    read_pairs,
};
use skillet_train::RefLogps;

use crate::{Bundle, Result, RuntimeError};

/// A preference file, parsed and tokenized.
pub struct PairData {
    /// The file.
    pub path: PathBuf,
    /// Its shape (detected or given).
    pub format: PairFormat,
    /// Each pair with its line number.
    pub pairs: Vec<(usize, PreferencePair)>,
    /// Each pair's tokens.
    pub tokenized: Vec<TokenizedPair>,
}

impl PairData {
    /// Reads and encodes `path`; every problem is reported at once.
    pub fn load(
        path: &Path,
        format: PairFormat,
        bundle: &Bundle,
        options: EncodeOptions,
        max_prompt_len: Option<usize>,
    ) -> Result<Self> {
        let (format, pairs) = read_pairs(path, format)?;
        let encoder = Encoder::new(&bundle.tokenizer, bundle.template.as_ref(), options)
            .with_max_prompt_len(max_prompt_len);
        let tokenized = encoder.encode_pairs(path, &pairs)?;
        Ok(Self {
            path: path.to_path_buf(),
            format,
            pairs,
            tokenized,
        })
    }

    /// Keeps the pairs at `indices` (in order).
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            path: self.path.clone(),
            format: self.format,
            pairs: indices.iter().map(|&i| self.pairs[i].clone()).collect(),
            tokenized: indices.iter().map(|&i| self.tokenized[i].clone()).collect(),
        }
    }

    /// Pairs that truncation cut.
    pub fn truncated(&self) -> usize {
        self.tokenized.iter().filter(|t| t.truncated).count()
    }

    /// Each pair as an example whose answer is the chosen completion (what
    /// exact match generates against).
    pub fn chosen_examples(&self) -> Vec<(usize, Example)> {
        self.pairs
            .iter()
            .map(|(line, p)| {
                let ex = match &p.prompt {
                    PairPrompt::Text(prompt) => Example::Completion {
                        prompt: prompt.clone(),
                        completion: p.chosen.clone(),
                    },
                    PairPrompt::Chat(turns) => {
                        let mut turns = turns.clone();
                        turns.push(Turn {
                            role: "assistant".into(),
                            content: p.chosen.clone(),
                            train: true,
                        });
                        Example::Chat(turns)
                    }
                };
                (*line, ex)
            })
            .collect()
    }
}

/// The file's form: f32 values.
#[derive(Deserialize)]
struct Stored {
    train: Vec<(f32, f32)>,
    valid: Vec<(f32, f32)>,
}

/// Reference log-probabilities of a run's training and held-out pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceLogps {
    /// Training pairs, in data order.
    pub train: Vec<RefLogps>,
    /// Held-out pairs, in data order.
    pub valid: Vec<RefLogps>,
}

impl ReferenceLogps {
    const FILE: &str = "reference_logps.json";

    /// Writes them into the run folder `out`. The values were summed in
    /// f32 and are written as f32, whose shortest decimal form reads back
    /// to the same bits, so a resume sees exactly what the run saw.
    pub fn save(&self, out: &Path) -> Result<()> {
        let path = out.join(Self::FILE);
        let f32s = |v: &[RefLogps]| -> Vec<(f32, f32)> {
            v.iter().map(|&(c, r)| (c as f32, r as f32)).collect()
        };
        let json = serde_json::json!({"train": f32s(&self.train), "valid": f32s(&self.valid)});
        std::fs::write(&path, json.to_string()).map_err(RuntimeError::io(path))
    }

    /// Reads them back, checking they cover `train` and `valid` pairs.
    pub fn load(out: &Path, train: usize, valid: usize) -> Result<Self> {
        let path = out.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(RuntimeError::io(&path))?;
        let stored: Stored = serde_json::from_str(&text)?;
        let f64s = |v: Vec<(f32, f32)>| -> Vec<RefLogps> {
            v.into_iter().map(|(c, r)| (c as f64, r as f64)).collect()
        };
        let r = Self {
            train: f64s(stored.train),
            valid: f64s(stored.valid),
        };
        if (r.train.len(), r.valid.len()) != (train, valid) {
            return Err(RuntimeError::Invalid(format!(
                "{}: reference log-probabilities for {} + {} pairs, but the data has {train} + {valid}; \
                 was the data changed since the run started?",
                path.display(),
                r.train.len(),
                r.valid.len()
            )));
        }
        Ok(r)
    }
}
