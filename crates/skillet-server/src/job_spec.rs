//! A fine-tuning job's request, in OpenAI's shape, read into the Skillet
//! run it stands for.
//!
//! - `method.type`: `supervised` runs SFT, `dpo` runs DPO, `reinforcement`
//!   runs GRPO. The older top-level `hyperparameters` are read where
//!   `method` has none.
//! - Hyperparameters, each a value or `"auto"`:
//!   - `n_epochs`: auto is 3 (1 for reinforcement).
//!   - `batch_size`: examples or pairs per step, or prompts per step for
//!     reinforcement (each sampled `num_generations` times). Auto is 4
//!     (2 prompts for reinforcement).
//!   - `learning_rate_multiplier`: scales the base rate, which is
//!     `skillet.train.lr` or else Skillet's default of 2e-4. Auto is 1.
//!   - `beta` (DPO): auto is 0.1.
//!   - `eval_interval` (reinforcement): validate every N steps.
//! - The reinforcement grader must be OpenAI's `string_check` with input
//!   `{{sample.output_text}}`. Its reference is `{{item.FIELD}}` or fixed
//!   text, and its operation maps onto Skillet's rule rewards:
//!   - `eq` with a field gives `exact_match`; with fixed text, an anchored
//!     `regex`.
//!   - `like` gives `contains`.
//!   - `ilike` with fixed text gives a case-insensitive `regex`.
//! - `skillet`: Skillet's own options, as the sections of a run config
//!   (`data`, `lora`, `train`, `eval`, `method`). They are applied over
//!   what the fields above give.
//!   - Refused: keys naming paths on the server (data files, init
//!     adapters, general text, rewards that run programs or read models).
//!   - Refused: full fine-tuning, since a job's result is served as an
//!     adapter.
//! - Checkpoints are written at the end of each epoch, as OpenAI's are,
//!   unless `skillet.eval.save_every` is set.

use std::path::Path;

use serde_json::{Map, Value, json};
use skillet_train::{GrpoConfig, RunConfig};

use crate::error::ApiError;

/// Skillet's default learning rate, the base the multiplier scales.
const BASE_LR: f64 = 2e-4;

/// What a job trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// SFT on examples.
    Supervised,
    /// DPO on preference pairs.
    Dpo,
    /// GRPO on prompts with rule rewards.
    Reinforcement,
}

impl Method {
    /// OpenAI's name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Supervised => "supervised",
            Method::Dpo => "dpo",
            Method::Reinforcement => "reinforcement",
        }
    }

    /// The kind of training file the method reads, as
    /// `skillet_data::check_training_file` names it.
    pub fn expects(self) -> &'static str {
        match self {
            Method::Supervised => "examples",
            Method::Dpo => "pairs",
            Method::Reinforcement => "prompts",
        }
    }
}

/// A job's request, read and checked.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The method.
    pub method: Method,
    n_epochs: Option<u64>,
    batch_size: Option<u64>,
    lr_multiplier: Option<f64>,
    beta: Option<f64>,
    eval_interval: Option<u64>,
    grader: Option<Value>,
    rewards: Vec<toml::Value>,
    extra: toml::Table,
}

/// Where a job's run reads and writes.
#[derive(Debug, Clone)]
pub struct RunPaths<'a> {
    /// The base model file or folder.
    pub model: &'a Path,
    /// The run's output folder.
    pub output_dir: &'a Path,
    /// The training file's copy.
    pub train: &'a Path,
    /// The validation file's copy.
    pub validation: Option<&'a Path>,
    /// The adapter to start from (fine-tuning a fine-tuned model).
    pub init_adapter: Option<&'a Path>,
}

/// Keys of the `skillet` object that are refused: they name paths on the
/// server, or make a result that is not an adapter.
const REFUSED: &[(&str, &str)] = &[
    ("data", "train"),
    ("data", "validation"),
    ("lora", "init_adapter"),
    ("eval", "general"),
    ("train", "tuning"),
    ("method", "type"),
    ("method", "rewards"),
];

fn auto_or<T>(
    v: Option<&Value>,
    name: &str,
    read: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(x) => read(x)
            .map(Some)
            .ok_or_else(|| ApiError::param(name, format!("`{name}` must be \"auto\" or {what}"))),
    }
}

