//! `skillet train` with `[method] type = "grpo"` end to end on a tiny
//! random GGUF model: completions are sampled and scored by built-in rules
//! and an external program, TRL's metrics are logged and reported, a
//! resume samples what the first run did and reaches the same adapter, and
//! a reward program that prints garbage, crashes or hangs stops the run
//! with a clear error.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_resumes_exactly, run_metrics, skillet, tiny_gguf};
use skillet_gguf::GgmlType;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn prompts(n: usize, from: usize) -> String {
    (from..from + n)
        .map(|i| {
            serde_json::json!({
                "messages": [{"role": "user", "content": format!("say {i}")}],
                "answer": format!("{}", i % 3),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// A run folder's config with `program` as the external reward's script.
fn setup(dir: &Path, program: &str, timeout: f64) -> PathBuf {
    let model = dir.join("tiny.gguf");
    if !model.exists() {
        tiny_gguf(&model, GgmlType::Q8_0, vec![]);
    }
    let train = write(dir, "train.jsonl", &prompts(8, 0));
    let valid = write(dir, "valid.jsonl", &prompts(3, 8));
    let script = write(dir, "score.py", program);
    let config = dir.join("run.toml");
    let text = format!(
        "model = {model:?}\noutput_dir = {:?}\nseed = 5\n[data]\ntrain = {train:?}\nvalidation = {valid:?}\nmax_seq_len = 64\n\
         [lora]\nr = 4\nalpha = 8\ntargets = \"all-linear\"\n[train]\nmax_steps = 4\nbatch_size = 4\ngrad_accum = 2\nlr = 5e-3\n\
         [eval]\nevery = 2\nsave_every = 2\n\
         [method]\ntype = \"grpo\"\nnum_generations = 4\nmax_completion_length = 8\nnum_iterations = 2\nbeta = 0.04\nepsilon_high = 0.28\n\
         [[method.rewards]]\ntype = \"exact_match\"\n\
         [[method.rewards]]\ntype = \"length_penalty\"\nmax_tokens = 4\nweight = 0.5\n\
         [[method.rewards]]\ntype = \"program\"\ncommand = [\"python3\", {script:?}]\ntimeout_s = {timeout}\n",
        dir.join("out"),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Rewards the number of distinct characters, from the JSON lines it reads.
const GOOD: &str = r#"import json, sys
for line in sys.stdin:
    item = json.loads(line)
    assert item["answer"] is not None and item["prompt"][-1]["role"] == "user"
    print(len(set(item["completion"])) / 10, flush=True)
"#;

#[test]
fn grpo_trains_logs_trl_metrics_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), GOOD, 30.0);
    let r = skillet(&["train", config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("out");
    let train = run_metrics(&out, "train");
    assert_eq!(train.len(), 4);
    for name in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio/region_mean",
        "rewards/exact_match/mean",
        "rewards/program/mean",
        "rewards/length_penalty/mean",
        "completions/mean_length",
        "completions/clipped_ratio",
    ] {
        assert!(
            train[0]["metrics"][name].as_f64().is_some(),
            "{name}: {}",
            train[0]
        );
    }
    // The first step's policy is the reference (B = 0) and the sampler:
    // no KL, no clipping. The second step reuses the samples
    // (num_iterations = 2), so its rewards are the same.
    assert_eq!(train[0]["metrics"]["kl"].as_f64(), Some(0.0));
    assert_eq!(
        train[0]["metrics"]["clip_ratio/region_mean"].as_f64(),
        Some(0.0)
    );
    assert_eq!(train[0]["metrics"]["reward"], train[1]["metrics"]["reward"]);
    assert!(train[1]["metrics"]["kl"].as_f64().unwrap() > 0.0);
    let evals = run_metrics(&out, "eval");
    assert_eq!(evals.len(), 2);
    assert!(evals[1]["stats"]["reward"].as_f64().is_some());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("- method: grpo")
            && report.contains("held-out prompts")
            && report.contains("| mean reward (weighted sum) |")
            && report.contains("| reward: exact_match |"),
        "{report}"
    );

    // Killed after step 2: the resume samples what the first run sampled
    // and ends at the same adapter.
    assert_resumes_exactly(&out, "adapter", "adapter_model.safetensors");
}

/// GRPO in full fine-tuning: the KL term's reference is a frozen copy of
/// the starting weights (no KL at the first step, some after), the model
/// folder is written, and a resume ends at the same weights.
#[test]
fn grpo_full_fine_tuning_keeps_a_frozen_reference_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), GOOD, 30.0);
    let r = skillet(&[
        "train",
        config.to_str().unwrap(),
        "--set",
        "train.tuning=\"full\"",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("out");
    let train = run_metrics(&out, "train");
    assert!(train[0]["metrics"]["kl"].as_f64().unwrap().abs() < 1e-6);
    assert!(train[1]["metrics"]["kl"].as_f64().unwrap() > 0.0);
    assert_resumes_exactly(&out, "model", "model.safetensors");
}

#[test]
fn bad_reward_programs_and_prompts_stop_the_run_clearly() {
    for (program, timeout, want) in [
        (
            "import sys\nfor l in sys.stdin: print('high', flush=True)\n",
            30.0,
            "expected one finite number",
        ),
        (
            "import sys\nfor l in sys.stdin: print('nan', flush=True)\n",
            30.0,
            "expected one finite number",
        ),
        (
            "import sys\nsys.stdin.readline()\nsys.exit(3)\n",
            30.0,
            "exited before answering",
        ),
        (
            "import sys, time\nfor l in sys.stdin: time.sleep(30)\n",
            1.0,
            "no answer within 1 s",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = setup(dir.path(), program, timeout);
        let r = skillet(&["train", config.to_str().unwrap()]);
        assert_ne!(r.code, 0, "{program}");
        assert!(
            r.stderr.contains("reward program") && r.stderr.contains(want),
            "{program}: {}",
            r.stderr
        );
    }
    // Bad prompt lines are reported with their numbers before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), GOOD, 30.0);
    let train = write(
        dir.path(),
        "train.jsonl",
        &(prompts(2, 0)
            + r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#
            + "\n"
            + &prompts(1, 0)
            + r#"{"prompt":"x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x x"}"#
            + "\n"),
    );
    let r = skillet(&["train", config.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    let shown = train.display();
    assert!(
        r.stderr.contains(&format!("{shown}:3: [invalid_prompt]")),
        "{}",
        r.stderr
    );
    assert!(!dir.path().join("out").exists());
}
