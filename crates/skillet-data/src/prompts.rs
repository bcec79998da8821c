//! Prompts for reinforcement learning (GRPO): what the policy answers,
//! with any other fields of the line (a reference `answer`, test cases)
//! kept for the reward functions. A line is `{"messages": [...]}` ending in
//! a user turn (OpenAI's chat shape without the answer), or `{"prompt":
//! ...}` holding text or such a list of messages (TRL's prompt-only
//! shapes).

use std::path::Path;

use serde_json::{Map, Value};

use crate::format::parse_messages;
use crate::lines::{Parsed, read_objects};
use crate::preference::PairPrompt;
use crate::{DataError, IssueCode};

/// One prompt and the rest of its line.
#[derive(Debug, Clone, PartialEq)]
pub struct RlPrompt {
    /// What the completion answers.
    pub prompt: PairPrompt,
    /// The line's other fields, for reward functions.
    pub fields: Map<String, Value>,
}

fn parse(obj: &Map<String, Value>) -> Parsed<RlPrompt> {
    let mut issues = Vec::new();
    let (key, value) = match (obj.get("messages"), obj.get("prompt")) {
        (Some(m), None) => ("messages", m),
        (None, Some(p)) => ("prompt", p),
        (Some(_), Some(_)) => {
            return Err(vec![(
                IssueCode::InvalidPrompt,
                "has both 'messages' and 'prompt'; give one".into(),
            )]);
        }
        (None, None) => {
            return Err(vec![(
                IssueCode::MissingField,
                "missing 'messages' (a conversation ending in a user turn) or 'prompt'".into(),
            )]);
        }
    };
    let prompt = match value {
        Value::String(s) if !s.is_empty() && key == "prompt" => Some(PairPrompt::Text(s.clone())),
        Value::Array(list) => {
            let before = issues.len();
            let turns = parse_messages(list, &format!("'{key}' message"), &mut issues);
            if issues.len() > before {
                None
            } else if turns.last().is_none_or(|t| t.role != "user") {
                issues.push((
                    IssueCode::InvalidPrompt,
                    format!("'{key}' must end with a user message (the policy writes the answer)"),
                ));
                None
            } else {
                Some(PairPrompt::Chat(turns))
            }
        }
        _ => {
            issues.push((
                IssueCode::InvalidPrompt,
                format!(
                    "'{key}' must be a list of messages{}",
                    if key == "prompt" {
                        " or non-empty text"
                    } else {
                        ""
                    }
                ),
            ));
            None
        }
    };
    match prompt {
        Some(prompt) if issues.is_empty() => {
            let mut fields = obj.clone();
            fields.remove(key);
            Ok(RlPrompt { prompt, fields })
        }
        _ => Err(issues),
    }
}

/// Reads every prompt of `path`; every bad line is reported at once.
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, RlPrompt)>, DataError> {
    read_objects(path, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_prompt_shapes_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"2+2?"}],"answer":"4"}"#, "\n",
                r#"{"prompt":"Q: 3+3? A:","answer":"6"}"#, "\n",
                r#"{"prompt":[{"role":"user","content":"hi"}]}"#, "\n",
            ),
        )
        .unwrap();
        let p = read_prompts(&path).unwrap();
        assert_eq!(p.len(), 3);
        assert!(matches!(&p[0].1.prompt, PairPrompt::Chat(t) if t.len() == 2));
        assert_eq!(p[0].1.fields["answer"], "4");
        assert!(!p[0].1.fields.contains_key("messages"));
        assert_eq!(p[1].1.prompt, PairPrompt::Text("Q: 3+3? A:".into()));
        std::fs::write(
            &path,
            concat!(
                r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#, "\n",
                r#"{"answer":"4"}"#, "\n",
                r#"{"prompt":""}"#, "\n",
                "\n",
                r#"{"prompt":"ok"}"#, "\n",
            ),
        )
        .unwrap();
        let e = read_prompts(&path).unwrap_err().to_string();
        for want in [
            ":1: [invalid_prompt]",
            ":2: [missing_field]",
            ":3: [invalid_prompt]",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        assert!(!e.contains(":5:"), "{e}");
    }
}