/// A JSON value as TOML (null refused).
fn to_toml(v: &Value, name: &str) -> Result<toml::Value, ApiError> {
    let bad = || ApiError::param(name, format!("`{name}` has a value TOML cannot hold"));
    Ok(match v {
        Value::Null => return Err(bad()),
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().ok_or_else(bad)?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(
            a.iter()
                .map(|x| to_toml(x, name))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => toml::Value::Table(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), to_toml(x, &format!("{name}.{k}"))?)))
                .collect::<Result<_, ApiError>>()?,
        ),
    })
}

/// `s` with the regular-expression metacharacters escaped.
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The rule reward an OpenAI `string_check` grader stands for.
fn grader_reward(g: &Value) -> Result<toml::Value, ApiError> {
    let p = "method.reinforcement.grader";
    let field = |k: &str| g.get(k).and_then(Value::as_str);
    match field("type") {
        Some("string_check") => {}
        other => {
            return Err(ApiError::param(
                format!("{p}.type"),
                format!(
                    "grader type {other:?} is not supported: use \"string_check\" (mapped to Skillet's rule rewards)"
                ),
            ));
        }
    }
    let input = field("input").unwrap_or("").replace(' ', "");
    if input != "{{sample.output_text}}" {
        return Err(ApiError::param(
            format!("{p}.input"),
            "the grader's input must be \"{{sample.output_text}}\" (the completion's text)",
        ));
    }
    let reference = field("reference").ok_or_else(|| {
        ApiError::param(format!("{p}.reference"), "the grader needs a `reference`")
    })?;
    let compact = reference.replace(' ', "");
    let item = compact
        .strip_prefix("{{item.")
        .and_then(|r| r.strip_suffix("}}"))
        .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_alphanumeric() || c == '_'));
    let mut t = toml::Table::new();
    match (field("operation").unwrap_or("eq"), item) {
        ("eq", Some(f)) => {
            t.insert("type".into(), "exact_match".into());
            t.insert("field".into(), f.into());
        }
        ("eq", None) => {
            t.insert("type".into(), "regex".into());
            t.insert(
                "pattern".into(),
                format!("^\\s*{}\\s*$", escape_regex(reference.trim())).into(),
            );
        }
        ("like", Some(f)) => {
            t.insert("type".into(), "contains".into());
            t.insert("field".into(), f.into());
        }
        ("like", None) => {
            t.insert("type".into(), "contains".into());
            t.insert("text".into(), reference.into());
        }
        ("ilike", None) => {
            t.insert("type".into(), "regex".into());
            t.insert(
                "pattern".into(),
                format!("(?i){}", escape_regex(reference)).into(),
            );
        }
        (op, _) => {
            return Err(ApiError::param(
                format!("{p}.operation"),
                format!(
                    "operation {op:?} is not supported with this reference: use eq or like (ilike with fixed text)"
                ),
            ));
        }
    }
    Ok(toml::Value::Table(t))
}

