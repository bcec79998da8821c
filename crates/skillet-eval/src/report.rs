//! The end-of-training report: base vs tuned side by side (Markdown and
//! JSON) and the loss curve (SVG) from `metrics.jsonl`.

use std::path::Path;

use serde::Serialize;

use crate::{ExactMatch, GeneralStats};

/// Evaluation of one model state (base or tuned).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Held-out loss statistics.
    pub heldout: Option<serde_json::Value>,
    /// Exact match on held-out answers.
    pub exact_match: Option<f64>,
    /// General-text perplexity.
    pub general_perplexity: Option<f64>,
}

impl Snapshot {
    /// Collects what was measured: held-out metrics by name (`loss`,
    /// `perplexity`, `accuracy` for SFT; TRL's names for DPO).
    pub fn new(
        heldout: Option<&skillet_train::Metrics>,
        em: Option<&ExactMatch>,
        general: Option<&GeneralStats>,
    ) -> Self {
        Self {
            heldout: heldout.map(|h| serde_json::to_value(h).expect("stats serialize")),
            exact_match: em.map(|e| e.exact_match),
            general_perplexity: general.map(|g| g.perplexity),
        }
    }

    fn stat(&self, key: &str) -> Option<f64> {
        self.heldout.as_ref()?.get(key)?.as_f64()
    }
}

/// Facts about the run shown at the top of the report.
#[derive(Debug, Clone, Serialize)]
pub struct RunFacts {
    /// Model path.
    pub model: String,
    /// Training method (`sft`, `dpo`, `reward`).
    pub method: String,
    /// Training file.
    pub train_file: String,
    /// Training examples.
    pub train_examples: usize,
    /// Held-out examples.
    pub valid_examples: usize,
    /// Examples truncated to the maximum length.
    pub truncated: usize,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Labelled tokens trained on.
    pub trained_tokens: u64,
    /// Wall-clock seconds of training.
    pub train_seconds: f64,
    /// Precision of the base weights' products in training (`f32`, `bf16`).
    pub precision: String,
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.digits$}"))
}

/// The model states a report compares: the base model, the starting
/// adapter where training continued one (`init_adapter`), and the tuned
/// result.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    /// The base model, no adapter.
    pub base: &'a Snapshot,
    /// The starting adapter, where there was one.
    pub start: Option<&'a Snapshot>,
    /// After training.
    pub tuned: &'a Snapshot,
}

impl<'a> Columns<'a> {
    /// `(heading, snapshot)` in the report's order.
    fn list(&self) -> Vec<(&'static str, &'a Snapshot)> {
        let mut v = vec![("base", self.base)];
        v.extend(self.start.map(|s| ("start", s)));
        v.push(("tuned", self.tuned));
        v
    }

    /// One value per column.
    fn each(&self, f: impl Fn(&Snapshot) -> Option<f64>) -> Vec<Option<f64>> {
        self.list().into_iter().map(|(_, s)| f(s)).collect()
    }

    fn stat(&self, key: &str) -> Vec<Option<f64>> {
        self.each(|s| s.stat(key))
    }
}

/// A report row: name, one value per column, digits shown.
type Row = (String, Vec<Option<f64>>, usize);

/// Writes `report.md`, `report.json` and `loss.svg` into `out`.
pub fn write_report(
    out: &Path,
    facts: &RunFacts,
    columns: Columns,
    metrics: &[serde_json::Value],
) -> std::io::Result<String> {
    let c = &columns;
    let row = |name: &str, values: Vec<Option<f64>>, digits: usize| -> Row {
        (name.to_string(), values, digits)
    };
    let rows: Vec<Row> = if facts.method == "reward" {
        // A reward model's held-out pairs, with TRL's metrics.
        [
            ("held-out loss", "loss", 4),
            ("accuracy (chosen scored above rejected)", "accuracy", 3),
            ("mean margin (chosen − rejected)", "margin", 4),
            ("mean reward", "mean_reward", 4),
            ("lowest reward", "min_reward", 4),
            ("highest reward", "max_reward", 4),
        ]
        .iter()
        .map(|&(name, key, d)| row(name, c.stat(key), d))
        .collect()
    } else if facts.method == "grpo" {
        // Held-out prompts, one greedy completion each.
        let mut rows = vec![row("mean reward (weighted sum)", c.stat("reward"), 4)];
        let names: std::collections::BTreeSet<String> = c
            .list()
            .iter()
            .filter_map(|(_, s)| s.heldout.as_ref()?.as_object().cloned())
            .flat_map(|o| o.keys().cloned().collect::<Vec<_>>())
            .filter(|k| k.starts_with("rewards/") && k.ends_with("/mean"))
            .collect();
        for k in names {
            let name = k.trim_start_matches("rewards/").trim_end_matches("/mean");
            rows.push(row(&format!("reward: {name}"), c.stat(&k), 4));
        }
        rows.push(row(
            "completion length (tokens)",
            c.stat("completions/mean_length"),
            1,
        ));
        rows.push(row(
            "general-text perplexity",
            c.each(|s| s.general_perplexity),
            4,
        ));
        rows
    } else {
        let mut rows = vec![
            row("held-out loss", c.stat("loss"), 4),
            row("held-out perplexity", c.stat("perplexity"), 3),
            row("token accuracy", c.stat("accuracy"), 3),
            row("exact match", c.each(|s| s.exact_match), 3),
            row(
                "general-text perplexity",
                c.each(|s| s.general_perplexity),
                4,
            ),
        ];
        // Preference metrics, where the held-out set is pairs.
        let pairs = [
            (
                "reward accuracy (chosen above rejected)",
                "rewards/accuracies",
                3,
            ),
            ("reward margin", "rewards/margins", 4),
            ("log-probability of chosen", "logps/chosen", 3),
            ("log-probability of rejected", "logps/rejected", 3),
        ];
        rows.extend(pairs.iter().filter_map(|&(name, key, d)| {
            let values = c.stat(key);
            values
                .iter()
                .any(Option::is_some)
                .then(|| row(name, values, d))
        }));
        rows
    };
    finish(out, facts, columns, metrics, rows)
}

