//! The other direction of `gguf.rs`: GGUF tokenizer metadata
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`) for a byte-level BPE
//! tokenizer read from a Hugging Face `tokenizer.json`, so a model that
//! came as a folder can be exported as one GGUF file. The pre-tokenizer is
//! named by llama.cpp's `tokenizer.ggml.pre` table, matched from its
//! structure; one llama.cpp does not know is refused, never guessed.

use serde_json::Value as Json;
use skillet_gguf::Value;

use crate::gguf::{pre_tokenizer, pre_tokenizer_names};
use crate::{Result, Tokenizer, TokenizerError};

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

fn unsupported(message: String) -> TokenizerError {
    TokenizerError::Unsupported {
        path: "tokenizer.json".into(),
        message,
    }
}

/// The `tokenizer.*` GGUF entries of `tok` (a byte-level BPE, as GPT-2,
/// SmolLM, Llama 3 and Qwen use), with `template` as its chat template.
pub fn gguf_tokenizer_metadata(
    tok: &Tokenizer,
    template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let doc: Json = serde_json::from_str(&tok.to_json()?)
        .map_err(|e| unsupported(format!("cannot read the tokenizer back: {e}")))?;
    let model = &doc["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == Json::Bool(true) {
        return Err(unsupported(
            "GGUF export writes byte-level BPE tokenizers only; this one is SentencePiece-style \
             (export it from its GGUF file instead)"
                .into(),
        ));
    }
    let pre = pre_tokenizer_names()
        .iter()
        .find(|name| pre_tokenizer(name).as_ref() == Some(&doc["pre_tokenizer"]))
        .ok_or_else(|| {
            unsupported(format!(
                "llama.cpp has no pre-tokenizer matching {}",
                doc["pre_tokenizer"]
            ))
        })?;

    let size = tok.vocab_size();
    let mut tokens = vec![String::new(); size];
    let mut types = vec![TYPE_NORMAL; size];
    let vocab = model["vocab"].as_object().cloned().unwrap_or_default();
    let mut place = |text: &str, id: &Json, ty: i32| -> Result<()> {
        let id = id
            .as_u64()
            .filter(|&i| (i as usize) < size)
            .ok_or_else(|| unsupported(format!("token {text:?} has id {id}")))?;
        tokens[id as usize] = text.to_string();
        types[id as usize] = ty;
        Ok(())
    };
    for (text, id) in &vocab {
        place(text, id, TYPE_NORMAL)?;
    }
    for added in doc["added_tokens"].as_array().into_iter().flatten() {
        let text = added["content"].as_str().unwrap_or_default();
        let ty = match added["special"].as_bool() {
            Some(true) => TYPE_CONTROL,
            _ => TYPE_USER_DEFINED,
        };
        place(text, &added["id"], ty)?;
    }
    if let Some(unk) = &tok.specials().unk {
        types[unk.id as usize] = TYPE_UNKNOWN;
    }
    // Ids no entry names (a padded vocabulary) get a placeholder, as
    // llama.cpp's converter writes them.
    for (id, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{id}]");
            types[id] = TYPE_USER_DEFINED;
        }
    }
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match (pair.first(), pair.get(1)) {
                (Some(Json::String(a)), Some(Json::String(b))) => Ok(format!("{a} {b}")),
                _ => Err(unsupported(format!("merge {m} is not two strings"))),
            },
            other => Err(unsupported(format!("merge {other} is not a pair"))),
        })
        .collect::<Result<Vec<_>>>()?;

    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String((*pre).into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), strings(merges)),
    ];
    let specials = tok.specials();
    for (key, t) in [
        ("bos", &specials.bos),
        ("eos", &specials.eos),
        ("padding", &specials.pad),
        ("unknown", &specials.unk),
    ] {
        if let Some(t) = t {
            out.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(t.id)));
        }
    }
    // Whether the tokenizer puts BOS first, as its post-processor says.
    let adds_bos = match &specials.bos {
        Some(bos) => tok.encode("a", true)?.first() == Some(&bos.id),
        None => false,
    };
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(out)
}