impl JobSpec {
    /// Reads a job creation request's method, hyperparameters and Skillet
    /// options (a 400 naming the field where one is wrong).
    pub fn parse(req: &Value) -> Result<Self, ApiError> {
        let method_obj = req.get("method").filter(|m| !m.is_null());
        let method = match method_obj.map(|m| m.get("type").and_then(Value::as_str)) {
            None | Some(Some("supervised")) => Method::Supervised,
            Some(Some("dpo")) => Method::Dpo,
            Some(Some("reinforcement")) => Method::Reinforcement,
            Some(other) => {
                return Err(ApiError::param(
                    "method.type",
                    format!(
                        "method type {other:?} is not supported: use supervised, dpo or reinforcement"
                    ),
                ));
            }
        };
        let inner = method_obj.and_then(|m| m.get(method.name()));
        let hp = inner
            .and_then(|m| m.get("hyperparameters"))
            .or_else(|| req.get("hyperparameters"))
            .filter(|h| !h.is_null())
            .cloned()
            .unwrap_or_else(|| json!({}));
        let Some(hp) = hp.as_object() else {
            return Err(ApiError::param(
                "hyperparameters",
                "`hyperparameters` must be an object",
            ));
        };
        let mut known = vec!["n_epochs", "batch_size", "learning_rate_multiplier"];
        match method {
            Method::Dpo => known.push("beta"),
            Method::Reinforcement => known.extend([
                "eval_interval",
                "eval_samples",
                "compute_multiplier",
                "reasoning_effort",
            ]),
            Method::Supervised => {}
        }
        if let Some(k) = hp.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::param(
                format!("hyperparameters.{k}"),
                format!(
                    "hyperparameter `{k}` is not known for {} jobs (known: {})",
                    method.name(),
                    known.join(", ")
                ),
            ));
        }
        for k in ["eval_samples", "compute_multiplier", "reasoning_effort"] {
            if hp.get(k).is_some_and(|v| v.as_str() != Some("auto")) {
                return Err(ApiError::param(
                    format!("hyperparameters.{k}"),
                    format!("`{k}` is not supported; leave it \"auto\""),
                ));
            }
        }
        let count = |name: &str, max: u64| {
            auto_or(
                hp.get(name),
                &format!("hyperparameters.{name}"),
                |v| v.as_u64().filter(|n| (1..=max).contains(n)),
                &format!("an integer from 1 to {max}"),
            )
        };
        let positive = |name: &str| {
            auto_or(
                hp.get(name),
                &format!("hyperparameters.{name}"),
                |v| v.as_f64().filter(|x| x.is_finite() && *x > 0.0),
                "a positive number",
            )
        };
        let mut spec = JobSpec {
            method,
            n_epochs: count("n_epochs", 50)?,
            batch_size: count("batch_size", 256)?,
            lr_multiplier: positive("learning_rate_multiplier")?,
            beta: positive("beta")?,
            eval_interval: count("eval_interval", 1_000_000)?,
            grader: None,
            rewards: Vec::new(),
            extra: toml::Table::new(),
        };
        if method == Method::Reinforcement {
            let g = inner.and_then(|m| m.get("grader")).ok_or_else(|| {
                ApiError::param(
                    "method.reinforcement.grader",
                    "reinforcement jobs need a grader",
                )
            })?;
            spec.rewards.push(grader_reward(g)?);
            spec.grader = Some(g.clone());
        }
        if let Some(extra) = req.get("skillet").filter(|v| !v.is_null()) {
            spec.extra = read_extra(extra)?;
        }
        Ok(spec)
    }

    fn extra(&self, section: &str, key: &str) -> Option<&toml::Value> {
        self.extra.get(section)?.get(key)
    }

    fn epochs(&self) -> u64 {
        self.n_epochs.unwrap_or(match self.method {
            Method::Reinforcement => 1,
            _ => 3,
        })
    }

    fn batch(&self) -> u64 {
        self.batch_size.unwrap_or(match self.method {
            Method::Reinforcement => 2,
            _ => 4,
        })
    }

    fn multiplier(&self) -> f64 {
        self.lr_multiplier.unwrap_or(1.0)
    }

    /// The hyperparameters as resolved (what `"auto"` became), as OpenAI's
    /// job object shows them.
    pub fn hyperparameters(&self) -> Value {
        let mut h = json!({
            "n_epochs": self.epochs(),
            "batch_size": self.batch(),
            "learning_rate_multiplier": self.multiplier(),
        });
        match self.method {
            Method::Dpo => h["beta"] = json!(self.beta.unwrap_or(0.1)),
            Method::Reinforcement => {
                h["eval_interval"] = json!(self.eval_interval);
            }
            Method::Supervised => {}
        }
        h
    }

    /// The job object's `method`.
    pub fn method_object(&self) -> Value {
        let mut inner = json!({"hyperparameters": self.hyperparameters()});
        if let Some(g) = &self.grader {
            inner["grader"] = g.clone();
        }
        json!({"type": self.method.name(), self.method.name(): inner})
    }

    /// The run this job stands for, checked as `skillet train` checks a
    /// config.
    pub fn run_config(&self, paths: &RunPaths, seed: u64) -> Result<RunConfig, ApiError> {
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        let mut root = toml::Table::new();
        root.insert("model".into(), path(paths.model));
        root.insert("output_dir".into(), path(paths.output_dir));
        root.insert("seed".into(), toml::Value::Integer(seed as i64));
        let mut data = toml::Table::new();
        data.insert("train".into(), path(paths.train));
        if let Some(v) = paths.validation {
            data.insert("validation".into(), path(v));
        }
        let mut lora = toml::Table::new();
        if let Some(a) = paths.init_adapter {
            lora.insert("init_adapter".into(), path(a));
        }
        let base_lr = self
            .extra("train", "lr")
            .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
            .unwrap_or(BASE_LR);
        let mut method = self
            .extra
            .get("method")
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default();
        let per_step = match self.method {
            Method::Reinforcement => {
                let g: GrpoConfig = toml::Value::Table(method.clone())
                    .try_into()
                    .map_err(|e| ApiError::param("skillet.method", e.to_string()))?;
                self.batch()
                    .checked_mul(g.num_generations as u64)
                    .filter(|n| *n <= i64::MAX as u64)
                    .ok_or_else(|| {
                        ApiError::param(
                            "skillet.method.num_generations",
                            "too many completions per step",
                        )
                    })?
            }
            _ => self.batch(),
        };
        let mut train = toml::Table::new();
        train.insert("epochs".into(), toml::Value::Integer(self.epochs() as i64));
        train.insert("batch_size".into(), toml::Value::Integer(per_step as i64));
        train.insert("lr".into(), toml::Value::Float(base_lr * self.multiplier()));
        let mut eval = toml::Table::new();
        if self.extra("eval", "save_every").is_none() {
            eval.insert("save_each_epoch".into(), toml::Value::Boolean(true));
        }
        if let Some(n) = self.eval_interval {
            eval.insert("every".into(), toml::Value::Integer(n as i64));
        }
        let kind = match self.method {
            Method::Supervised => "sft",
            Method::Dpo => "dpo",
            Method::Reinforcement => "grpo",
        };
        method.insert("type".into(), kind.into());
        if self.method == Method::Dpo {
            method
                .entry("beta")
                .or_insert(toml::Value::Float(self.beta.unwrap_or(0.1)));
        }
        if !self.rewards.is_empty() {
            method.insert("rewards".into(), toml::Value::Array(self.rewards.clone()));
        }
        for (name, mut table) in [
            ("data", data),
            ("lora", lora),
            ("train", train),
            ("eval", eval),
        ] {
            if let Some(over) = self.extra.get(name).and_then(toml::Value::as_table) {
                for (k, v) in over {
                    if !(name == "train" && k == "lr") {
                        table.insert(k.clone(), v.clone());
                    }
                }
            }
            root.insert(name.into(), toml::Value::Table(table));
        }
        root.insert("method".into(), toml::Value::Table(method));
        let text = toml::to_string(&root).map_err(|e| ApiError::internal(e.to_string()))?;
        RunConfig::from_toml(&text, &[]).map_err(|e| {
            ApiError::param("skillet", format!("the job's options are not valid: {e}"))
        })
    }
}

