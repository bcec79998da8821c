//! Logits and dequantized values against the reference stack: tiny models
//! saved by transformers (fixtures/tiny-hf/make.py) and GGUF storage types
//! dequantized by gguf-py (fixtures/quant/make.py).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use skillet_gguf::GgufFile;
use skillet_models::{
    Architecture, CausalLm, ForwardInput, GgufWeights, LoadOptions, ModelSource, WeightSource,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn check_folder(name: &str, arch: Architecture) {
    let dir = fixtures().join("tiny-hf").join(name);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = serde_json::from_value(reference["ids"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let source = ModelSource::open(&dir).unwrap();
    let model = source.load_model(LoadOptions::default()).unwrap();
    assert_eq!(model.config().architecture, arch);
    let input = ForwardInput::new(
        Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    let got = model
        .forward(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for (g, e) in got.iter().zip(&expected) {
        for (a, b) in g.iter().zip(e) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("{name}: max |logit diff| = {worst:e}");
    assert!(worst < 2e-5, "{name}: max |logit diff| = {worst}");
}

#[test]
fn llama_sharded_untied_llama3_rope_matches_transformers() {
    check_folder("llama", Architecture::Llama);
    let cfg = ModelSource::open(&fixtures().join("tiny-hf/llama"))
        .unwrap()
        .config()
        .unwrap();
    assert!(matches!(
        cfg.rope_scaling,
        skillet_models::RopeScaling::Llama3 { .. }
    ));
    assert!(!cfg.tie_word_embeddings);
}

#[test]
fn qwen2_attention_bias_matches_transformers() {
    check_folder("qwen2", Architecture::Qwen2);
    let cfg = ModelSource::open(&fixtures().join("tiny-hf/qwen2"))
        .unwrap()
        .config()
        .unwrap();
    assert!(cfg.attention_bias && cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 1e6);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_folder("mistral", Architecture::Mistral);
    let cfg = ModelSource::open(&fixtures().join("tiny-hf/mistral"))
        .unwrap()
        .config()
        .unwrap();
    assert_eq!(cfg.sliding_window, Some(4));
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check_folder("qwen3", Architecture::Qwen3);
    let cfg = ModelSource::open(&fixtures().join("tiny-hf/qwen3"))
        .unwrap()
        .config()
        .unwrap();
    assert!(cfg.qk_norm && !cfg.attention_bias && cfg.sliding_window.is_none());
}

#[test]
fn gemma3_matches_transformers() {
    check_folder("gemma3", Architecture::Gemma3);
    let cfg = ModelSource::open(&fixtures().join("tiny-hf/gemma3"))
        .unwrap()
        .config()
        .unwrap();
    use skillet_models::{Activation, LayerType, RopeScaling};
    assert_eq!(
        cfg.layer_types,
        [LayerType::Sliding, LayerType::Sliding, LayerType::Full]
    );
    assert_eq!(cfg.hidden_act, Activation::GeluTanh);
    assert_eq!(cfg.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(cfg.local_rope.unwrap().theta, 10_000.0);
    assert_eq!(
        (cfg.query_pre_attn_scalar, cfg.final_logit_softcapping),
        (Some(12.0), Some(2.0))
    );
}

#[test]
fn gguf_storage_types_dequantize_like_gguf_py() {
    let dir = fixtures().join("quant");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dequant.json")).unwrap()).unwrap();
    let file = std::sync::Arc::new(GgufFile::open(dir.join("quant.gguf")).unwrap());
    // A Qwen2 config: no Q/K rows to unpermute.
    let mut cfg = skillet_models::tiny_config(256);
    cfg.architecture = Architecture::Qwen2;
    let weights = GgufWeights::new(file.clone(), &cfg);
    let values = reference["values"].as_object().unwrap();
    let required = [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K",
    ];
    for name in required {
        let expected: Vec<f32> = serde_json::from_value(values[name].clone()).unwrap();
        for keep_quantized in [false, true] {
            let w = weights.load(name, keep_quantized).unwrap();
            assert_eq!(w.shape(), vec![4, 256], "{name}");
            let got = w
                .to_dense(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{name}: worst relative difference {worst}");
        }
    }
    assert_eq!(weights.storage_types().len(), required.len());
}
