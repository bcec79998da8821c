//! Reading the tokenizer-related files of a Hugging Face folder:
//! `tokenizer_config.json` (special tokens, older chat templates),
//! `chat_template.jinja` / `chat_template.json`, `generation_config.json`.

use std::path::Path;

use serde_json::Value;

use crate::{Result, TokenizerError};

pub(crate) fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })
}

/// A special token named in `tokenizer_config.json`: a string, or an
/// AddedToken object with `content`.
pub(crate) fn special_token_text(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template of a folder, in transformers' order of preference:
/// `chat_template.jinja`, `chat_template.json`, then `tokenizer_config.json`
/// (a string, or a list of named templates of which "default" is used).
pub(crate) fn chat_template(
    dir: &Path,
    tokenizer_config: Option<&Value>,
) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| TokenizerError::Io {
                path: jinja,
                source,
            });
    }
    if let Some(v) = read_json(&dir.join("chat_template.json"))?
        && let Some(t) = v.get("chat_template").and_then(Value::as_str)
    {
        return Ok(Some(t.to_string()));
    }
    Ok(
        match tokenizer_config.and_then(|c| c.get("chat_template")) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        },
    )
}

/// Generation defaults a model ships (`generation_config.json`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// BOS id, if given.
    pub bos_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` of `dir` (absent file → empty).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let Some(v) = read_json(&dir.join("generation_config.json"))? else {
            return Ok(Self::default());
        };
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        Ok(Self {
            eos_token_ids: ids(v.get("eos_token_id")),
            bos_token_id: ids(v.get("bos_token_id")).first().copied(),
        })
    }
}
