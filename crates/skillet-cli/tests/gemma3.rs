//! Acceptance on Gemma 3 270M (Q4_K_M GGUF, fetched by
//! `scripts/fetch-model.sh gemma3`) against transformers' numbers in
//! fixtures/gemma3 (made by fixtures/gemma3/make.py): its SentencePiece
//! tokenizer, the loss and logits of a paragraph, greedy chat text, and a
//! LoRA run that lowers the loss.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{fetch_model, fixtures, read_json, skillet, skillet_json};
use skillet_gguf::GgufFile;
use skillet_tokenizer::Tokenizer;

fn gemma() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| fetch_model("gemma3")).clone()
}

#[test]
fn sentencepiece_tokenizer_matches_transformers() {
    let tok = Tokenizer::from_gguf(&GgufFile::open(gemma()).unwrap()).unwrap();
    let cases = read_json(&fixtures().join("gemma3/tokenize.json"));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(serde_json::json!(ids), case["ids"], "{text:?}");
        assert_eq!(
            serde_json::json!(tok.encode(text, true).unwrap()),
            case["ids_with_special"],
            "{text:?}"
        );
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            case["decoded"],
            "{text:?}"
        );
    }
    // Turns end on <end_of_turn> as well as <eos>.
    let end_of_turn = tok.token_to_id("<end_of_turn>").unwrap();
    assert!(tok.eos_ids().contains(&end_of_turn) && tok.eos_ids().contains(&1));
}

#[test]
fn score_matches_transformers() {
    let reference = read_json(&fixtures().join("gemma3/score.json"));
    let paragraph = fixtures().join("smollm2/paragraph.txt");
    let o = skillet_json(&[
        "score",
        "--model",
        gemma().to_str().unwrap(),
        "--file",
        paragraph.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o["tokens"], reference["tokens"]);
    let (got, want) = (
        o["mean_loss"].as_f64().unwrap(),
        reference["mean_loss"].as_f64().unwrap(),
    );
    let rel = (got - want).abs() / want;
    assert!(rel < 1e-3, "mean loss {got} vs transformers {want}");
    let (a, b) = (
        o["argmax"].as_array().unwrap(),
        reference["argmax"].as_array().unwrap(),
    );
    let agree = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / b.len() as f64;
    assert!(agree >= 0.95, "argmax agreement {agree}");
    eprintln!("gemma3: mean loss rel diff {rel:e}, argmax agreement {agree}");
}

#[test]
fn greedy_chat_generation_matches_transformers() {
    let reference = read_json(&fixtures().join("gemma3/generate.json"));
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let o = skillet_json(&[
            "generate",
            "--model",
            gemma().to_str().unwrap(),
            "--chat",
            "--prompt",
            prompt,
            "--max-tokens",
            "32",
            "--temperature",
            "0",
            "--json",
        ]);
        assert_eq!(
            o["prompt_tokens"].as_u64().unwrap() as usize,
            case["prompt_ids"].as_array().unwrap().len(),
            "{prompt:?}"
        );
        assert_eq!(o["ids"], case["new_ids"], "{prompt:?}: got {:?}", o["text"]);
        assert_eq!(o["text"], case["text"], "{prompt:?}");
    }
}

#[test]
fn lora_trains_on_gemma3() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ex = root.join("examples/contacts");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let sets = [
        format!("model={:?}", gemma().display().to_string()),
        format!("output_dir={:?}", out.display().to_string()),
        format!(
            "data.train={:?}",
            ex.join("train.jsonl").display().to_string()
        ),
        format!(
            "data.validation={:?}",
            ex.join("valid.jsonl").display().to_string()
        ),
        "train.max_steps=8".into(),
        "eval.generate=false".into(),
        format!(
            "eval.general={:?}",
            root.join("examples/general.txt").display().to_string()
        ),
    ];
    let config = ex.join("config.toml");
    let mut args = vec!["train", config.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let r = skillet(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = read_json(&out.join("report.json"));
    let loss = |w: &str| report[w]["heldout"]["loss"].as_f64().unwrap();
    assert!(
        loss("tuned") < loss("base"),
        "held-out loss {} -> {}",
        loss("base"),
        loss("tuned")
    );
    eprintln!("gemma3 held-out loss {} -> {}", loss("base"), loss("tuned"));
    // A PEFT adapter over Gemma's module names.
    let cfg = read_json(&out.join("adapter/adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
}
