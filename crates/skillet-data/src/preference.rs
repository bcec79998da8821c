//! Preference pairs, the data of DPO and reward models, in the three shapes
//! people bring, detected from the first line and all read into
//! [`PreferencePair`]:
//! - TRL's standard form, `{"prompt", "chosen", "rejected"}` as strings:
//!   plain text, no chat template (as TRL, and as Skillet's own
//!   `prompt`/`completion` SFT data);
//! - TRL's conversational form: `prompt` a list of messages ending in a
//!   user turn, `chosen` and `rejected` lists holding one assistant message;
//! - OpenAI's DPO form, `{"input": {"messages": [...]}, "preferred_output":
//!   [{assistant}], "non_preferred_output": [{assistant}]}`.
//!
//! Any of them may carry `margin` (a number, for reward training). Other
//! keys are left alone, as TRL keeps extra columns.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::format::{parse_messages, string_field, type_name};
use crate::lines::{Parsed, read_objects};
use crate::{DataError, IssueCode, Turn};

/// The layout of a preference file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairFormat {
    /// Decide from the first line.
    Auto,
    /// TRL's `prompt`/`chosen`/`rejected` strings.
    Standard,
    /// TRL's `prompt`/`chosen`/`rejected` message lists.
    Conversational,
    /// OpenAI's `input`/`preferred_output`/`non_preferred_output`.
    #[serde(rename = "openai")]
    OpenAi,
}

/// What both completions of a pair answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairPrompt {
    /// Plain text, followed directly by each completion.
    Text(String),
    /// A conversation ending in a user turn, rendered with the chat
    /// template and its generation prompt.
    Chat(Vec<Turn>),
}

/// One preference: a prompt, the better and the worse completion.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// The shared prompt.
    pub prompt: PairPrompt,
    /// The preferred completion.
    pub chosen: String,
    /// The rejected completion.
    pub rejected: String,
    /// How much better `chosen` is (reward training subtracts it).
    pub margin: Option<f64>,
}

fn detect(obj: &Map<String, Value>) -> Option<PairFormat> {
    // Alpaca's `input` is a string; OpenAI's is an object of messages.
    let openai_input =
        matches!(obj.get("input"), Some(Value::Object(i)) if i.contains_key("messages"));
    if obj.contains_key("preferred_output") || openai_input {
        Some(PairFormat::OpenAi)
    } else if obj.contains_key("chosen") {
        let listed = |k: &str| matches!(obj.get(k), Some(Value::Array(_)));
        Some(if listed("prompt") || listed("chosen") {
            PairFormat::Conversational
        } else {
            PairFormat::Standard
        })
    } else {
        None
    }
}

/// The messages of `list` (under `key`), or `None` with their problems
/// added to `issues`.
fn valid_messages(
    list: &[Value],
    key: &str,
    issues: &mut Vec<(IssueCode, String)>,
) -> Option<Vec<Turn>> {
    let before = issues.len();
    let turns = parse_messages(list, &format!("'{key}' message"), issues);
    (issues.len() == before).then_some(turns)
}

