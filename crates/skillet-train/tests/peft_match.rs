//! One and two AdamW steps from a PEFT adapter on a fixed batch equal PEFT +
//! PyTorch: loss, every LoRA (and DoRA magnitude) gradient, the updated
//! adapter (fixtures/peft/make.py made the references: LoRA in
//! fixtures/peft, DoRA in fixtures/peft/dora).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use std::sync::Arc;

use skillet_adapters::{LoraAdapter, LoraParams, peft_tensor_name, read_peft};
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

/// Each trained tensor of `p` with its name in PEFT's file.
fn named(p: &LoraParams) -> Vec<(String, &Tensor)> {
    let mut out = vec![
        (peft_tensor_name(&p.module, "lora_A"), &p.a),
        (peft_tensor_name(&p.module, "lora_B"), &p.b),
    ];
    if let Some(m) = &p.magnitude {
        out.push((
            format!("base_model.model.{}.lora_magnitude_vector", p.module),
            m,
        ));
    }
    out
}

#[test]
fn two_adamw_steps_match_peft() {
    two_steps_match(&fixtures().join("peft"), false);
}

#[test]
fn two_adamw_steps_of_dora_match_peft() {
    two_steps_match(&fixtures().join("peft/dora"), true);
}

fn two_steps_match(dir: &Path, dora: bool) {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json")).unwrap()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("steps.safetensors"), &Device::Cpu).unwrap();

    let base = ModelSource::open(&fixtures().join("tiny-hf/llama"))
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap();
    let initial = read_peft(&dir.join("initial")).unwrap();
    let settings = initial.config.settings().unwrap();
    assert_eq!(settings.use_dora, dora);
    let adapter = Arc::new(LoraAdapter::start(&base, &settings, 0, Some(&initial)).unwrap());
    assert_eq!(adapter.params.len(), 2 * 7);
    assert_eq!(adapter.vars().len(), 2 * 7 * if dora { 3 } else { 2 });
    let model = Adapted::new(&base, Some(adapter.clone()));

    let batch = batch(&record);
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
            for (name, var) in named(p) {
                let key = format!("step{n}.grad.{name}");
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
            for (name, var) in named(p) {
                let key = format!("step{n}.after.{name}");
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

/// The fixture's batch.
fn batch(record: &serde_json::Value) -> TrainBatch {
    let flat = |key: &str| -> Vec<i64> {
        record[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
            .collect()
    };
    TrainBatch {
        batch: 2,
        seq: 10,
        ids: flat("ids").iter().map(|&v| v as u32).collect(),
        key_mask: flat("attention_mask").iter().map(|&v| v as u8).collect(),
        positions: None,
        segments: None,
        labels: flat("labels"),
    }
}

fn mean_loss(model: &dyn skillet_models::CausalLm, batch: &TrainBatch) -> f64 {
    let parts = causal_lm_loss(model, batch).unwrap();
    (parts.sum / parts.tokens as f64)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn a_peft_dora_adapter_loads_for_inference_and_merges_exactly() {
    let dir = fixtures().join("peft/dora");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json")).unwrap()).unwrap();
    let batch = batch(&record);
    let source = ModelSource::open(&fixtures().join("tiny-hf/llama")).unwrap();
    let base = source.load_model(LoadOptions::default()).unwrap();
    let adapter = LoraAdapter::load(&base, &dir.join("initial")).unwrap();
    assert!(adapter.params.iter().all(|p| p.magnitude.is_some()));
    let adapter = Arc::new(adapter);
    let got = mean_loss(&Adapted::new(&base, Some(adapter.clone())), &batch);
    let want = record["steps"][0]["loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() / want < 1e-6,
        "loaded DoRA: loss {got} vs PEFT {want}"
    );

    // Merged: m/‖W + s·BA‖ ⊙ (W + s·BA), as PEFT's merge_and_unload.
    let cfg = source.config().unwrap();
    let mut weights =
        skillet_models::collect_weights(&cfg, source.weights(&cfg).unwrap().as_ref()).unwrap();
    let scale = adapter.settings.scale();
    for p in &adapter.params {
        let key = format!("{}.weight", p.module);
        let m = skillet_adapters::merged_weight(
            &weights.tensors[&key],
            &p.a,
            &p.b,
            scale,
            p.magnitude.as_ref(),
        )
        .unwrap();
        weights.tensors.insert(key, m);
    }
    let merged = skillet_models::Model::load(cfg, &weights, LoadOptions::default()).unwrap();
    let merged_loss = mean_loss(&merged, &batch);
    assert!(
        (merged_loss - got).abs() / got < 1e-6,
        "merged {merged_loss} vs unmerged {got}"
    );
}
