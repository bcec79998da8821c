//! Builds a Hugging Face `tokenizer.json` document from GGUF tokenizer
//! metadata (`tokenizer.ggml.*`), so the `tokenizers` crate runs it and the
//! same document can be written into an exported folder.
//!
//! Pre-tokenizers follow llama.cpp's `tokenizer.ggml.pre` table
//! (`llama-vocab.cpp`), expressed with the Hugging Face components that
//! give the same splits.

use serde_json::{Value, json};
use skillet_gguf::GgufFile;

use crate::{Result, TokenizerError, spm};

const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// One name per distinct pre-tokenizer below (what an export writes).
pub(crate) fn pre_tokenizer_names() -> &'static [&'static str] {
    &["gpt2", "smollm", "llama-bpe", "qwen2"]
}

/// The pre-tokenizer for llama.cpp's pre-tokenizer name, or `None` when we
/// do not know it.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<Value> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => byte_level(true),
        // "\p{N}" split first, then GPT-2's regex: digits one by one.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
            })
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => json!({
            "type": "Sequence",
            "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)],
        }),
        "qwen2" | "deepseek-r1-qwen" => json!({
            "type": "Sequence",
            "pretokenizers": [split(QWEN2_REGEX), byte_level(false)],
        }),
        _ => return None,
    })
}

fn special_id(file: &GgufFile, key: &str) -> Option<u32> {
    file.get(key)
        .and_then(|v| v.as_i64())
        .and_then(|v| u32::try_from(v).ok())
}

/// The `tokenizer.json` document for the tokenizer stored in `file`.
pub fn gguf_tokenizer_json(file: &GgufFile) -> Result<Value> {
    let path = file.path();
    let unsupported = |message: String| TokenizerError::Unsupported {
        path: path.to_path_buf(),
        message,
    };
    let model = file.get_str("tokenizer.ggml.model")?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        _ => {
            return Err(unsupported(format!(
                "GGUF tokenizer model '{model}' is not supported (supported: gpt2 byte-level \
                 BPE, llama SentencePiece BPE); use a Hugging Face folder with tokenizer.json \
                 for this model"
            )));
        }
    };
    let pre_name = match file.get("tokenizer.ggml.pre") {
        Some(v) => v.as_str().unwrap_or("default"),
        None => "default",
    };
    let pre = match spm {
        true => Value::Null,
        false => pre_tokenizer(pre_name).ok_or_else(|| {
            unsupported(format!("GGUF pre-tokenizer '{pre_name}' is not supported"))
        })?,
    };
    let stored = file.get_str_array("tokenizer.ggml.tokens")?;
    let tokens: Vec<String> = match spm {
        true => stored.iter().map(|t| spm::respell(t)).collect(),
        false => stored.iter().map(|t| t.to_string()).collect(),
    };
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let types = match file.get("tokenizer.ggml.token_type") {
        Some(_) => file.get_i64_array("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(unsupported(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let merges: Vec<Value> = match file.get("tokenizer.ggml.merges") {
        // SentencePiece files carry none: they follow from the vocabulary.
        None if spm => spm::merges(&tokens)
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect(),
        _ => file
            .get_str_array("tokenizer.ggml.merges")?
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(unsupported(format!(
                    "merge '{m}' is not two tokens separated by a space"
                ))),
            })
            .collect::<Result<_>>()?,
    };

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    let mut unk = None;
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert((*tok).to_string(), json!(id));
        match *ty {
            TYPE_CONTROL | TYPE_USER_DEFINED => added.push(json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *ty == TYPE_CONTROL,
            })),
            TYPE_UNKNOWN => unk = Some(*tok),
            _ => {}
        }
    }

    let token_of =
        |key: &str| special_id(file, key).and_then(|id| tokens.get(id as usize).map(|t| (id, *t)));
    let flag = |key: &str| {
        file.get(key)
            .map(|v| matches!(v, skillet_gguf::Value::Bool(true)))
    };
    let mut single = Vec::new();
    let mut specials = serde_json::Map::new();
    let mut add_special = |key: &str, flag_key: &str, at_start: bool, single: &mut Vec<Value>| {
        if flag(flag_key) == Some(true)
            && let Some((id, tok)) = token_of(key)
        {
            let item = json!({"SpecialToken": {"id": tok, "type_id": 0}});
            if at_start {
                single.insert(0, item)
            } else {
                single.push(item)
            }
            specials.insert(
                tok.to_string(),
                json!({"id": tok, "ids": [id], "tokens": [tok]}),
            );
        }
    };
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    add_special(
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.add_bos_token",
        true,
        &mut single,
    );
    add_special(
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_eos_token",
        false,
        &mut single,
    );
    let mut pair = single.clone();
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));

    let (normalizer, decoder) = match spm {
        true => spm::normalizer_and_decoder(flag("tokenizer.ggml.add_space_prefix") == Some(true)),
        false => (
            Value::Null,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        ),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": spm,
            "byte_fallback": spm,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}
