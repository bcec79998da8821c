//! `skillet export`: merged GGUF files of every type, Hugging Face folders
//! turned back into GGUF, and llama.cpp LoRA GGUF adapters, on a tiny model
//! with a random (non-zero) adapter.

mod common;

use std::path::{Path, PathBuf};

use common::{expect_error, skillet_json, tiny_gguf};
use skillet_adapters::{LoraAdapter, LoraSettings, LoraWeights, Targets, save_peft};
use skillet_gguf::{GgmlType, GgufFile, Value};
use skillet_models::{GgufWeights, LoadOptions, Model, ModelConfig, Rng};

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    adapter: PathBuf,
    text: PathBuf,
}

/// A tiny f32 GGUF and a rank-4 adapter on q, k, v and down with random
/// A and B (scale 2), so merging visibly changes the model.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, GgmlType::F32, vec![]);
    let file = GgufFile::open(&model).unwrap();
    let cfg = ModelConfig::from_gguf(&file).unwrap();
    let src = GgufWeights::new(std::sync::Arc::new(file), &cfg);
    let m = Model::load(cfg, &src, LoadOptions::default()).unwrap();
    let targets = ["q_proj", "k_proj", "v_proj", "down_proj"].map(String::from);
    let settings = LoraSettings::new(4, 8.0, 0.0, false, Targets::Names(targets.into())).unwrap();
    let mut rng = Rng::new(5);
    let mut random = |rows: usize, cols: usize| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 0.2)
            .collect();
        candle_core::Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu).unwrap()
    };
    let mut weights = LoraWeights::new();
    for info in skillet_models::CausalLm::modules(&m) {
        if settings.targets.matches(&info.name) {
            let a = random(4, info.in_features);
            let b = random(info.out_features, 4);
            weights.insert(info.name.clone(), (a, b));
        }
    }
    let lora = LoraAdapter::new(&m, &settings, 1, Some(&weights)).unwrap();
    let adapter = dir.path().join("adapter");
    save_peft(&lora, &adapter, None).unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "<|im_start|>user\nwhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\nfour<|im_end|>\n",
    )
    .unwrap();
    Setup {
        dir,
        model,
        adapter,
        text,
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn score(model: &Path, adapter: Option<&Path>, text: &Path) -> serde_json::Value {
    let mut args = vec![
        "score",
        "--model",
        path(model),
        "--file",
        path(text),
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", path(a)]);
    }
    skillet_json(&args)
}

fn export(s: &Setup, extra: &[&str], out: &Path) -> serde_json::Value {
    let mut args = vec![
        "export",
        "--model",
        path(&s.model),
        "--out",
        path(out),
        "--json",
    ];
    args.extend_from_slice(extra);
    skillet_json(&args)
}

fn f32s(file: &GgufFile, name: &str) -> Vec<f32> {
    let info = file
        .tensor(name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    assert_eq!(info.ggml_type, GgmlType::F32, "{name}");
    file.tensor_bytes(info)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn close(x: f64, y: f64, rel: f64) -> bool {
    (x - y).abs() <= rel * y.abs().max(1.0)
}

#[test]
fn merged_gguf_of_every_type_loads_and_matches_base_plus_adapter() {
    let s = setup();
    let adapted = score(&s.model, Some(&s.adapter), &s.text);
    let base = score(&s.model, None, &s.text);
    let want = adapted["mean_loss"].as_f64().unwrap();
    assert!(!close(base["mean_loss"].as_f64().unwrap(), want, 1e-3));
    for (ty, rel) in [
        ("f32", 1e-5),
        ("f16", 2e-3),
        ("bf16", 2e-2),
        ("q8_0", 2e-2),
        ("q6_k", 5e-2),
        ("q4_k_m", 0.1),
        ("q4_0", 0.1),
    ] {
        let out = s.dir.path().join(format!("merged-{ty}.gguf"));
        let o = export(&s, &["--adapter", path(&s.adapter), "--type", ty], &out);
        assert_eq!(o["merged_modules"], 8, "{o}");
        assert_eq!(o["file_type"], ty);
        let got = score(&out, None, &s.text)["mean_loss"].as_f64().unwrap();
        assert!(
            close(got, want, rel),
            "{ty}: merged {got} vs base+adapter {want}"
        );
        if ty == "f32" {
            assert_eq!(score(&out, None, &s.text)["argmax"], adapted["argmax"]);
        }
        // The tokenizer and template travel with the weights.
        let file = GgufFile::open(&out).unwrap();
        let orig = GgufFile::open(&s.model).unwrap();
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.pre",
            "tokenizer.chat_template",
        ] {
            assert_eq!(file.get(key), orig.get(key), "{ty}: {key}");
        }
    }
}

#[test]
fn quantized_types_follow_llama_quantize() {
    let s = setup();
    let out = s.dir.path().join("q4km.gguf");
    export(&s, &["--type", "q4_k_m"], &out);
    let file = GgufFile::open(&out).unwrap();
    let ty = |n: &str| file.tensor(n).unwrap().ggml_type;
    assert_eq!(file.get("general.file_type"), Some(&Value::U32(15)));
    // Two layers: both are in the first or last eighth, so v and down get
    // Q6_K; 64- and 96-wide rows are not whole 256-value super-blocks, so
    // Q4_K falls back to Q5_0 and Q6_K to Q8_0, as llama.cpp does.
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.1.ffn_down.weight"), GgmlType::Q8_0);
    // The tied embedding is the head: Q6_K, here Q8_0.
    assert_eq!(ty("token_embd.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
}

#[test]
fn hf_folder_exports_back_to_the_same_gguf_tokenizer() {
    let s = setup();
    let hf = s.dir.path().join("hf");
    let o = export(&s, &["--adapter", path(&s.adapter), "--format", "hf"], &hf);
    assert_eq!(o["format"], "hf");
    let gguf = s.dir.path().join("from-hf.gguf");
    let o = skillet_json(&[
        "export",
        "--model",
        path(&hf),
        "--type",
        "f32",
        "--out",
        path(&gguf),
        "--json",
    ]);
    assert_eq!(o["merged_modules"], 0);
    let want = score(&s.model, Some(&s.adapter), &s.text);
    let got = score(&gguf, None, &s.text);
    let (x, y) = (
        got["mean_loss"].as_f64().unwrap(),
        want["mean_loss"].as_f64().unwrap(),
    );
    assert!(close(x, y, 1e-5), "{x} vs {y}");
    let file = GgufFile::open(&gguf).unwrap();
    let orig = GgufFile::open(&s.model).unwrap();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ] {
        assert_eq!(file.get(key), orig.get(key), "{key}");
    }
}

#[test]
fn gguf_lora_is_what_llama_cpp_adds_to_the_permuted_base() {
    let s = setup();
    let lora = s.dir.path().join("lora.gguf");
    let o = export(
        &s,
        &["--adapter", path(&s.adapter), "--format", "gguf-lora"],
        &lora,
    );
    assert_eq!(o["merged_modules"], 8);
    let base = s.dir.path().join("base.gguf");
    export(&s, &["--type", "f32"], &base);
    let merged = s.dir.path().join("merged.gguf");
    export(
        &s,
        &["--adapter", path(&s.adapter), "--type", "f32"],
        &merged,
    );

    let (lora, base, merged) = (
        GgufFile::open(&lora).unwrap(),
        GgufFile::open(&base).unwrap(),
        GgufFile::open(&merged).unwrap(),
    );
    assert_eq!(lora.get_str("general.type").unwrap(), "adapter");
    assert_eq!(lora.get_str("adapter.type").unwrap(), "lora");
    assert_eq!(lora.get_str("general.architecture").unwrap(), "llama");
    let Some(Value::F32(alpha)) = lora.get("adapter.lora.alpha") else {
        panic!("no alpha");
    };
    assert_eq!(*alpha, 8.0);
    assert_eq!(lora.tensors().len(), 16);
    // llama.cpp computes W + alpha/r · B·A on the GGUF's (row-permuted)
    // weights: that must equal the merged export, tensor by tensor.
    for layer in 0..2 {
        for name in ["attn_q", "attn_k", "attn_v", "ffn_down"] {
            let w = format!("blk.{layer}.{name}.weight");
            let (a, b) = (
                f32s(&lora, &format!("{w}.lora_a")),
                f32s(&lora, &format!("{w}.lora_b")),
            );
            let (w0, w1) = (f32s(&base, &w), f32s(&merged, &w));
            let (r, out) = (4, b.len() / 4);
            let inp = a.len() / r;
            assert_eq!(w0.len(), out * inp, "{w}");
            let scale = *alpha / r as f32;
            for i in 0..out {
                for j in 0..inp {
                    let ba: f32 = (0..r).map(|k| b[i * r + k] * a[k * inp + j]).sum();
                    let want = w0[i * inp + j] + scale * ba;
                    let got = w1[i * inp + j];
                    assert!((got - want).abs() < 1e-5, "{w}[{i},{j}]: {got} vs {want}");
                }
            }
        }
    }
}

#[test]
fn bad_exports_get_one_clear_error() {
    let s = setup();
    let out = s.dir.path().join("x.gguf");
    let e = expect_error(&[
        "export",
        "--model",
        path(&s.model),
        "--format",
        "gguf-lora",
        "--out",
        path(&out),
    ]);
    assert!(e.contains("needs --adapter"), "{e}");
    let r = common::skillet(&[
        "export",
        "--model",
        path(&s.model),
        "--type",
        "q3_k_s",
        "--out",
        path(&out),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("unknown type 'q3_k_s' (one of f32, f16"),
        "{}",
        r.stderr
    );
    // An adapter for another model: its factors do not fit this one.
    let cfg = s.adapter.join("adapter_config.json");
    let st = s.adapter.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    tensors.insert(
        key.into(),
        candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    let other = s.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&cfg, other.join("adapter_config.json")).unwrap();
    candle_core::safetensors::save(&tensors, other.join("adapter_model.safetensors")).unwrap();
    for format in ["gguf", "gguf-lora", "hf"] {
        let e = expect_error(&[
            "export",
            "--model",
            path(&s.model),
            "--adapter",
            path(&other),
            "--format",
            format,
            "--out",
            path(&out),
        ]);
        assert!(
            e.contains("self_attn.q_proj") && e.contains("fit"),
            "{format}: {e}"
        );
    }
}
