//! GRPO's reward functions, built from `[[method.rewards]]`: rules on the
//! completion's text (exact match against a field of the prompt's line, a
//! regular expression, valid JSON, containing a text or field, a length
//! penalty), a reward model on the same base, and an external program
//! that reads JSON lines and writes one number per line. A program that
//! crashes, hangs past its timeout, or prints something that is not a
//! finite number stops the run with an error saying which.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use serde_json::{Map, Value};
use skillet_data::{PairPrompt, RlPrompt};
use skillet_models::CausalLm;
use skillet_train::RewardSpec;

use crate::{Result, RewardModel, RuntimeError};

/// One completion to score, with its prompt.
pub struct ToScore<'a> {
    /// The prompt's line in its file.
    pub line: usize,
    /// The prompt and its line's other fields.
    pub prompt: &'a RlPrompt,
    /// The prompt's tokens.
    pub prompt_ids: &'a [u32],
    /// The completion's text (special tokens removed).
    pub completion: &'a str,
    /// The completion's tokens.
    pub completion_ids: &'a [u32],
}

/// A weighted reward function.
pub struct RewardFn {
    /// Its name in metrics (`rewards/<name>/mean`).
    pub name: String,
    /// Its weight in the sum.
    pub weight: f64,
    kind: Kind,
}

enum Kind {
    ExactMatch(String),
    Regex(regex::Regex),
    JsonValid,
    Contains {
        text: Option<String>,
        field: Option<String>,
    },
    LengthPenalty(usize),
    Model(Box<RewardModel>),
    Program(Mutex<Program>),
}

impl RewardFn {
    /// Every reward of `specs`, named by kind (numbered where a kind
    /// repeats); reward models are read for `model`, programs started.
    pub fn build_all(specs: &[RewardSpec], model: &dyn CausalLm) -> Result<Vec<RewardFn>> {
        let mut out: Vec<RewardFn> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let same = specs[..i]
                .iter()
                .filter(|s| s.kind() == spec.kind())
                .count();
            let name = if specs.iter().filter(|s| s.kind() == spec.kind()).count() > 1 {
                format!("{}_{}", spec.kind(), same + 1)
            } else {
                spec.kind().to_string()
            };
            let kind = match spec {
                RewardSpec::ExactMatch { field, .. } => Kind::ExactMatch(field.clone()),
                RewardSpec::Regex { pattern, .. } => {
                    Kind::Regex(regex::Regex::new(pattern).map_err(|e| {
                        RuntimeError::Invalid(format!("regex reward {pattern:?}: {e}"))
                    })?)
                }
                RewardSpec::JsonValid { .. } => Kind::JsonValid,
                RewardSpec::Contains { text, field, .. } => Kind::Contains {
                    text: text.clone(),
                    field: field.clone(),
                },
                RewardSpec::LengthPenalty { max_tokens, .. } => Kind::LengthPenalty(*max_tokens),
                RewardSpec::RewardModel {
                    adapter,
                    model: whole,
                    ..
                } => {
                    let (path, rm) = match (adapter, whole) {
                        (Some(dir), _) => (dir, RewardModel::load(model, dir)),
                        (None, Some(dir)) => (dir, RewardModel::load_model(dir)),
                        (None, None) => {
                            return Err(RuntimeError::Invalid(
                                "a reward_model reward needs adapter or model".into(),
                            ));
                        }
                    };
                    Kind::Model(Box::new(rm.map_err(|e| {
                        RuntimeError::Invalid(format!("reward model {}: {e}", path.display()))
                    })?))
                }
                RewardSpec::Program {
                    command, timeout_s, ..
                } => Kind::Program(Mutex::new(Program::start(command, *timeout_s)?)),
            };
            out.push(RewardFn {
                name,
                weight: spec.weight(),
                kind,
            });
        }
        Ok(out)
    }

    /// The reward of each completion.
    pub fn score(
        &self,
        model: &dyn CausalLm,
        items: &[ToScore<'_>],
        pad_id: u32,
    ) -> Result<Vec<f64>> {
        let one = |b: bool| f64::from(u8::from(b));
        let scores = match &self.kind {
            Kind::ExactMatch(field) => items
                .iter()
                .map(|t| Ok(one(t.completion.trim() == field_text(t, field)?.trim())))
                .collect::<Result<Vec<_>>>()?,
            Kind::Regex(re) => items
                .iter()
                .map(|t| one(re.is_match(t.completion)))
                .collect(),
            Kind::JsonValid => items
                .iter()
                .map(|t| one(serde_json::from_str::<Value>(t.completion.trim()).is_ok()))
                .collect(),
            Kind::Contains { text, field } => items
                .iter()
                .map(|t| {
                    let needle = match (text, field) {
                        (Some(text), _) => text.clone(),
                        (None, Some(f)) => field_text(t, f)?,
                        (None, None) => String::new(),
                    };
                    Ok(one(t.completion.contains(&needle)))
                })
                .collect::<Result<Vec<_>>>()?,
            Kind::LengthPenalty(max) => items
                .iter()
                .map(|t| {
                    let over = t.completion_ids.len().saturating_sub(*max);
                    -(over as f64) / *max as f64
                })
                .collect(),
            Kind::Model(rm) => {
                let seqs: Vec<Vec<u32>> = items
                    .iter()
                    .map(|t| [t.prompt_ids, t.completion_ids].concat())
                    .collect();
                rm.score(model, &seqs, 8, pad_id)?
                    .into_iter()
                    .map(f64::from)
                    .collect()
            }
            Kind::Program(p) => p
                .lock()
                .map_err(|_| RuntimeError::Invalid("a reward program's lock is poisoned".into()))?
                .score(items)?,
        };
        if let Some((i, bad)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(RuntimeError::Invalid(format!(
                "reward '{}' gave {bad} for a completion of the prompt on line {}; rewards must be finite numbers",
                self.name, items[i].line
            )));
        }
        Ok(scores)
    }
}

