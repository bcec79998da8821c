//! A JSONL file as numbered JSON objects. Each line is decoded on its own,
//! so a line that is not UTF-8, not JSON or not an object is one problem
//! with its number, and every other line is still checked. Shared by every
//! data shape (SFT examples, preference pairs, prompts).

use std::path::Path;

use serde_json::{Map, Value};

use crate::{DataError, DataIssue, IssueCode};

/// What a line parser returns: the item, or every problem of the line.
pub(crate) type Parsed<T> = Result<T, Vec<(IssueCode, String)>>;

/// Parses every non-blank line of `path` with `parse`. Returns `(line,
/// item)` pairs, or every problem of every line (an empty file is one).
pub(crate) fn read_objects<T>(
    path: &Path,
    mut parse: impl FnMut(&Map<String, Value>) -> Parsed<T>,
) -> Result<Vec<(usize, T)>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let issue = |line: usize, code: IssueCode, message: String| DataIssue {
        file: path.to_path_buf(),
        line,
        code,
        message,
    };
    let mut items = Vec::new();
    let mut issues = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = match std::str::from_utf8(raw) {
            Ok(s) => s,
            Err(e) => {
                issues.push(issue(
                    line,
                    IssueCode::InvalidUtf8,
                    format!(
                        "the line is not valid UTF-8 (bad byte at column {})",
                        e.valid_up_to() + 1
                    ),
                ));
                continue;
            }
        };
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                issues.push(issue(
                    line,
                    IssueCode::InvalidJson,
                    format!("invalid JSON: {e}"),
                ));
                continue;
            }
        };
        let Value::Object(obj) = value else {
            issues.push(issue(
                line,
                IssueCode::DataType,
                format!("Line {line} is not a dictionary"),
            ));
            continue;
        };
        match parse(&obj) {
            Ok(item) => items.push((line, item)),
            Err(list) => issues.extend(
                list.into_iter()
                    .map(|(code, message)| issue(line, code, message)),
            ),
        }
    }
    if items.is_empty() && issues.is_empty() {
        issues.push(issue(
            0,
            IssueCode::EmptyFile,
            "the file has no examples".into(),
        ));
    }
    if issues.is_empty() {
        Ok(items)
    } else {
        Err(DataError::Invalid(issues))
    }
}