/// Writes the report files with `rows`.
fn finish(
    out: &Path,
    facts: &RunFacts,
    columns: Columns,
    metrics: &[serde_json::Value],
    rows: Vec<Row>,
) -> std::io::Result<String> {
    let mut md = String::from("# Skillet fine-tuning report\n\n");
    md += &format!(
        "- model: `{}`\n- method: {}\n- data: `{}` ({} train, {} held-out {}; {} truncated)\n- trainable parameters: {}\n- {} steps, {} trained tokens, {:.0} s ({:.1} tokens/s), {} products\n\n",
        facts.model,
        facts.method,
        facts.train_file,
        facts.train_examples,
        facts.valid_examples,
        match facts.method.as_str() {
            "sft" => "examples",
            "grpo" => "prompts",
            _ => "pairs",
        },
        facts.truncated,
        facts.trainable_parameters,
        facts.steps,
        facts.trained_tokens,
        facts.train_seconds,
        facts.trained_tokens as f64 / facts.train_seconds.max(1e-9),
        facts.precision
    );
    let list = columns.list();
    md += "| metric |";
    for (heading, _) in &list {
        md += &format!(" {heading} |");
    }
    md += "\n|---|";
    md += &"---|".repeat(list.len());
    md += "\n";
    for (name, values, d) in rows {
        md += &format!("| {name} |");
        for v in values {
            md += &format!(" {} |", fmt(v, d));
        }
        md += "\n";
    }
    if columns.start.is_some() {
        md += "\nbase: the model without an adapter; start: the adapter training began from (`init_adapter`).\n";
    }
    md += "\n![training and validation loss](loss.svg)\n";
    std::fs::write(out.join("report.md"), &md)?;
    let mut json = serde_json::json!({"run": facts});
    for (heading, snapshot) in &list {
        json[*heading] = serde_json::to_value(snapshot).expect("snapshots serialize");
    }
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json).expect("json") + "\n",
    )?;
    std::fs::write(out.join("loss.svg"), loss_svg(metrics))?;
    Ok(md)
}

/// Training loss per step (and validation loss where measured) as an SVG line chart.
pub fn loss_svg(metrics: &[serde_json::Value]) -> String {
    let pick = |kind: &str, key: &str| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter(|m| m["kind"] == kind)
            .filter_map(|m| {
                Some((
                    m["step"].as_f64()?,
                    if key == "val" {
                        m["stats"]["loss"].as_f64()?
                    } else {
                        m[key].as_f64()?
                    },
                ))
            })
            .collect()
    };
    let train = pick("train", "loss");
    let valid = pick("eval", "val");
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let all: Vec<&(f64, f64)> = train.iter().chain(&valid).collect();
    let max_x = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = all.iter().map(|p| p.1).fold(f64::MIN, f64::max).max(1e-9);
    let min_y = all.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(max_y);
    let span = (max_y - min_y).max(1e-9);
    let x = |v: f64| pad + (w - 2.0 * pad) * v / max_x;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - min_y) / span;
    let line = |pts: &[(f64, f64)]| {
        pts.iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{t}\" text-anchor=\"middle\">step (max {max_x})</text>\n\
         <text x=\"8\" y=\"{pad}\">{max_y:.3}</text>\n<text x=\"8\" y=\"{b}\">{min_y:.3}</text>\n",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        t = h - 12.0,
    );
    svg += &format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n",
        line(&train)
    );
    if !valid.is_empty() {
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"{}\"/>\n",
            line(&valid)
        );
        for &(a, b) in &valid {
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>\n",
                x(a),
                y(b)
            );
        }
    }
    svg += &format!(
        "<text x=\"{}\" y=\"20\" fill=\"#1f77b4\">training loss</text><text x=\"{}\" y=\"20\" fill=\"#d62728\">validation loss</text>\n</svg>\n",
        pad,
        pad + 120.0
    );
    svg
}