/// The text of the prompt line's `field` (a string, or any JSON value as
/// written).
fn field_text(t: &ToScore<'_>, field: &str) -> Result<String> {
    match t.prompt.fields.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Ok(v.to_string()),
        None => Err(RuntimeError::Invalid(format!(
            "line {}: the reward needs the field '{field}', which the line does not have",
            t.line
        ))),
    }
}

/// The prompt as the program sees it: text, or the list of messages.
fn prompt_json(p: &PairPrompt) -> Value {
    match p {
        PairPrompt::Text(t) => Value::String(t.clone()),
        PairPrompt::Chat(turns) => Value::Array(
            turns
                .iter()
                .map(|t| serde_json::json!({"role": t.role, "content": t.content}))
                .collect(),
        ),
    }
}

/// A running reward program.
struct Program {
    command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
}

impl Program {
    fn start(command: &[String], timeout_s: f64) -> Result<Self> {
        let shown = command.join(" ");
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| RuntimeError::Invalid(format!("reward program `{shown}`: {e}")))?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            command: shown,
            child,
            stdin,
            lines: rx,
            timeout: Duration::from_secs_f64(timeout_s),
        })
    }

    fn failed(&mut self, what: String) -> RuntimeError {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!(" ({s})"),
            _ => String::new(),
        };
        RuntimeError::Invalid(format!("reward program `{}`{status}: {what}", self.command))
    }

    fn score(&mut self, items: &[ToScore<'_>]) -> Result<Vec<f64>> {
        let mut text = String::new();
        for t in items {
            let mut obj = Map::new();
            obj.insert("prompt".into(), prompt_json(&t.prompt.prompt));
            obj.insert("completion".into(), Value::String(t.completion.to_string()));
            for (k, v) in &t.prompt.fields {
                obj.entry(k.clone()).or_insert_with(|| v.clone());
            }
            text += &Value::Object(obj).to_string();
            text.push('\n');
        }
        let written = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(text.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = written {
            return Err(self.failed(format!("could not write to it: {e}")));
        }
        let mut out = Vec::with_capacity(items.len());
        for t in items {
            let line = match self.lines.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => return Err(self.failed(format!("reading its output: {e}"))),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    return Err(self.failed(format!(
                        "no answer within {:.0} s for the completion of line {}",
                        self.timeout.as_secs_f64(),
                        t.line
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    return Err(self.failed(format!(
                        "exited before answering for the completion of line {}",
                        t.line
                    )));
                }
            };
            match line.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => out.push(v),
                _ => {
                    return Err(self.failed(format!(
                        "printed {:?} for the completion of line {}; expected one finite number per line",
                        line, t.line
                    )));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        drop(self.stdin.take()); // end of input: a well-behaved program exits
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
            if !matches!(self.child.try_wait(), Ok(Some(_))) {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}
