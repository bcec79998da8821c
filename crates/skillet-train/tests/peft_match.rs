//! One and two AdamW steps from a PEFT adapter on a fixed batch equal PEFT +
//! PyTorch: loss, every LoRA gradient, the updated adapter
//! (fixtures/peft/make.py made the reference).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use std::sync::Arc;

use skillet_adapters::{LoraAdapter, load_peft, peft_tensor_name};
use skillet_models::{Adapted, LoadOptions, ModelSource};
use skillet_train::{
    AdamW, AdamWConfig, TrainBatch, causal_lm_loss, clip_grad_norm, collect_grads,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let num: f32 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    num / den.max(1e-12)
}

#[test]
fn two_adamw_steps_match_peft() {
    let dir = fixtures().join("peft");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json")).unwrap()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("steps.safetensors"), &Device::Cpu).unwrap();

    let base = ModelSource::open(&fixtures().join("tiny-hf/llama"))
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap();
    let (config, initial) = load_peft(&dir.join("initial")).unwrap();
    let settings = config.settings().unwrap();
    let adapter = Arc::new(LoraAdapter::new(&base, &settings, 0, Some(&initial)).unwrap());
    assert_eq!(adapter.params.len(), 2 * 7);
    let model = Adapted::new(&base, Some(adapter.clone()));

    let flat = |key: &str| -> Vec<i64> {
        record[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
            .collect()
    };
    let batch = TrainBatch {
        batch: 2,
        seq: 10,
        ids: flat("ids").iter().map(|&v| v as u32).collect(),
        key_mask: flat("attention_mask").iter().map(|&v| v as u8).collect(),
        positions: None,
        segments: None,
        labels: flat("labels"),
    };
    let hp = &record["hyper"];
    let f = |k: &str| hp[k].as_f64().unwrap();
    let cfg = AdamWConfig {
        lr: f("lr"),
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
    };
    let vars = adapter.vars();
    let mut opt = AdamW::new(vars.clone(), cfg);

    let (mut worst_grad, mut worst_param) = (0f32, 0f32);
    for (k, step) in record["steps"].as_array().unwrap().iter().enumerate() {
        let n = k + 1;
        let parts = causal_lm_loss(&model, &batch).unwrap();
        let loss = (parts.sum / parts.tokens as f64).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        let want = step["loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() / want < 1e-4,
            "step {n}: loss {got} vs PEFT {want}"
        );
        let store = loss.backward().unwrap();
        for p in &adapter.params {
            for (part, var) in [("lora_A", &p.a), ("lora_B", &p.b)] {
                let key = format!("step{n}.grad.{}", peft_tensor_name(&p.module, part));
                let g = store
                    .get(var)
                    .unwrap_or_else(|| panic!("no gradient for {key}"));
                let d = rel_diff(g, &reference[&key]);
                assert!(d < 1e-3, "{key}: relative difference {d}");
                worst_grad = worst_grad.max(d);
            }
        }
        let mut grads = collect_grads(&store, &vars).unwrap();
        let norm = clip_grad_norm(&mut grads, f("max_grad_norm")).unwrap();
        let want_norm = step["grad_norm"].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() / want_norm < 1e-4,
            "step {n}: grad norm {norm} vs {want_norm}"
        );
        opt.step(&grads, cfg.lr).unwrap();
        for p in &adapter.params {
            for (part, var) in [("lora_A", &p.a), ("lora_B", &p.b)] {
                let key = format!("step{n}.after.{}", peft_tensor_name(&p.module, part));
                let d = rel_diff(var, &reference[&key]);
                assert!(d < 1e-3, "{key}: relative difference {d}");
                worst_param = worst_param.max(d);
            }
        }
        eprintln!(
            "step {n}: loss {got:.7} (PEFT {want:.7}), grad norm {norm:.7} (PEFT {want_norm:.7}), \
             worst relative difference so far: gradients {worst_grad:e}, adapter {worst_param:e}"
        );
    }
}
