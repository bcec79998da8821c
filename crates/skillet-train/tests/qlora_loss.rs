//! The fused loss over a model kept in its quantized blocks (QLoRA: the
//! tied LM head read from the embedding's blocks, no dense copy) gives
//! the loss and adapter gradients of the same model dequantized, in f32
//! and in bf16.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use skillet_adapters::{LoraAdapter, LoraSettings, Targets};
use skillet_gguf::GgmlType;
use skillet_models::export::write_gguf;
use skillet_models::{
    Adapted, Adapters, CausalLm, Llama, LoadOptions, ModelSource, Precision, random_weights,
    tiny_config,
};
use skillet_train::{TrainBatch, causal_lm_loss};

/// The tiny model stored in `storage`, loaded dequantized and kept in
/// its blocks.
fn models(storage: GgmlType) -> (Llama, Llama) {
    let cfg = tiny_config(97);
    let w = random_weights(&cfg, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&cfg, &w, &path, &|_| storage, vec![]).unwrap();
    let load = |keep_quantized| {
        ModelSource::open(&path)
            .unwrap()
            .load_model(LoadOptions {
                keep_quantized,
                ..Default::default()
            })
            .unwrap()
    };
    (load(false), load(true))
}

/// The mean loss and every adapter gradient of one batch in `precision`.
fn loss_and_grads(mut m: Llama, precision: Precision) -> (f32, Vec<Vec<f32>>) {
    m.set_precision(precision);
    let targets = Targets::Names(["q_proj", "v_proj"].map(String::from).to_vec());
    let settings = LoraSettings::new(4, 8.0, 0.0, false, targets).unwrap();
    let adapter = LoraAdapter::new(&m, &settings, 3, None).unwrap();
    let vars: Vec<Var> = adapter.vars();
    // B away from zero (the same values for both models).
    for (i, v) in vars.iter().enumerate().skip(1).step_by(2) {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|k| (((k * 17 + i) % 11) as f32 - 5.0) * 0.03)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let ids: Vec<u32> = (0..80).map(|i| (i * 37 + 5) % 97).collect();
    let batch = TrainBatch {
        batch: 2,
        seq: 40,
        labels: ids.iter().map(|&i| i64::from((i * 3 + 1) % 97)).collect(),
        key_mask: vec![1; 80],
        positions: None,
        segments: None,
        ids,
    };
    let model = Adapted::new(&m, Some(Arc::new(adapter)));
    let parts = causal_lm_loss(&model, &batch).unwrap();
    let loss = (parts.sum / parts.tokens as f64).unwrap();
    let g = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    (loss.to_scalar().unwrap(), grads)
}

fn rel_diff(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let flat = |g: &[Vec<f32>]| g.iter().flatten().copied().collect::<Vec<f32>>();
    let (got, want) = (flat(got), flat(want));
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

#[test]
fn the_fused_loss_over_quantized_blocks_equals_the_dequantized_model() {
    for storage in [GgmlType::Q4_1, GgmlType::Q8_0] {
        for precision in [Precision::F32, Precision::Bf16] {
            let (dense, quantized) = models(storage);
            // The quantized model's head is fused from its blocks.
            let mut probe = models(storage).1;
            probe.set_precision(precision);
            assert!(probe.head_frozen(&Adapters::none()).unwrap().is_some());
            let (want, want_g) = loss_and_grads(dense, precision);
            let (got, got_g) = loss_and_grads(quantized, precision);
            let what = format!("{storage:?} {precision:?}");
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "{what}: {got} vs {want}"
            );
            let d = rel_diff(&got_g, &want_g);
            assert!(d < 1e-4, "{what}: gradients differ by {d}");
        }
    }
}
