//! JSONL formats, auto-detected per file, all read into [`Example`]:
//! OpenAI chat `{"messages":[{"role","content","weight"?}]}`, ShareGPT
//! `{"conversations":[{"from","value"}]}`, alpaca
//! `{"instruction","input"?,"output"}`, `{"prompt","completion"}` and
//! `{"text"}`. Every problem of every line is collected before returning.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lines::{Parsed, read_objects};
use crate::{DataError, IssueCode};

/// The layout of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Decide from the first example.
    Auto,
    /// OpenAI chat `messages`.
    Chat,
    /// ShareGPT `conversations`.
    ShareGpt,
    /// Alpaca `instruction` / `input` / `output`.
    Alpaca,
    /// `prompt` / `completion`.
    Completion,
    /// Raw `text` (continued pre-training).
    Text,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Turn {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
    /// Whether this (assistant) turn is trained on; `weight: 0` turns it off.
    pub train: bool,
}

/// One training example, whatever its file format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// A conversation rendered through the chat template.
    Chat(Vec<Turn>),
    /// A prompt and the completion to learn.
    Completion {
        /// Context, not trained on by default.
        prompt: String,
        /// The target text.
        completion: String,
    },
    /// Raw text, every token trained.
    Text(String),
}

type LineResult = Parsed<Example>;

fn detect(obj: &Map<String, Value>) -> Option<DataFormat> {
    if obj.contains_key("messages") {
        Some(DataFormat::Chat)
    } else if obj.contains_key("conversations") {
        Some(DataFormat::ShareGpt)
    } else if obj.contains_key("instruction") {
        Some(DataFormat::Alpaca)
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        Some(DataFormat::Completion)
    } else if obj.contains_key("text") {
        Some(DataFormat::Text)
    } else {
        None
    }
}

pub(crate) fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    required: bool,
    issues: &mut Vec<(IssueCode, String)>,
) -> Option<String> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() || !required => Some(s.clone()),
        Some(Value::String(_)) => {
            issues.push((IssueCode::MissingField, format!("'{key}' is empty")));
            None
        }
        None | Some(Value::Null) if !required => Some(String::new()),
        None => {
            issues.push((IssueCode::MissingField, format!("missing '{key}'")));
            None
        }
        Some(other) => {
            issues.push((
                IssueCode::MissingField,
                format!("'{key}' must be a string, got {}", type_name(other)),
            ));
            None
        }
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Checks turns common to chat and ShareGPT: an assistant turn exists.
fn finish_chat(turns: Vec<Turn>, mut issues: Vec<(IssueCode, String)>) -> LineResult {
    if issues.is_empty() && !turns.iter().any(|t| t.role == "assistant") {
        issues.push((
            IssueCode::ExampleMissingAssistantMessage,
            "the conversation has no assistant message".into(),
        ));
    }
    if issues.is_empty() {
        Ok(Example::Chat(turns))
    } else {
        Err(issues)
    }
}

fn parse_chat(obj: &Map<String, Value>) -> LineResult {
    let Some(Value::Array(messages)) = obj.get("messages") else {
        return Err(vec![(
            IssueCode::MissingMessagesList,
            "missing 'messages' list".into(),
        )]);
    };
    let mut issues = Vec::new();
    let turns = parse_messages(messages, "message", &mut issues);
    finish_chat(turns, issues)
}

/// OpenAI-style messages (`role`, `content`, optional `weight` and
/// `name`), each problem pushed to `issues`; `what` names them in messages
/// (`message 2`, `chosen message 0`).
pub(crate) fn parse_messages(
    messages: &[Value],
    what: &str,
    issues: &mut Vec<(IssueCode, String)>,
) -> Vec<Turn> {
    let mut turns = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            issues.push((IssueCode::DataType, format!("{what} {i} is not an object")));
            continue;
        };
        for key in m.keys() {
            if !matches!(key.as_str(), "role" | "content" | "weight" | "name") {
                issues.push((
                    IssueCode::MessageUnrecognizedKey,
                    format!("{what} {i} has unrecognized key '{key}'"),
                ));
            }
        }
        let role = match m.get("role") {
            None => {
                issues.push((
                    IssueCode::MessageMissingKey,
                    format!("{what} {i} has no 'role'"),
                ));
                continue;
            }
            Some(Value::String(r)) if matches!(r.as_str(), "system" | "user" | "assistant") => {
                r.clone()
            }
            Some(other) => {
                issues.push((
                    IssueCode::UnrecognizedRole,
                    format!("{what} {i} has role {other} (expected system, user or assistant)"),
                ));
                continue;
            }
        };
        let content = match m.get("content") {
            None => {
                issues.push((
                    IssueCode::MessageMissingKey,
                    format!("{what} {i} has no 'content'"),
                ));
                continue;
            }
            Some(Value::String(c)) if !c.is_empty() => c.clone(),
            Some(_) => {
                issues.push((
                    IssueCode::MissingContent,
                    format!("{what} {i} ({role}) has empty or non-text content"),
                ));
                continue;
            }
        };
        let train = match m.get("weight") {
            None => role == "assistant",
            Some(w) if role != "assistant" => {
                issues.push((
                    IssueCode::InvalidWeight,
                    format!(
                        "{what} {i} ({role}) has weight {w}; only assistant messages take a weight"
                    ),
                ));
                false
            }
            Some(w) => match w.as_i64() {
                Some(0) => false,
                Some(1) => true,
                _ => {
                    issues.push((
                        IssueCode::InvalidWeight,
                        format!("{what} {i} has weight {w} (expected 0 or 1)"),
                    ));
                    false
                }
            },
        };
        turns.push(Turn {
            role,
            content,
            train,
        });
    }
    turns
}

