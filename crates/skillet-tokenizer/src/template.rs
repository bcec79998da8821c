//! Chat templates: the model's Jinja template rendered with minijinja in
//! transformers' configuration (`trim_blocks`, `lstrip_blocks`, Python
//! string methods, `raise_exception`, `strftime_now`). The one path every
//! caller (generation now, training and serving later) renders through.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};
use skillet_gguf::GgufFile;

use crate::hf::{chat_template, read_json};
use crate::{Result, SpecialTokens, TokenizerError};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (templates may accept others).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .finish()
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Gemma's chat format, for GGUF files that carry no template.
pub const GEMMA_TEMPLATE: &str = include_str!("../templates/gemma.jinja");

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: &str, specials: &SpecialTokens) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: String| crate::strftime::now(&fmt));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TokenizerError::Template(format!("cannot compile: {e:#}")))?;
        let text = |t: &Option<crate::SpecialToken>| {
            t.as_ref().map(|t| t.text.clone()).unwrap_or_default()
        };
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: text(&specials.bos),
            eos_token: text(&specials.eos),
        })
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), if any;
    /// a Gemma file without one gets Gemma's turn format
    /// (`templates/gemma.jinja`), as llama.cpp falls back to it.
    pub fn from_gguf(file: &GgufFile, specials: &SpecialTokens) -> Result<Option<Self>> {
        let arch = file.get("general.architecture").and_then(|v| v.as_str());
        match file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => Ok(Some(Self::new(src, specials)?)),
            None if arch.is_some_and(|a| a.starts_with("gemma")) => {
                Ok(Some(Self::new(GEMMA_TEMPLATE, specials)?))
            }
            None => Ok(None),
        }
    }

    /// The template of a Hugging Face folder, if any.
    pub fn from_hf_dir(dir: &Path, specials: &SpecialTokens) -> Result<Option<Self>> {
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        match chat_template(dir, config.as_ref())? {
            Some(src) => Ok(Some(Self::new(&src, specials)?)),
            None => Ok(None),
        }
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `add_generation_prompt` appends the opening of an
    /// assistant turn, as transformers' `apply_chat_template` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| TokenizerError::Template(format!("cannot render: {e:#}")))
    }

    /// The prompt tokens of a conversation: rendered with the generation
    /// prompt and tokenized without adding special tokens (the template
    /// holds every one it wants, so there is no double BOS). Generation,
    /// evaluation and serving all render prompts here; training renders
    /// the same template through its span masks.
    pub fn prompt_ids(
        &self,
        tokenizer: &crate::Tokenizer,
        messages: &[Message],
    ) -> Result<Vec<u32>> {
        tokenizer.encode(&self.render(messages, true)?, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpecialToken;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_like_transformers() {
        let t = ChatTemplate::new(CHATML, &SpecialTokens::default()).unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[Message::new("system", "S"), Message::new("user", "Hi")],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn hf_helpers_work() {
        let specials = SpecialTokens {
            bos: Some(SpecialToken {
                id: 1,
                text: "<s>".into(),
            }),
            eos: Some(SpecialToken {
                id: 2,
                text: "</s>".into(),
            }),
            ..Default::default()
        };
        // trim_blocks/lstrip_blocks, Python string methods, bos/eos, raise_exception.
        let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n    [{{ m.role.upper() }}] {{ m.content.strip() }}{{ eos_token }}\n{% endfor %}";
        let t = ChatTemplate::new(src, &specials).unwrap();
        let out = t.render(&[Message::new("user", "  hi  ")], false).unwrap();
        // What jinja2 (trim_blocks, lstrip_blocks) renders for this source.
        assert_eq!(out, "<s>\n    [USER] hi</s>\n");
        let err = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad role tool"), "{err}");
        assert!(ChatTemplate::new("{% for %}", &specials).is_err());
    }
}
