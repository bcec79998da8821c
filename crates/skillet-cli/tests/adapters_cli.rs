//! Several adapters from the command line, on the tiny Llama of
//! fixtures/tiny-hf with the PEFT adapters of fixtures/peft/combine:
//! `--adapter A --adapter B:0.5` in score and generate equals the folder
//! `skillet merge` writes for the same list, `merge --combine` writes one
//! adapter that does what the list does, and bad lists are refused.

mod common;

use std::path::PathBuf;

use common::{expect_error, fixtures, read_json, skillet_json};

struct Setup {
    dir: tempfile::TempDir,
    model: String,
    text: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog, twice over",
    )
    .unwrap();
    Setup {
        model: fixtures().join("tiny-hf/llama").display().to_string(),
        text: text.display().to_string(),
        dir,
    }
}

fn adapter(name: &str) -> String {
    fixtures()
        .join("peft/combine")
        .join(name)
        .display()
        .to_string()
}

impl Setup {
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `skillet score` with `--adapter` for each of `adapters`.
    fn score(&self, model: &str, adapters: &[String]) -> serde_json::Value {
        let mut args = vec!["score", "--model", model, "--file", &self.text, "--json"];
        for a in adapters {
            args.extend(["--adapter", a.as_str()]);
        }
        skillet_json(&args)
    }

    fn generate(&self, model: &str, adapters: &[String]) -> serde_json::Value {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "the quick",
            "--max-tokens",
            "8",
            "--json",
        ];
        for a in adapters {
            args.extend(["--adapter", a.as_str()]);
        }
        skillet_json(&args)
    }

    fn merge(&self, adapters: &[String], extra: &[&str], out: &str) -> serde_json::Value {
        let out = self.out(out).display().to_string();
        let mut args = vec!["merge", "--model", &self.model, "--out", &out, "--json"];
        for a in adapters {
            args.extend(["--adapter", a.as_str()]);
        }
        args.extend(extra);
        skillet_json(&args)
    }
}

fn loss(v: &serde_json::Value) -> f64 {
    v["mean_loss"].as_f64().unwrap()
}

fn close(x: f64, y: f64) -> bool {
    (x - y).abs() < 1e-5 * y.abs().max(1.0)
}

#[test]
fn several_adapters_run_together_as_their_merge() {
    let s = setup();
    let base = s.score(&s.model, &[]);
    for (name, list) in [
        ("ab", vec![adapter("a"), format!("{}:0.5", adapter("b"))]),
        // A DoRA adapter with a LoRA adapter subtracted.
        ("ca", vec![adapter("c"), format!("{}:-0.7", adapter("a"))]),
    ] {
        let together = s.score(&s.model, &list);
        assert!(
            (loss(&together) - loss(&base)).abs() > 1e-3,
            "{name}: the adapters change the loss"
        );
        let o = s.merge(&list, &[], &format!("merged_{name}"));
        assert!(o["merged_modules"].as_u64().unwrap() > 0);
        let merged = s.out(&format!("merged_{name}")).display().to_string();
        let from_merged = s.score(&merged, &[]);
        assert!(
            close(loss(&from_merged), loss(&together)),
            "{name}: merged {} vs together {}",
            loss(&from_merged),
            loss(&together)
        );
        assert_eq!(from_merged["argmax"], together["argmax"], "{name}");
        // Greedy decoding (the cached path; the plain pair as one product
        // of concatenated factors) gives the merged model's tokens.
        let g = s.generate(&s.model, &list);
        let gm = s.generate(&merged, &[]);
        assert_eq!(g["ids"], gm["ids"], "{name}");
    }
    // The weight matters: b at 0.5 is not b at 1.
    let full = s.score(&s.model, &[adapter("a"), adapter("b")]);
    let half = s.score(&s.model, &[adapter("a"), format!("{}:0.5", adapter("b"))]);
    assert!((loss(&full) - loss(&half)).abs() > 1e-4);
}

#[test]
fn merge_combine_writes_one_adapter() {
    let s = setup();
    let list = vec![
        format!("{}:0.7", adapter("a")),
        format!("{}:0.3", adapter("b")),
    ];
    let together = s.score(&s.model, &list);
    // cat is the exact sum; so is svd at the sum's rank (q_proj has both
    // adapters, rank 4 + 4). linear (PEFT's rough approximation) and svd
    // at the default rank (the largest, 4) are near it, not on it.
    for (how, svd_rank, rank, exact) in [
        ("cat", None, 8, true),
        ("svd", Some("8"), 8, true),
        ("svd", None, 4, false),
        ("linear", None, 4, false),
    ] {
        let name = format!("combined_{how}_{rank}");
        let mut extra = vec!["--combine", how];
        extra.extend(svd_rank.iter().flat_map(|r| ["--svd-rank", r]));
        let o = s.merge(&list, &extra, &name);
        assert_eq!(o["combine"], how);
        assert_eq!(o["rank"], rank);
        assert_eq!(o["merged_modules"], 2 * 5, "q, v, down, k, up in 2 layers");
        let one = s.score(&s.model, &[s.out(&name).display().to_string()]);
        assert_eq!(
            close(loss(&one), loss(&together)),
            exact,
            "{how} rank {rank}: {} vs {}",
            loss(&one),
            loss(&together)
        );
        assert!((loss(&one) - loss(&together)).abs() < 0.05 * loss(&together));
    }
    // svd below the sum's rank: a rank-2 adapter, near the sum, not on it.
    let o = s.merge(&list, &["--combine", "svd", "--svd-rank", "2"], "svd2");
    assert_eq!(o["rank"], 2);
    let cfg = read_json(&s.out("svd2/adapter_config.json"));
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(2), Some(2.0))
    );
    // --combine needs no base model.
    let out = s.out("no_model").display().to_string();
    let (a, b) = (adapter("a"), adapter("b"));
    let o = skillet_json(&[
        "merge",
        "--adapter",
        &a,
        "--adapter",
        &b,
        "--combine",
        "cat",
        "--out",
        &out,
        "--json",
    ]);
    assert_eq!(o["rank"], 8);
}

#[test]
fn bad_adapter_lists_are_refused() {
    let s = setup();
    let out = s.out("x").display().to_string();
    let (a, c) = (adapter("a"), adapter("c"));
    let e = expect_error(&[
        "merge",
        "--adapter",
        &a,
        "--adapter",
        &c,
        "--combine",
        "cat",
        "--out",
        &out,
    ]);
    assert!(e.contains("DoRA"), "{e}");
    let r = common::skillet(&["merge", "--adapter", &a, "--out", &out]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--model"), "{}", r.stderr);
    let e = expect_error(&[
        "score",
        "--model",
        &s.model,
        "--file",
        &s.text,
        "--adapter",
        &a,
        "--adapter",
        "/no/such/adapter:0.5",
    ]);
    assert!(e.contains("/no/such/adapter"), "{e}");
    let e = expect_error(&[
        "export",
        "--model",
        &s.model,
        "--format",
        "gguf-lora",
        "--adapter",
        &a,
        "--adapter",
        &a,
        "--out",
        &out,
    ]);
    assert!(e.contains("one adapter"), "{e}");
    let weighted = format!("{a}:0.5");
    let e = expect_error(&[
        "export",
        "--model",
        &s.model,
        "--format",
        "gguf-lora",
        "--adapter",
        &weighted,
        "--out",
        &out,
    ]);
    assert!(e.contains("--lora-scaled"), "{e}");
}