fn parse_sharegpt(obj: &Map<String, Value>) -> LineResult {
    let Some(Value::Array(conv)) = obj.get("conversations") else {
        return Err(vec![(
            IssueCode::MissingMessagesList,
            "missing 'conversations' list".into(),
        )]);
    };
    let mut issues = Vec::new();
    let mut turns = Vec::new();
    for (i, m) in conv.iter().enumerate() {
        let Value::Object(m) = m else {
            issues.push((IssueCode::DataType, format!("turn {i} is not an object")));
            continue;
        };
        let (Some(from), Some(value)) = (m.get("from"), m.get("value")) else {
            issues.push((
                IssueCode::MessageMissingKey,
                format!("turn {i} needs 'from' and 'value'"),
            ));
            continue;
        };
        let role = match from.as_str() {
            Some("human" | "user") => "user",
            Some("gpt" | "assistant") => "assistant",
            Some("system") => "system",
            _ => {
                issues.push((
                    IssueCode::UnrecognizedRole,
                    format!("turn {i} is from {from} (expected human, gpt or system)"),
                ));
                continue;
            }
        };
        match value.as_str() {
            Some(v) if !v.is_empty() => turns.push(Turn {
                role: role.into(),
                content: v.into(),
                train: role == "assistant",
            }),
            _ => issues.push((
                IssueCode::MissingContent,
                format!("turn {i} ({role}) has empty or non-text value"),
            )),
        }
    }
    finish_chat(turns, issues)
}

fn parse_alpaca(obj: &Map<String, Value>) -> LineResult {
    let mut issues = Vec::new();
    let instruction = string_field(obj, "instruction", true, &mut issues);
    let input = string_field(obj, "input", false, &mut issues);
    let output = string_field(obj, "output", true, &mut issues);
    match (instruction, input, output) {
        (Some(ins), Some(inp), Some(out)) if issues.is_empty() => {
            // Alpaca becomes a two-turn chat so it goes through the model's
            // own template, like every conversation.
            let user = if inp.is_empty() {
                ins
            } else {
                format!("{ins}\n\n{inp}")
            };
            Ok(Example::Chat(vec![
                Turn {
                    role: "user".into(),
                    content: user,
                    train: false,
                },
                Turn {
                    role: "assistant".into(),
                    content: out,
                    train: true,
                },
            ]))
        }
        _ => Err(issues),
    }
}

fn parse_completion(obj: &Map<String, Value>) -> LineResult {
    let mut issues = Vec::new();
    let prompt = string_field(obj, "prompt", false, &mut issues);
    let completion = string_field(obj, "completion", true, &mut issues);
    match (prompt, completion) {
        (Some(prompt), Some(completion)) if issues.is_empty() => {
            Ok(Example::Completion { prompt, completion })
        }
        _ => Err(issues),
    }
}

fn parse_text(obj: &Map<String, Value>) -> LineResult {
    let mut issues = Vec::new();
    match string_field(obj, "text", true, &mut issues) {
        Some(t) if issues.is_empty() => Ok(Example::Text(t)),
        _ => Err(issues),
    }
}

/// Reads `path` in `format` (or the detected one). Returns the format used
/// and `(line, example)` pairs, or every problem found.
pub fn read_jsonl(
    path: &Path,
    format: DataFormat,
) -> Result<(DataFormat, Vec<(usize, Example)>), DataError> {
    let mut format = format;
    let examples = read_objects(path, |obj| {
        if format == DataFormat::Auto {
            format = detect(obj).ok_or_else(|| {
                vec![(
                    IssueCode::MissingField,
                    "cannot tell the format: expected 'messages', 'conversations', 'instruction'/'output', 'prompt'/'completion' or 'text'".to_string(),
                )]
            })?;
        }
        match format {
            DataFormat::Chat => parse_chat(obj),
            DataFormat::ShareGpt => parse_sharegpt(obj),
            DataFormat::Alpaca => parse_alpaca(obj),
            DataFormat::Completion => parse_completion(obj),
            DataFormat::Text => parse_text(obj),
            DataFormat::Auto => unreachable!("resolved above"),
        }
    })?;
    Ok((format, examples))
}
