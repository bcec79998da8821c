//! The tokenizer: a Hugging Face `tokenizers` tokenizer plus the model's
//! special tokens and end-of-generation ids.

use std::path::Path;
use std::str::FromStr;

use skillet_gguf::GgufFile;

use crate::hf::{read_json, special_token_text};
use crate::{GenerationConfig, Result, TokenizerError, gguf_tokenizer_json};

/// Byte range of each token in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// A special token: id and text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SpecialToken {
    /// Token id.
    pub id: u32,
    /// Token text (`<|im_end|>`).
    pub text: String,
}

/// The model's named special tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<SpecialToken>,
    /// End of sequence (for chat models, usually end of turn).
    pub eos: Option<SpecialToken>,
    /// Padding.
    pub pad: Option<SpecialToken>,
    /// Unknown.
    pub unk: Option<SpecialToken>,
}

/// Text ↔ token ids for one model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    specials: SpecialTokens,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("specials", &self.specials)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenize(e.to_string())
}

/// Gemma's end of a turn.
const END_OF_TURN: &str = "<end_of_turn>";

impl Tokenizer {
    /// From a `tokenizer.json` document plus named special tokens.
    pub fn from_json(json: &str, specials: SpecialTokens, eos_ids: Vec<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_str(json).map_err(tok_err)?;
        Ok(Self::assemble(inner, specials, eos_ids))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        specials: SpecialTokens,
        mut eos_ids: Vec<u32>,
    ) -> Self {
        if let Some(e) = &specials.eos
            && !eos_ids.contains(&e.id)
        {
            eos_ids.insert(0, e.id);
        }
        Self {
            inner,
            specials,
            eos_ids,
        }
    }

    /// From the `tokenizer.ggml.*` metadata of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let json = gguf_tokenizer_json(file)?;
        let inner = tokenizers::Tokenizer::from_str(&json.to_string()).map_err(|e| {
            TokenizerError::Invalid {
                path: file.path().to_path_buf(),
                message: format!("cannot build tokenizer from GGUF metadata: {e}"),
            }
        })?;
        let special = |key: &str| -> Option<SpecialToken> {
            let id = u32::try_from(file.get(key)?.as_i64()?).ok()?;
            Some(SpecialToken {
                id,
                text: inner.id_to_token(id)?,
            })
        };
        let specials = SpecialTokens {
            bos: special("tokenizer.ggml.bos_token_id"),
            eos: special("tokenizer.ggml.eos_token_id"),
            pad: special("tokenizer.ggml.padding_token_id"),
            unk: special("tokenizer.ggml.unknown_token_id"),
        };
        // llama.cpp ends generation on any end-of-generation token.
        let eos_ids = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| special(k).map(|t| t.id))
        // A file that names no end-of-turn token still ends a turn on
        // Gemma's, as llama.cpp does.
        .chain(inner.token_to_id(END_OF_TURN))
        .fold(Vec::new(), |mut acc, id| {
            if !acc.contains(&id) {
                acc.push(id);
            }
            acc
        });
        Ok(Self::assemble(inner, specials, eos_ids))
    }

    /// From a Hugging Face folder: `tokenizer.json`, special tokens from
    /// `tokenizer_config.json`, stop ids from `generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Unsupported {
                path: dir.to_path_buf(),
                message: "no tokenizer.json in the folder".into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Invalid {
                path: path.clone(),
                message: format!("cannot load tokenizer: {e}"),
            })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let gen_cfg = GenerationConfig::from_dir(dir)?;
        let special = |key: &str| -> Option<SpecialToken> {
            let text = special_token_text(config.as_ref()?, key)?;
            Some(SpecialToken {
                id: inner.token_to_id(&text)?,
                text,
            })
        };
        let by_id = |id: Option<u32>| {
            id.and_then(|id| {
                Some(SpecialToken {
                    id,
                    text: inner.id_to_token(id)?,
                })
            })
        };
        let specials = SpecialTokens {
            bos: special("bos_token").or_else(|| by_id(gen_cfg.bos_token_id)),
            eos: special("eos_token").or_else(|| by_id(gen_cfg.eos_token_ids.first().copied())),
            pad: special("pad_token"),
            unk: special("unk_token"),
        };
        Ok(Self::assemble(inner, specials, gen_cfg.eos_token_ids))
    }

    /// Token ids of `text`. Special-token text (`<|im_start|>`) is always
    /// recognized; `add_special` adds what the model's post-processor adds
    /// (e.g. BOS), as `tokenizers`' `add_special_tokens` does.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Ids and token strings of `text`.
    pub fn encode_with_tokens(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<(Vec<u32>, Vec<String>)> {
        let enc = self.inner.encode(text, add_special).map_err(tok_err)?;
        Ok((enc.get_ids().to_vec(), enc.get_tokens().to_vec()))
    }

    /// Ids of `text` (no special tokens added) with each token's byte range
    /// in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The token string of one id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Named special tokens.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// Ids that end generation (EOS first).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The `tokenizer.json` document.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err)
    }
}
