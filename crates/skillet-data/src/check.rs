//! What a training file is, checked without a model: the examples of
//! supervised fine-tuning (any format `read_jsonl` reads), preference
//! pairs (any shape `read_pairs` reads), or prompts for RL (`read_prompts`).
//! A file service validates uploads with it; the model-specific checks
//! (template spans, lengths) come when a run tokenizes the file.

use std::path::Path;

use serde::Serialize;

use crate::{
    DataError, DataFormat, PairFormat, looks_like_pairs, read_jsonl, read_pairs, read_prompts,
};

/// A file that passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSummary {
    /// `examples`, `pairs` or `prompts`.
    pub kind: &'static str,
    /// The detected format (`chat`, `sharegpt`, `standard`, `openai`, …).
    pub format: String,
    /// Lines read.
    pub lines: usize,
}

fn name(v: impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_lowercase))
        .unwrap_or_default()
}

/// Checks every line of `path`. Preference pairs are recognized by their
/// first line; other files are read as examples, and where that fails, as
/// prompts (conversations ending in a user turn, for RL). The error is the
/// examples' (or the pairs') line-numbered problems.
pub fn check_training_file(path: &Path) -> Result<FileSummary, DataError> {
    if looks_like_pairs(path) {
        let (format, pairs) = read_pairs(path, PairFormat::Auto)?;
        return Ok(FileSummary {
            kind: "pairs",
            format: name(format),
            lines: pairs.len(),
        });
    }
    match read_jsonl(path, DataFormat::Auto) {
        Ok((format, examples)) => Ok(FileSummary {
            kind: "examples",
            format: name(format),
            lines: examples.len(),
        }),
        Err(e @ DataError::Invalid(_)) => match read_prompts(path) {
            Ok(prompts) if !prompts.is_empty() => Ok(FileSummary {
                kind: "prompts",
                format: "prompts".into(),
                lines: prompts.len(),
            }),
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, lines: &[&str]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    }

    #[test]
    fn examples_pairs_and_prompts_are_told_apart_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let chat =
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;
        let s = check_training_file(&file(dir.path(), "a.jsonl", &[chat, chat])).unwrap();
        assert_eq!(
            (s.kind, s.format.as_str(), s.lines),
            ("examples", "chat", 2)
        );
        let pair = r#"{"prompt":"q","chosen":"a","rejected":"b"}"#;
        let s = check_training_file(&file(dir.path(), "p.jsonl", &[pair])).unwrap();
        assert_eq!(
            (s.kind, s.format.as_str(), s.lines),
            ("pairs", "standard", 1)
        );
        let prompt = r#"{"messages":[{"role":"user","content":"hi"}],"answer":"x"}"#;
        let s =
            check_training_file(&file(dir.path(), "r.jsonl", &[prompt, prompt, prompt])).unwrap();
        assert_eq!((s.kind, s.lines), ("prompts", 3));
        let e = check_training_file(&file(dir.path(), "bad.jsonl", &[chat, "{not json", chat]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.jsonl:2"), "{e}");
    }
}
