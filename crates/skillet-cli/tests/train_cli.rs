//! `skillet train`, `eval`, `merge`, `data check` and `--adapter` end to
//! end on a tiny random GGUF model (fast, no download).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_resumes_exactly, read_json, skillet, skillet_json, tiny_gguf};
use skillet_gguf::GgmlType;

fn chat_line(q: &str, a: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
}

fn write_data(dir: &Path, name: &str, n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| chat_line(&format!("say {i}"), &format!("ok {}", i % 3)))
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    config: PathBuf,
}

fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, GgmlType::Q8_0, vec![]);
    let train = write_data(dir.path(), "train.jsonl", 12);
    let valid = write_data(dir.path(), "valid.jsonl", 4);
    let config = dir.path().join("run.toml");
    let text = format!(
        "model = {:?}\noutput_dir = {:?}\nseed = 3\n[data]\ntrain = {:?}\nvalidation = {:?}\nmax_seq_len = 64\n\
         [lora]\nr = 4\nalpha = 8\ndropout = 0.1\ntargets = \"all-linear\"\n[train]\nmax_steps = 4\nbatch_size = 2\ngrad_accum = 2\nlr = 1e-2\nwarmup_steps = 1\n\
         [eval]\nevery = 2\nsave_every = 2\nmax_new_tokens = 4\n{extra}",
        model,
        dir.path().join("out"),
        train,
        valid
    );
    std::fs::write(&config, text).unwrap();
    Setup { dir, model, config }
}

fn train(s: &Setup, args: &[&str]) -> common::Run {
    let mut all = vec!["train", s.config.to_str().unwrap()];
    all.extend_from_slice(args);
    skillet(&all)
}

#[test]
fn trains_writes_a_peft_adapter_and_a_report_and_resumes_exactly() {
    let s = setup("");
    let r = train(&s, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = s.dir.path().join("out");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "report.md",
        "report.json",
        "loss.svg",
        "base_eval.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| held-out loss |") && report.contains("| exact match |"),
        "{report}"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            cfg["peft_type"].as_str(),
            cfg["r"].as_u64(),
            cfg["target_modules"].as_str()
        ),
        (Some("LORA"), Some(4), Some("all-linear"))
    );
    let tensors = candle_core::safetensors::load(
        out.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[4usize, 64][..], &[64usize, 4][..]));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"train\""))
            .count(),
        4
    );
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"eval\""))
            .count(),
        2
    );

    // A run killed after step 2: drop everything written after it, resume.
    assert_resumes_exactly(&out, "adapter", "adapter_model.safetensors");

    // A non-empty output folder is not silently reused.
    let r = train(&s, &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--resume"), "{}", r.stderr);
}

