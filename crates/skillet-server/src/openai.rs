//! OpenAI's request shapes (chat and text completions) as serde types, and
//! their validation into engine requests. Unknown fields are ignored, as
//! OpenAI-compatible servers do; known ones are checked and a bad one is
//! named in the error's `param`.

use serde::Deserialize;
use serde_json::Value;
use skillet_runtime::SamplingOptions;
use skillet_tokenizer::Message;

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// Options both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// The base model's id or an adapter's name.
    pub model: String,
    /// Most new tokens (older name).
    pub max_tokens: Option<u64>,
    /// Most new tokens.
    pub max_completion_tokens: Option<u64>,
    /// 0 to 2; 0 is greedy. Default 1 (OpenAI's).
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (an extension many servers accept).
    pub top_k: Option<i64>,
    /// Sampler seed.
    pub seed: Option<i64>,
    /// Stop strings (at most 4).
    pub stop: Option<Stop>,
    /// -2 to 2.
    pub frequency_penalty: Option<f32>,
    /// -2 to 2.
    pub presence_penalty: Option<f32>,
    /// A CTRL-style penalty (extension).
    pub repetition_penalty: Option<f32>,
    /// Choices to generate.
    pub n: Option<i64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence tokens (extension, as vLLM and
    /// llama.cpp's server accept; benchmarks use it for fixed lengths).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Return log-probabilities of the chosen tokens.
    #[serde(default)]
    pub logprobs: bool,
    /// And this many alternatives (0 to 20).
    pub top_logprobs: Option<i64>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// system, developer, user or assistant.
    pub role: String,
    /// Text, or a list of content parts.
    pub content: Option<Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt: a string (or a list holding one string).
    pub prompt: Value,
    /// Log-probabilities of this many alternatives (0 to 5; OpenAI's legacy form).
    pub logprobs: Option<i64>,
    /// Echo the prompt (not supported).
    #[serde(default)]
    pub echo: bool,
    /// Text after the completion (not supported).
    pub suffix: Option<String>,
}

/// A JSON body as one object (an empty body, bad JSON or another kind of
/// value is a 400).
pub fn body_object(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("The body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("The body must be a JSON object"));
    }
    Ok(v)
}

/// Reads `T` out of a JSON object, naming the field at fault when a value
/// has the wrong type or a required one is missing.
pub fn fields<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let missing = inner.to_string();
        if let Some(field) = missing
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            ApiError::param(field, format!("`{field}` is required"))
        } else if path.is_empty() || path == "." {
            ApiError::invalid(format!("Invalid request: {inner}"))
        } else {
            ApiError::param(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })
}

impl ChatMessage {
    /// The message as the chat template takes it. Text parts are joined;
    /// other content types (images, audio) and roles the model has no place
    /// for (tool, function) are refused.
    pub fn to_message(&self, index: usize) -> Result<Message, ApiError> {
        let role = match self.role.as_str() {
            "system" | "user" | "assistant" => self.role.clone(),
            // OpenAI's newer name for the system role.
            "developer" => "system".to_string(),
            other => {
                return Err(ApiError::param(
                    format!("messages[{index}].role"),
                    format!(
                        "Unsupported role `{other}` (use system, developer, user or assistant)"
                    ),
                ));
            }
        };
        let param = format!("messages[{index}].content");
        let content = match &self.content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (k, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::param(
                                format!("{param}[{k}]"),
                                format!(
                                    "Unsupported content part type {} (only `text` parts are supported)",
                                    kind.map_or("(none)".to_string(), |k| format!("`{k}`"))
                                ),
                            ));
                        }
                    }
                }
                text
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            _ => {
                return Err(ApiError::param(
                    param,
                    "Content must be a string or a list of text parts",
                ));
            }
        };
        Ok(Message::new(role, content))
    }
}

/// Settings derived from [`Common`] and checked.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Most new tokens, if the request gave it.
    pub max_tokens: Option<usize>,
    /// Sampling options (not yet resolved per choice).
    pub sampling: SamplingOptions,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices.
    pub n: usize,
}

impl Common {
    /// Checks every shared field against its range.
    pub fn check(&self, max_n: usize) -> Result<Checked, ApiError> {
        if self.model.is_empty() {
            return Err(ApiError::param("model", "`model` is required"));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            _ => None,
        };
        if let Some((p, 0)) = max_tokens {
            return Err(ApiError::param(p, format!("`{p}` must be at least 1")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::param("stop", "At most 4 stop sequences"));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::param("stop", "Stop sequences must not be empty"));
        }
        let n = self.n.unwrap_or(1);
        if n < 1 || n as usize > max_n {
            return Err(ApiError::param(
                "n",
                format!("`n` must be between 1 and {max_n}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::param(
                    "top_k",
                    format!("`top_k` must be >= -1, got {k}"),
                ));
            }
        };
        let sampling = SamplingOptions {
            temperature: Some(self.temperature.unwrap_or(1.0)),
            top_p: self.top_p,
            top_k,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed.map(|s| s as u64),
        };
        // Check the ranges now, so a bad value is a 400 before any work.
        sampling.resolve(0)?;
        Ok(Checked {
            max_tokens: max_tokens.map(|(_, v)| v as usize),
            sampling,
            stop,
            n: n as usize,
        })
    }
}
