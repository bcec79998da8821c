//! The CLI contract on a tiny random GGUF model (fast, no download).

mod common;

use common::{skillet, skillet_json, tiny_gguf};
use skillet_gguf::GgmlType;

#[test]
fn json_outputs_have_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    tiny_gguf(&p, GgmlType::Q8_0, vec![]);
    let m = p.to_str().unwrap();

    let t = skillet_json(&["tokenize", "--model", m, "--json", "<|im_start|>hi"]);
    assert_eq!(t["ids"], serde_json::json!([256, 104, 105]));
    assert_eq!(t["tokens"], serde_json::json!(["<|im_start|>", "h", "i"]));

    let f = dir.path().join("text.txt");
    std::fs::write(&f, "a small text to score").unwrap();
    let s = skillet_json(&[
        "score",
        "--model",
        m,
        "--file",
        f.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(s["tokens"], 21);
    assert_eq!(s["predicted"], 20);
    assert_eq!(s["argmax"].as_array().unwrap().len(), 21);
    let loss = s["mean_loss"].as_f64().unwrap();
    // A random model over 258 tokens is near-uniform: loss close to ln(258).
    assert!((loss - 258f64.ln()).abs() < 1.0, "{loss}");
    assert!((s["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6);

    let g = skillet_json(&[
        "generate",
        "--model",
        m,
        "--chat",
        "--system",
        "be brief",
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
        "--json",
    ]);
    let keys: Vec<&String> = g.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "completion_tokens",
            "finish_reason",
            "ids",
            "prompt_tokens",
            "text"
        ]
    );
    // "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    // One token per byte (no merges) plus the three specials of each turn.
    let bytes = "system\nbe brief".len() + 1 + "user\nhi".len() + 1 + "assistant\n".len();
    assert_eq!(g["prompt_tokens"].as_u64().unwrap() as usize, bytes + 5);
    assert!(g["completion_tokens"].as_u64().unwrap() <= 5);

    // --logprobs: one entry per new token; greedy picks the best of the top.
    let g = skillet_json(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--json",
        "--logprobs",
        "3",
    ]);
    let lps = g["logprobs"].as_array().unwrap();
    let ids = g["ids"].as_array().unwrap();
    assert_eq!(lps.len(), ids.len());
    for (lp, id) in lps.iter().zip(ids) {
        assert_eq!(&lp["id"], id);
        let top = lp["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(&top[0][0], id);
        let v: Vec<f64> = top.iter().map(|t| t[1].as_f64().unwrap()).collect();
        assert_eq!(v[0], lp["logprob"].as_f64().unwrap());
        assert!(v[0] >= v[1] && v[1] >= v[2]);
        // The best of 258 tokens has at least 1/258; a random model is
        // near-uniform, so not much more.
        let uniform = -(258f64.ln());
        assert!(v[0] >= uniform && v[0] < uniform + 2.0, "{v:?}");
        assert!(v.iter().map(|l| l.exp()).sum::<f64>() <= 1.0);
    }
    let r = skillet(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--logprobs",
        "2",
    ]);
    assert_ne!(r.code, 0, "--logprobs needs --json");

    let i = skillet_json(&["inspect", m, "--json"]);
    assert_eq!(i["tensor_types"]["Q8_0"], 15);
    assert_eq!(i["format"], "gguf");
}

#[test]
fn chat_needs_a_template() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    tiny_gguf(
        &p,
        GgmlType::F32,
        vec![(
            "tokenizer.chat_template".into(),
            skillet_gguf::Value::U32(0),
        )],
    );
    let r = skillet(&[
        "generate",
        "--model",
        p.to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no chat template"), "{}", r.stderr);
}

#[test]
fn bench_prints_one_row_per_workload() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    tiny_gguf(&p, GgmlType::Q8_0, vec![]);
    for w in [
        "lora",
        "qlora",
        "full",
        "score",
        "decode",
        "prefill",
        "prefill-lora",
    ] {
        let o = skillet_json(&[
            "bench",
            "--model",
            p.to_str().unwrap(),
            "--workload",
            w,
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "1",
            "--json",
        ]);
        assert_eq!(o["workload"], w);
        assert!(o["tokens_per_s"].as_f64().unwrap() > 0.0, "{o}");
        assert!(o["peak_rss_mib"].as_f64().unwrap() > 0.0);
        assert!(o["mfu"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_writes_a_random_model_of_a_named_shape() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tiny.gguf");
    tiny_gguf(&src, GgmlType::F32, vec![]);
    let out = dir.path().join("random.gguf");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let r = skillet(&["bench", "--model", s, "--write-random", "tiny", "--out", o]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The shape's config, the source's tokenizer, Q4_1 blocks.
    let info = skillet_json(&["inspect", o, "--json"]);
    assert_eq!(info["vocab_size"], 512, "{info}");
    assert_eq!(info["hidden_size"], 64);
    assert_eq!(info["tensor_types"]["Q4_1"], 15);
    let src_info = skillet_json(&["inspect", s, "--json"]);
    assert_eq!(
        info["tokenizer_vocab_size"],
        src_info["tokenizer_vocab_size"]
    );
    let row = skillet_json(&[
        "bench",
        "--model",
        o,
        "--workload",
        "qlora",
        "--batch",
        "1",
        "--seq",
        "16",
        "--steps",
        "1",
        "--json",
    ]);
    assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
    let bad = skillet(&[
        "bench",
        "--model",
        s,
        "--write-random",
        "llama-9b",
        "--out",
        o,
    ]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("unknown model shape"), "{}", bad.stderr);
}