/// A list holding exactly one assistant message with text: its content.
fn one_assistant(
    obj: &Map<String, Value>,
    key: &str,
    issues: &mut Vec<(IssueCode, String)>,
) -> Option<String> {
    let list = match obj.get(key) {
        Some(Value::Array(list)) => list,
        None => {
            issues.push((IssueCode::MissingField, format!("missing '{key}'")));
            return None;
        }
        Some(other) => {
            issues.push((
                IssueCode::InvalidCompletion,
                format!(
                    "'{key}' must be a list with one assistant message, got {}",
                    type_name(other)
                ),
            ));
            return None;
        }
    };
    let turns = valid_messages(list, key, issues)?;
    match turns.as_slice() {
        [t] if t.role == "assistant" => Some(t.content.clone()),
        _ => {
            issues.push((
                IssueCode::InvalidCompletion,
                format!(
                    "'{key}' must hold exactly one assistant message, got {} message(s) ({})",
                    turns.len(),
                    turns
                        .iter()
                        .map(|t| t.role.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            None
        }
    }
}

/// A conversation that ends in a user turn (what a completion answers).
fn chat_prompt(
    list: Option<&Value>,
    key: &str,
    issues: &mut Vec<(IssueCode, String)>,
) -> Option<Vec<Turn>> {
    let Some(Value::Array(list)) = list else {
        issues.push((
            IssueCode::InvalidPrompt,
            format!("'{key}' must be a list of messages"),
        ));
        return None;
    };
    let turns = valid_messages(list, key, issues)?;
    if turns.last().is_none_or(|t| t.role != "user") {
        issues.push((
            IssueCode::InvalidPrompt,
            format!("'{key}' must end with a user message"),
        ));
        return None;
    }
    Some(turns)
}

fn margin(obj: &Map<String, Value>, issues: &mut Vec<(IssueCode, String)>) -> Option<f64> {
    match obj.get("margin") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => n.as_f64(),
        Some(other) => {
            issues.push((
                IssueCode::InvalidMargin,
                format!("'margin' must be a finite number, got {other}"),
            ));
            None
        }
    }
}

fn parse(obj: &Map<String, Value>, format: PairFormat) -> Parsed<PreferencePair> {
    let mut issues = Vec::new();
    let (prompt, chosen, rejected) = match format {
        PairFormat::Standard => (
            string_field(obj, "prompt", true, &mut issues).map(PairPrompt::Text),
            string_field(obj, "chosen", true, &mut issues),
            string_field(obj, "rejected", true, &mut issues),
        ),
        PairFormat::Conversational => (
            chat_prompt(obj.get("prompt"), "prompt", &mut issues).map(PairPrompt::Chat),
            one_assistant(obj, "chosen", &mut issues),
            one_assistant(obj, "rejected", &mut issues),
        ),
        PairFormat::OpenAi => {
            let messages = match obj.get("input") {
                Some(Value::Object(input)) => input.get("messages"),
                _ => None,
            };
            (
                chat_prompt(messages, "input.messages", &mut issues).map(PairPrompt::Chat),
                one_assistant(obj, "preferred_output", &mut issues),
                one_assistant(obj, "non_preferred_output", &mut issues),
            )
        }
        PairFormat::Auto => unreachable!("resolved by the caller"),
    };
    let margin = margin(obj, &mut issues);
    match (prompt, chosen, rejected) {
        (Some(prompt), Some(chosen), Some(rejected)) if issues.is_empty() => Ok(PreferencePair {
            prompt,
            chosen,
            rejected,
            margin,
        }),
        _ => Err(issues),
    }
}

/// Whether the first example of `path` is a preference pair (it has
/// `chosen` or `preferred_output`); `false` for anything unreadable.
pub fn looks_like_pairs(path: &Path) -> bool {
    let Ok(text) = std::fs::read(path) else {
        return false;
    };
    text.split(|&b| b == b'\n')
        .find(|l| !l.iter().all(u8::is_ascii_whitespace))
        .and_then(|l| serde_json::from_slice::<Map<String, Value>>(l).ok())
        .is_some_and(|obj| detect(&obj).is_some())
}

/// Reads preference pairs from `path` in `format` (or the one detected
/// from the first line). Returns the format and `(line, pair)` pairs, or
/// every problem of every line.
pub fn read_pairs(
    path: &Path,
    format: PairFormat,
) -> Result<(PairFormat, Vec<(usize, PreferencePair)>), DataError> {
    let mut format = format;
    let pairs = read_objects(path, |obj| {
        if format == PairFormat::Auto {
            format = detect(obj).ok_or_else(|| {
                vec![(
                    IssueCode::MissingField,
                    "cannot tell the format of this preference pair: expected 'prompt'/'chosen'/'rejected' \
                     or 'input'/'preferred_output'/'non_preferred_output'"
                        .to_string(),
                )]
            })?;
        }
        parse(obj, format)
    })?;
    Ok((format, pairs))
}
