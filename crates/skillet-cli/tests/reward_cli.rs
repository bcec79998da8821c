//! `skillet train` with `[method] type = "reward"` and `skillet reward`,
//! end to end on a tiny random GGUF model: TRL's metrics are logged and
//! reported, the adapter is saved in PEFT's sequence-classification form
//! with its `score` head, a resume reaches the same adapter, and
//! `skillet reward` scores pairs, conversations and texts with the tokens
//! training saw.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_resumes_exactly, run_metrics, skillet, tiny_gguf};
use skillet_gguf::GgmlType;

fn pair_line(i: usize) -> serde_json::Value {
    serde_json::json!({
        "prompt": [{"role": "user", "content": format!("say {i}")}],
        "chosen": [{"role": "assistant", "content": format!("ok {}", i % 3)}],
        "rejected": [{"role": "assistant", "content": format!("no {} then", i % 5)}],
        "margin": (i % 2) as f64 * 0.5,
    })
}

fn write_lines(dir: &Path, name: &str, lines: &[serde_json::Value]) -> PathBuf {
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let p = dir.join(name);
    std::fs::write(&p, text.join("\n") + "\n").unwrap();
    p
}

fn setup(dir: &Path) -> PathBuf {
    let model = dir.join("tiny.gguf");
    tiny_gguf(&model, GgmlType::Q8_0, vec![]);
    let train = write_lines(
        dir,
        "train.jsonl",
        &(0..8).map(pair_line).collect::<Vec<_>>(),
    );
    let valid = write_lines(
        dir,
        "valid.jsonl",
        &(8..11).map(pair_line).collect::<Vec<_>>(),
    );
    let config = dir.join("run.toml");
    let text = format!(
        "model = {model:?}\noutput_dir = {:?}\nseed = 3\n[data]\ntrain = {train:?}\nvalidation = {valid:?}\nmax_seq_len = 64\n\
         [lora]\nr = 4\nalpha = 8\ntargets = \"all-linear\"\n[train]\nmax_steps = 4\nbatch_size = 2\nlr = 1e-2\nprecision = \"f32\"\n\
         [eval]\nevery = 2\nsave_every = 2\n[method]\ntype = \"reward\"\ncenter_rewards_coefficient = 0.01\n",
        dir.join("out"),
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A reward model in full fine-tuning: every weight and the head trained,
/// saved as one sequence-classification model folder that `skillet
/// reward --model` scores alone (matching the report), and that a GRPO
/// run takes as `model = ...`; a resume ends at the same weights.
#[test]
fn full_reward_model_is_a_model_folder_that_scores_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let r = skillet(&[
        "train",
        config.to_str().unwrap(),
        "--set",
        "train.tuning=\"full\"",
        "--set",
        "train.lr=1e-3",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("out");
    let folder = out.join("model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    assert!(config["pad_token_id"].as_u64().is_some());
    let tensors =
        candle_core::safetensors::load(folder.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(tensors["score.weight"].dims(), &[1, 64]);
    let valid = dir.path().join("valid.jsonl");
    let r = skillet(&[
        "reward",
        "--model",
        folder.to_str().unwrap(),
        "--data",
        valid.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pairs = json(&r.stdout);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let held = &report["tuned"]["heldout"];
    for (cli, key) in [("accuracy", "accuracy"), ("mean_margin", "margin")] {
        let (x, y) = (pairs[cli].as_f64().unwrap(), held[key].as_f64().unwrap());
        assert!((x - y).abs() < 1e-5, "{cli}: {x} vs report {y}");
    }
    // Without an adapter, a plain model is refused clearly.
    let r = skillet(&[
        "reward",
        "--model",
        dir.path().join("tiny.gguf").to_str().unwrap(),
        "--text",
        "hi",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("score.weight"), "{}", r.stderr);

    // GRPO rewarded by the whole reward model.
    let prompts: Vec<serde_json::Value> = (0..4)
        .map(|i| serde_json::json!({"messages": [{"role": "user", "content": format!("say {i}")}]}))
        .collect();
    let prompts = write_lines(dir.path(), "prompts.jsonl", &prompts);
    let grpo = dir.path().join("grpo.toml");
    std::fs::write(
        &grpo,
        format!(
            "model = {:?}\noutput_dir = {:?}\n[data]\ntrain = {prompts:?}\nmax_seq_len = 64\n\
             [train]\nmax_steps = 1\nbatch_size = 4\n[eval]\ngenerate = false\n\
             [method]\ntype = \"grpo\"\nnum_generations = 2\nmax_completion_length = 4\n\
             [[method.rewards]]\ntype = \"reward_model\"\nmodel = {folder:?}\n",
            dir.path().join("tiny.gguf"),
            dir.path().join("grpo-out"),
        ),
    )
    .unwrap();
    let r = skillet(&["train", grpo.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let metrics = std::fs::read_to_string(dir.path().join("grpo-out/metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(
        step["metrics"]["rewards/reward_model/mean"]
            .as_f64()
            .is_some(),
        "{step}"
    );

    assert_resumes_exactly(&out, "model", "model.safetensors");
}

#[test]
fn reward_model_trains_scores_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let r = skillet(&["train", config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = dir.path().join("out");
    let train = run_metrics(&out, "train");
    assert_eq!(train.len(), 4);
    for name in ["accuracy", "margin", "mean_reward"] {
        assert!(train[0]["metrics"][name].as_f64().is_some(), "{name}");
    }
    let evals = run_metrics(&out, "eval");
    assert_eq!(evals.len(), 2);
    assert!(evals[1]["stats"]["min_reward"].as_f64().is_some());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("- method: reward")
            && report.contains("held-out pairs")
            && report.contains("| accuracy (chosen scored above rejected) |")
            && !report.contains("exact match"),
        "{report}"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));

    // `skillet reward` on the held-out pairs agrees with the report.
    let model = dir.path().join("tiny.gguf");
    let (m, a) = (model.to_str().unwrap(), out.join("adapter"));
    let valid = dir.path().join("valid.jsonl");
    let r = skillet(&[
        "reward",
        "--model",
        m,
        "--adapter",
        a.to_str().unwrap(),
        "--data",
        valid.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pairs = json(&r.stdout);
    assert_eq!(pairs["pairs"], 3);
    let tuned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let held = &tuned["tuned"]["heldout"];
    for (cli, report) in [("accuracy", "accuracy"), ("mean_margin", "margin")] {
        let (x, y) = (pairs[cli].as_f64().unwrap(), held[report].as_f64().unwrap());
        assert!((x - y).abs() < 1e-5, "{cli}: {x} vs report {y}");
    }
    let (x, y) = (
        pairs["rewards"]["max"].as_f64().unwrap(),
        held["max_reward"].as_f64().unwrap(),
    );
    assert!((x - y).abs() < 1e-5, "max reward: {x} vs report {y}");

    // A conversation ending in the chosen answer scores as the pair's chosen side.
    let p = pair_line(8);
    let mut messages = p["prompt"].as_array().unwrap().clone();
    messages.extend(p["chosen"].as_array().unwrap().iter().cloned());
    let chats = write_lines(
        dir.path(),
        "chats.jsonl",
        &[serde_json::json!({ "messages": messages })],
    );
    let r = skillet(&[
        "reward",
        "--model",
        m,
        "--adapter",
        a.to_str().unwrap(),
        "--data",
        chats.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got = json(&r.stdout)["each"][0]["reward"].as_f64().unwrap();
    let want = pairs["each"][0]["chosen"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Texts, one score each; plain text output too.
    let r = skillet(&[
        "reward",
        "--model",
        m,
        "--adapter",
        a.to_str().unwrap(),
        "--text",
        "hello",
        "--text",
        "hello there",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = json(&r.stdout);
    assert_eq!(s["sequences"], 2);
    assert_ne!(s["each"][0]["reward"], s["each"][1]["reward"]);
    let r = skillet(&[
        "reward",
        "--model",
        m,
        "--adapter",
        a.to_str().unwrap(),
        "--data",
        valid.to_str().unwrap(),
    ]);
    assert!(
        r.stdout.contains("accuracy") && r.stdout.contains("mean margin"),
        "{}",
        r.stdout
    );
    // A conversation that does not end with an answer is refused with its line.
    let bad = write_lines(
        dir.path(),
        "bad.jsonl",
        &[serde_json::json!({ "messages": [{"role": "user", "content": "hi"}] })],
    );
    let r = skillet(&[
        "reward",
        "--model",
        m,
        "--adapter",
        a.to_str().unwrap(),
        "--data",
        bad.to_str().unwrap(),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("bad.jsonl:1:") && r.stderr.contains("assistant"),
        "{}",
        r.stderr
    );
    // A LoRA-only command refuses the reward adapter instead of dropping its head.
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello there, hello").unwrap();
    let r = skillet(&[
        "score",
        "--model",
        m,
        "--adapter",
        a.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("score.weight"), "{}", r.stderr);

    // Killed after step 2: the resume reads the head back from the
    // checkpoint and ends at the same adapter.
    assert_resumes_exactly(&out, "adapter", "adapter_model.safetensors");
}