/// `train.tuning = "full"`: every weight trained and saved as a Hugging
/// Face folder that Skillet loads as a model (its held-out loss is the
/// report's), checkpoints as model folders, an exact resume.
#[test]
fn full_fine_tuning_saves_a_model_folder_and_resumes_exactly() {
    let s = setup("");
    let full = ["--set", "train.tuning=\"full\"", "--set", "train.lr=1e-3"];
    let r = train(&s, &full);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = s.dir.path().join("out");
    for f in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "checkpoints/step-000002/model.safetensors",
        "checkpoints/step-000002/optimizer.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(!out.join("adapter").exists());
    let (mid, last) = (
        saved_weights(&out.join("checkpoints/step-000002")),
        saved_weights(&out.join("model")),
    );
    // Embeddings, norms and projections all move between steps 2 and 4.
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        assert!(
            max_abs_diff(&mid[name], &last[name]) > 0.0,
            "{name} did not change"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let tuned = report["tuned"]["heldout"]["loss"].as_f64().unwrap();
    assert!(tuned < report["base"]["heldout"]["loss"].as_f64().unwrap());
    // Every saved weight is trained (a tied head counted once, with its
    // embedding).
    let saved: usize = last.values().map(|t| t.elem_count()).sum();
    assert_eq!(report["run"]["trainable_parameters"], saved);
    assert!(!last.contains_key("lm_head.weight") || saved > 0);
    // The saved folder is the trained model.
    let e = skillet_json(&[
        "eval",
        "--model",
        out.join("model").to_str().unwrap(),
        "--data",
        s.dir.path().join("valid.jsonl").to_str().unwrap(),
        "--json",
    ]);
    let loss = e["heldout"]["loss"].as_f64().unwrap();
    assert!((loss - tuned).abs() <= 1e-4 * tuned, "{loss} vs {tuned}");

    // Killed after step 2: resumed from the checkpoint's model folder.
    assert_resumes_exactly(&out, "model", "model.safetensors");

    // What full fine-tuning cannot take says so.
    let r = train(
        &s,
        &[
            full[0],
            full[1],
            "--set",
            "lora.keep_base_quantized=true",
            "--overwrite",
        ],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("keep_base_quantized"), "{}", r.stderr);
}

/// `train.freeze_embeddings` and `train.freeze`: the frozen weights are
/// saved exactly as the base holds them, the others trained; the report
/// counts only the trained ones; resume stays exact; a pattern that
/// matches nothing, or freezing in a LoRA run, is refused.
#[test]
fn full_fine_tuning_freezes_embeddings_and_named_layers() {
    let s = setup("");
    let full = [
        "--set",
        "train.tuning=\"full\"",
        "--set",
        "train.lr=1e-3",
        "--set",
        "train.freeze_embeddings=true",
        "--set",
        r"train.freeze=['^model\.layers\.0\.', 'post_attention_layernorm']",
    ];
    let r = train(&s, &full);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = s.dir.path().join("out");
    let base_dir = s.dir.path().join("base");
    let r = skillet(&[
        "convert",
        "--model",
        s.model.to_str().unwrap(),
        "--out",
        base_dir.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (base, last) = (saved_weights(&base_dir), saved_weights(&out.join("model")));
    let mut keys: Vec<&String> = base.keys().collect();
    keys.sort();
    assert_eq!(keys, {
        let mut k: Vec<&String> = last.keys().collect();
        k.sort();
        k
    });
    let mut frozen = 0;
    for name in keys {
        let same = max_abs_diff(&base[name], &last[name]) == 0.0;
        let want_frozen = name == "model.embed_tokens.weight"
            || name.starts_with("model.layers.0.")
            || name.contains("post_attention_layernorm");
        assert_eq!(same, want_frozen, "{name}: frozen {same}");
        if want_frozen {
            frozen += base[name].elem_count();
        }
    }
    let saved: usize = last.values().map(|t| t.elem_count()).sum();
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["run"]["trainable_parameters"], saved - frozen);
    assert_resumes_exactly(&out, "model", "model.safetensors");

    let mut typo = full.to_vec();
    typo[7] = "train.freeze=['k_prj']";
    typo.push("--overwrite");
    let r = train(&s, &typo);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("matches no weight"), "{}", r.stderr);
    let r = train(
        &s,
        &["--set", "train.freeze_embeddings=true", "--overwrite"],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("full fine-tuning"), "{}", r.stderr);
}

/// The tensors of a model folder's `model.safetensors`.
fn saved_weights(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

/// The largest absolute difference between two tensors of one shape.
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn adapter_works_in_score_generate_eval_and_merge() {
    let s = setup("");
    let r = train(&s, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let adapter = s.dir.path().join("out/adapter");
    let m = s.model.to_str().unwrap();
    let text = s.dir.path().join("t.txt");
    std::fs::write(
        &text,
        "<|im_start|>user\nsay 5<|im_end|>\n<|im_start|>assistant\nok 2<|im_end|>\n",
    )
    .unwrap();
    let base = skillet_json(&[
        "score",
        "--model",
        m,
        "--file",
        text.to_str().unwrap(),
        "--json",
    ]);
    let adapted = skillet_json(&[
        "score",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--json",
    ]);
    assert_ne!(base["mean_loss"], adapted["mean_loss"]);

    let merged = s.dir.path().join("merged");
    let o = skillet_json(&[
        "merge",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o["dequantized_base"], true);
    assert_eq!(o["merged_modules"], 14);
    let from_merged = skillet_json(&[
        "score",
        "--model",
        merged.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--json",
    ]);
    let (x, y) = (
        from_merged["mean_loss"].as_f64().unwrap(),
        adapted["mean_loss"].as_f64().unwrap(),
    );
    assert!(
        (x - y).abs() < 1e-4 * y.abs().max(1.0),
        "merged {x} vs base+adapter {y}"
    );
    assert_eq!(from_merged["argmax"], adapted["argmax"]);

    let g = skillet_json(&[
        "generate",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--chat",
        "--prompt",
        "say 1",
        "--max-tokens",
        "3",
        "--json",
    ]);
    assert!(g["completion_tokens"].as_u64().unwrap() <= 3);

    let valid = s.dir.path().join("valid.jsonl");
    let general = s.dir.path().join("general.txt");
    std::fs::write(&general, "some general text for the forgetting check").unwrap();
    let e = skillet_json(&[
        "eval",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        valid.to_str().unwrap(),
        "--generate",
        "--max-new-tokens",
        "3",
        "--general",
        general.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(e["examples"], 4);
    assert!(e["heldout"]["loss"].as_f64().unwrap() > 0.0);
    assert_eq!(e["exact_match"]["examples"], 4);
    assert!(
        e["general"]["base"]["perplexity"].as_f64().unwrap() > 1.0
            && e["general"]["adapted"]["perplexity"].as_f64().unwrap() > 1.0
    );
}

fn first_step_loss(out: &Path) -> f64 {
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    first["loss"].as_f64().unwrap()
}

#[test]
fn init_adapter_starts_from_a_trained_adapter() {
    let s = setup("");
    assert_eq!(train(&s, &[]).code, 0);
    let first = s.dir.path().join("out");
    let second = s.dir.path().join("out2");
    let init = format!(
        "lora.init_adapter={:?}",
        first.join("adapter").display().to_string()
    );
    let out2 = format!("output_dir={:?}", second.display().to_string());
    let r = train(&s, &["--set", &init, "--set", &out2]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        first_step_loss(&second) < first_step_loss(&first),
        "training did not start from the adapter"
    );
    // The report's start column is the first run's result, measured again.
    let report = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
    };
    let (a, b) = (report(&first), report(&second));
    assert!(a.get("start").is_none());
    let loss = |v: &serde_json::Value| v["heldout"]["loss"].as_f64().unwrap();
    let (tuned, start) = (loss(&a["tuned"]), loss(&b["start"]));
    assert!((tuned - start).abs() <= 1e-4 * tuned, "{start} vs {tuned}");
    assert_eq!(loss(&a["base"]), loss(&b["base"]));
    let md = std::fs::read_to_string(second.join("report.md")).unwrap();
    assert!(md.contains("| metric | base | start | tuned |"), "{md}");
    let never = s.dir.path().join("never");
    let never_set = format!("output_dir={:?}", never.display().to_string());
    let r = train(
        &s,
        &[
            "--set",
            "lora.init_adapter=\"/nonexistent/adapter\"",
            "--set",
            &never_set,
        ],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("/nonexistent/adapter"), "{}", r.stderr);
    assert!(
        !never.exists(),
        "a bad init_adapter must not leave an output folder"
    );
}

#[test]
fn data_check_reports_lengths_and_marks_trained_tokens() {
    let s = setup("");
    let d = skillet_json(&[
        "data",
        "check",
        s.dir.path().join("valid.jsonl").to_str().unwrap(),
        "--model",
        s.model.to_str().unwrap(),
        "--show",
        "1",
        "--json",
    ]);
    assert_eq!(d["examples"], 4);
    assert_eq!(d["format"], "chat");
    assert_eq!(d["truncated"], 0);
    assert_eq!(
        d["samples"][0]["rendered"],
        "<|im_start|>user\nsay 0<|im_end|>\n<|im_start|>assistant\n[[ok 0<|im_end|>]]\n"
    );
}

/// Every kind of bad data stops `train` before anything is written, with
/// the line number and code of each problem.
#[test]
fn bad_data_is_reported_and_nothing_is_written() {
    let good = chat_line("q", "a");
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid_json"),
        ("[1, 2]".into(), "data_type"),
        (r#"{"messages": "nope"}"#.into(), "missing_messages_list"),
        (r#"{"messages":[{"role":"user"},{"role":"assistant","content":"a"}]}"#.into(), "message_missing_key"),
        (r#"{"messages":[{"role":"user","content":"q","tool_calls":[]},{"role":"assistant","content":"a"}]}"#.into(), "message_unrecognized_key"),
        (r#"{"messages":[{"role":"robot","content":"q"},{"role":"assistant","content":"a"}]}"#.into(), "unrecognized_role"),
        (r#"{"messages":[{"role":"user","content":""},{"role":"assistant","content":"a"}]}"#.into(), "missing_content"),
        (r#"{"messages":[{"role":"user","content":"q"}]}"#.into(), "example_missing_assistant_message"),
        (r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a","weight":0}]}"#.into(), "no_trainable_tokens"),
        (format!(r#"{{"messages":[{{"role":"user","content":"{}"}},{{"role":"assistant","content":"a"}}]}}"#, "x".repeat(100)), "no_trainable_tokens"),
    ];
    for (bad, code) in cases {
        let s = setup("");
        let train_file = s.dir.path().join("train.jsonl");
        std::fs::write(&train_file, format!("{good}\n{good}\n{bad}\n{good}\n")).unwrap();
        let r = train(&s, &[]);
        assert_ne!(r.code, 0, "{code}: training should fail");
        let expected = format!("{}:3: [{code}]", train_file.display());
        assert!(
            r.stderr.contains(&expected),
            "{code}: expected {expected:?} in {}",
            r.stderr
        );
        assert!(
            !s.dir.path().join("out").exists(),
            "{code}: the output folder was written"
        );
    }
    // An empty file too.
    let s = setup("");
    std::fs::write(s.dir.path().join("train.jsonl"), "\n").unwrap();
    let r = train(&s, &[]);
    assert!(r.stderr.contains("[empty_file]"), "{}", r.stderr);
    assert!(!s.dir.path().join("out").exists());
}

#[test]
fn dora_trains_resumes_exactly_and_merges_into_the_model() {
    let s = setup("");
    let r = train(&s, &["--set", "lora.use_dora=true"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = s.dir.path().join("out");
    let adapter = out.join("adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let magnitudes = tensors
        .keys()
        .filter(|k| k.ends_with(".lora_magnitude_vector"))
        .count();
    assert_eq!(magnitudes, 14, "one magnitude per adapted module");
    assert_resumes_exactly(&out, "adapter", "adapter_model.safetensors");

    // Base + DoRA adapter equals the merged export.
    let m = s.model.to_str().unwrap();
    let text = s.dir.path().join("t.txt");
    std::fs::write(
        &text,
        "<|im_start|>user\nsay 5<|im_end|>\n<|im_start|>assistant\nok 2<|im_end|>\n",
    )
    .unwrap();
    let score = |model: &str, adapter: Option<&Path>| {
        let mut args = vec!["score", "--model", model, "--file", text.to_str().unwrap()];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        args.push("--json");
        skillet_json(&args)["mean_loss"].as_f64().unwrap()
    };
    let adapted = score(m, Some(&adapter));
    assert_ne!(adapted, score(m, None));
    let merged = s.dir.path().join("merged.gguf");
    skillet_json(&[
        "export",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--type",
        "f32",
        "--out",
        merged.to_str().unwrap(),
        "--json",
    ]);
    let from_merged = score(merged.to_str().unwrap(), None);
    assert!(
        (from_merged - adapted).abs() < 1e-4 * adapted.abs().max(1.0),
        "merged {from_merged} vs base+DoRA {adapted}"
    );
    // llama.cpp's LoRA format has no magnitudes.
    let r = skillet(&[
        "export",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--format",
        "gguf-lora",
        "--out",
        s.dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("DoRA"), "{}", r.stderr);

    // DoRA on the quantized blocks themselves (QDoRA on a GGUF base).
    let r = train(
        &s,
        &[
            "--set",
            "lora.use_dora=true",
            "--set",
            "lora.keep_base_quantized=true",
            "--overwrite",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let (before, after) = (
        report["base"]["heldout"]["loss"].as_f64().unwrap(),
        report["tuned"]["heldout"]["loss"].as_f64().unwrap(),
    );
    assert!(after < before, "QDoRA held-out loss {before} -> {after}");
}

#[test]
fn qlora_on_a_dense_base_quantizes_it_to_nf4_trains_and_resumes_exactly() {
    // A dense (f32) base, quantized at load.
    let s = setup("");
    tiny_gguf(&s.model, GgmlType::F32, vec![]);
    let out = s.dir.path().join("out");
    let base_loss = |out: &std::path::Path| {
        let text = std::fs::read_to_string(out.join("base_eval.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["heldout"]["loss"].clone()
    };
    let r = train(&s, &["--set", "lora.r=2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dense = base_loss(&out);
    let r = train(&s, &["--set", "lora.quantize_base=\"nf4\"", "--overwrite"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The base the run evaluated (and trained over) is the NF4 one.
    assert!(dense.is_number());
    assert_ne!(base_loss(&out), dense);
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(cfg.contains("quantize_base = \"nf4\""), "{cfg}");
    assert_resumes_exactly(&out, "adapter", "adapter_model.safetensors");

    // A base already in GGML blocks is not quantized twice.
    tiny_gguf(&s.model, GgmlType::Q8_0, vec![]);
    let r = train(&s, &["--set", "lora.quantize_base=\"nf4\"", "--overwrite"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("already quantized"), "{}", r.stderr);
}