/// The `skillet` object, as run config sections, with refused keys named.
fn read_extra(v: &Value) -> Result<toml::Table, ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::param("skillet", "`skillet` must be an object"));
    };
    let mut out = toml::Table::new();
    for (section, body) in obj {
        if !["data", "lora", "train", "eval", "method"].contains(&section.as_str()) {
            return Err(ApiError::param(
                format!("skillet.{section}"),
                format!(
                    "`skillet.{section}` is not a section Skillet takes here (data, lora, train, eval, method)"
                ),
            ));
        }
        let Some(fields) = body.as_object() else {
            return Err(ApiError::param(
                format!("skillet.{section}"),
                "each section must be an object",
            ));
        };
        if let Some((_, key)) = REFUSED
            .iter()
            .find(|(s, k)| s == section && fields.contains_key(*k))
        {
            return Err(ApiError::param(
                format!("skillet.{section}.{key}"),
                format!("`skillet.{section}.{key}` cannot be set through the API"),
            ));
        }
        let mut table = Map::new();
        table.extend(fields.clone());
        out.insert(
            section.clone(),
            to_toml(&Value::Object(table), &format!("skillet.{section}"))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skillet_train::{MethodConfig, RewardSpec};

    fn paths() -> RunPaths<'static> {
        RunPaths {
            model: Path::new("/m.gguf"),
            output_dir: Path::new("/run/out"),
            train: Path::new("/run/train.jsonl"),
            validation: None,
            init_adapter: None,
        }
    }

    #[test]
    fn supervised_hyperparameters_and_skillet_options_make_the_run() {
        let spec = JobSpec::parse(&json!({
            "model": "m", "training_file": "file-1",
            "method": {"type": "supervised", "supervised": {"hyperparameters":
                {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 5}}},
            "skillet": {"lora": {"r": 4, "targets": "all-linear"}, "data": {"max_seq_len": 128},
                        "train": {"lr": 1e-4}}
        }))
        .unwrap();
        assert_eq!(
            spec.hyperparameters(),
            json!({"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5.0})
        );
        let c = spec.run_config(&paths(), 7).unwrap();
        assert_eq!(c.method, MethodConfig::Sft);
        assert_eq!((c.train.epochs, c.train.batch_size), (2, 4));
        assert!((c.train.lr - 5e-4).abs() < 1e-12);
        assert_eq!((c.lora.r, c.data.max_seq_len, c.seed), (4, 128, 7));
        assert!(c.eval.save_each_epoch);
        assert_eq!(c.output_dir, Path::new("/run/out"));
        // The older top-level hyperparameters, and defaults.
        let old = JobSpec::parse(&json!({"hyperparameters": {"n_epochs": 1}})).unwrap();
        assert_eq!(old.hyperparameters()["n_epochs"], 1);
        let c = JobSpec::parse(&json!({}))
            .unwrap()
            .run_config(&paths(), 1)
            .unwrap();
        assert_eq!((c.train.epochs, c.train.lr), (3, BASE_LR));
    }

    #[test]
    fn dpo_takes_beta_and_reinforcement_maps_the_string_check_grader() {
        let spec = JobSpec::parse(&json!({"method": {"type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.25}}}}))
        .unwrap();
        assert_eq!(spec.method.expects(), "pairs");
        let MethodConfig::Dpo(d) = spec.run_config(&paths(), 1).unwrap().method else {
            panic!()
        };
        assert_eq!(d.beta, 0.25);

        let rl = |reference: &str, op: &str| {
            JobSpec::parse(
                &json!({"method": {"type": "reinforcement", "reinforcement": {
                "grader": {"type": "string_check", "name": "g", "input": "{{ sample.output_text }}",
                           "reference": reference, "operation": op},
                "hyperparameters": {"batch_size": 3}}},
                "skillet": {"method": {"num_generations": 4, "max_completion_length": 16}}}),
            )
        };
        let c = rl("{{item.answer}}", "eq")
            .unwrap()
            .run_config(&paths(), 1)
            .unwrap();
        let MethodConfig::Grpo(g) = &c.method else {
            panic!()
        };
        assert_eq!(c.train.batch_size, 12, "3 prompts x 4 completions");
        assert_eq!(
            g.rewards,
            [RewardSpec::ExactMatch {
                field: "answer".into(),
                weight: 1.0
            }]
        );
        let c = rl("a.b", "eq").unwrap().run_config(&paths(), 1).unwrap();
        let MethodConfig::Grpo(g) = &c.method else {
            panic!()
        };
        assert!(
            matches!(&g.rewards[0], RewardSpec::Regex { pattern, .. } if pattern == "^\\s*a\\.b\\s*$")
        );
        let c = rl("{{item.city}}", "like")
            .unwrap()
            .run_config(&paths(), 1)
            .unwrap();
        let MethodConfig::Grpo(g) = &c.method else {
            panic!()
        };
        assert!(
            matches!(&g.rewards[0], RewardSpec::Contains { field: Some(f), .. } if f == "city")
        );
        for (reference, op) in [("{{item.answer}}", "ne"), ("{{item.answer}}", "ilike")] {
            let e = rl(reference, op).unwrap_err();
            assert_eq!(
                e.param.as_deref(),
                Some("method.reinforcement.grader.operation")
            );
        }
    }

    #[test]
    fn bad_values_and_server_paths_are_refused_with_their_field() {
        for (req, param) in [
            (
                json!({"hyperparameters": {"n_epochs": 0}}),
                "hyperparameters.n_epochs".to_string(),
            ),
            (
                json!({"hyperparameters": {"learning_rate_multiplier": -1}}),
                "hyperparameters.learning_rate_multiplier".into(),
            ),
            (
                json!({"hyperparameters": {"beta": 0.1}}),
                "hyperparameters.beta".into(),
            ),
            (json!({"method": {"type": "distill"}}), "method.type".into()),
            (
                json!({"method": {"type": "reinforcement", "reinforcement": {}}}),
                "method.reinforcement.grader".into(),
            ),
            (
                json!({"skillet": {"data": {"train": "/etc/passwd"}}}),
                "skillet.data.train".into(),
            ),
            (
                json!({"skillet": {"eval": {"general": "/etc/passwd"}}}),
                "skillet.eval.general".into(),
            ),
            (
                json!({"skillet": {"train": {"tuning": "full"}}}),
                "skillet.train.tuning".into(),
            ),
            (
                json!({"skillet": {"output_dir": "/tmp"}}),
                "skillet.output_dir".into(),
            ),
        ] {
            let e = JobSpec::parse(&req).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param.as_str()), "{req}");
        }
        // A typo is caught where the run config is checked.
        let e = JobSpec::parse(&json!({"skillet": {"lora": {"rank": 4}}}))
            .unwrap()
            .run_config(&paths(), 1)
            .unwrap_err();
        assert!(e.message.contains("rank"), "{}", e.message);
    }
}
