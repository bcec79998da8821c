//! `skillet train` with `[method] type = "dpo"` end to end on a tiny random
//! GGUF model: the first step's loss is ln 2, TRL's metrics are logged and
//! reported, the reference log-probabilities are saved and a resume reuses
//! them to reach the same adapter, and bad pairs stop the run before
//! anything is written.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_resumes_exactly, run_metrics, skillet, tiny_gguf};
use skillet_gguf::GgmlType;

fn pair_line(i: usize) -> String {
    serde_json::json!({
        "input": {"messages": [{"role": "user", "content": format!("say {i}")}]},
        "preferred_output": [{"role": "assistant", "content": format!("ok {}", i % 3)}],
        "non_preferred_output": [{"role": "assistant", "content": format!("no {} then", i % 5)}],
    })
    .to_string()
}

fn write_pairs(dir: &Path, name: &str, n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n).map(pair_line).collect();
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn setup(dir: &Path) -> PathBuf {
    let model = dir.join("tiny.gguf");
    tiny_gguf(&model, GgmlType::Q8_0, vec![]);
    let train = write_pairs(dir, "train.jsonl", 8);
    let valid = write_pairs(dir, "valid.jsonl", 3);
    let config = dir.join("run.toml");
    let text = format!(
        "model = {model:?}\noutput_dir = {:?}\nseed = 3\n[data]\ntrain = {train:?}\nvalidation = {valid:?}\nmax_seq_len = 64\n\
         [lora]\nr = 4\nalpha = 8\ntargets = \"all-linear\"\n[train]\nmax_steps = 4\nbatch_size = 2\nlr = 1e-2\n\
         [eval]\nevery = 2\nsave_every = 2\nmax_new_tokens = 4\n[method]\ntype = \"dpo\"\nbeta = 0.1\n",
        dir.join("out"),
    );
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn dpo_trains_logs_trl_metrics_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let r = skillet(&["train", config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("out");
    let train = run_metrics(&out, "train");
    assert_eq!(train.len(), 4);
    // The policy starts as the reference (B = 0, no dropout): ln 2 exactly.
    let first = train[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
    assert_eq!(train[0]["metrics"]["rewards/margins"].as_f64(), Some(0.0));
    assert!(train[3]["metrics"]["rewards/accuracies"].as_f64().is_some());
    assert!(
        train[3]["loss"].as_f64().unwrap() < first,
        "DPO did not lower its loss"
    );
    let evals = run_metrics(&out, "eval");
    assert_eq!(evals.len(), 2);
    assert!(evals[1]["stats"]["rewards/margins"].as_f64().unwrap() != 0.0);
    assert!(out.join("reference_logps.json").exists());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("- method: dpo")
            && report.contains("| reward accuracy (chosen above rejected) |")
            && report.contains("| exact match |"),
        "{report}"
    );

    // Killed after step 2: the resume reads the saved reference back and
    // ends at the same adapter.
    let saved = std::fs::read(out.join("reference_logps.json")).unwrap();
    assert_resumes_exactly(&out, "adapter", "adapter_model.safetensors");
    assert_eq!(
        std::fs::read(out.join("reference_logps.json")).unwrap(),
        saved
    );
}

/// DPO in full fine-tuning: the reference is the starting model (its
/// log-probabilities computed before training), the model folder is
/// written, and a resume ends at the same weights.
#[test]
fn dpo_full_fine_tuning_starts_at_ln_2_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let set = ["--set", "train.tuning=\"full\"", "--set", "train.lr=1e-4"];
    let r = skillet(&[
        "train",
        config.to_str().unwrap(),
        set[0],
        set[1],
        set[2],
        set[3],
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("out");
    let train = run_metrics(&out, "train");
    let first = train[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
    assert!(
        train[3]["loss"].as_f64().unwrap() < first,
        "DPO did not lower its loss"
    );
    assert_resumes_exactly(&out, "model", "model.safetensors");
}

#[test]
fn bad_pairs_are_reported_with_lines_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let train = dir.path().join("train.jsonl");
    let good = pair_line(0);
    let long = serde_json::json!({
        "input": {"messages": [{"role": "user", "content": "x ".repeat(80)}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    });
    std::fs::write(
        &train,
        format!(
            "{good}\n{}\n{good}\n{long}\n",
            r#"{"input":{"messages":[{"role":"user","content":"q"}]},"preferred_output":[{"role":"assistant","content":"a"}]}"#
        ),
    )
    .unwrap();
    let r = skillet(&["train", config.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    let shown = train.display();
    assert!(
        r.stderr.contains(&format!("{shown}:2: [missing_field]")),
        "{}",
        r.stderr
    );
    assert!(
        !dir.path().join("out").exists(),
        "the output folder was written"
    );
    // With line 2 fixed, the pair whose answers are cut away is reported.
    std::fs::write(&train, format!("{good}\n{good}\n{good}\n{long}\n")).unwrap();
    let r = skillet(&["train", config.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains(&format!("{shown}:4: [no_trainable_tokens]")),
        "{}",
        r.stderr
    );
    assert!(
        !dir.path().join("out").exists(),
        "the output folder was written"
    );
}

#[test]
fn data_check_shows_both_sides_of_each_pair() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, GgmlType::Q8_0, vec![]);
    let pairs = write_pairs(dir.path(), "pairs.jsonl", 5);
    let j = common::skillet_json(&[
        "data",
        "check",
        pairs.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        (j["pairs"].as_u64(), j["format"].as_str()),
        (Some(5), Some("openai"))
    );
    let s = &j["samples"][0];
    let (chosen, rejected) = (
        s["chosen"].as_str().unwrap(),
        s["rejected"].as_str().unwrap(),
    );
    assert!(chosen.contains("[[ok 0"), "{chosen}");
    assert!(rejected.contains("[[no 0 then"), "{rejected}");
    // Both sides share the prompt: everything before the marked span.
    assert_eq!(chosen.split("[[").next(), rejected.split("[[").next());
    assert!(
        j["chosen_tokens"]["max"].as_u64().unwrap() < j["rejected_tokens"]["max"].as_u64().unwrap()
    );
}
