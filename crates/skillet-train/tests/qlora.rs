//! LoRA over a base kept in its quantized blocks (QLoRA) trains the same
//! adapter as LoRA over the dequantized base: the same gradients in f32
//! (the blocks dequantized for each product), and in bf16 the same
//! gradients as the dense base in bf16 (the blocks read inside the tile
//! products), both within bf16's precision of f32. The fused loss over
//! the blocks (the tied LM head read from the embedding's blocks, no
//! dense copy) gives the dequantized model's loss and gradients. A dense
//! base held in bf16 trains exactly as the f32 base does in bf16.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use skillet_adapters::{LoraAdapter, LoraSettings, Targets};
use skillet_gguf::GgmlType;
use skillet_models::export::write_gguf;
use skillet_models::{
    Adapted, Adapters, CausalLm, ForwardInput, LoadOptions, Model, ModelSource, Precision,
    random_weights, tiny_config,
};
use skillet_train::{TrainBatch, causal_lm_loss};

/// The tiny model stored in `storage`, loaded with each of `options`.
fn loaded<const N: usize>(storage: GgmlType, options: [LoadOptions; N]) -> [Model; N] {
    let cfg = tiny_config(97);
    let w = random_weights(&cfg, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&cfg, &w, &path, &|_| storage, vec![]).unwrap();
    options.map(|opts| ModelSource::open(&path).unwrap().load_model(opts).unwrap())
}

/// The tiny model stored in `storage`, loaded dequantized and kept in
/// its blocks.
fn models(storage: GgmlType) -> (Model, Model) {
    let keep = |keep_quantized| LoadOptions {
        keep_quantized,
        ..Default::default()
    };
    let [dense, quantized] = loaded(storage, [keep(false), keep(true)]);
    (dense, quantized)
}

/// A LoRA adapter (r = 4) on `targets` with B away from zero, the same
/// values for every model, so every factor gets a gradient.
fn trained_adapter(m: &Model, targets: &[&str], seed: u64) -> LoraAdapter {
    let targets = Targets::Names(targets.iter().map(|t| t.to_string()).collect());
    let settings = LoraSettings::new(4, 8.0, 0.0, false, targets).unwrap();
    let adapter = LoraAdapter::new(m, &settings, seed, None).unwrap();
    for (i, v) in adapter.vars().iter().enumerate().skip(1).step_by(2) {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|k| (((k * 17 + i) % 11) as f32 - 5.0) * 0.03)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    adapter
}

/// Gradients of every adapter variable for a fixed weighting of the
/// logits of two sequences of 40 tokens, in `precision`.
fn gradients(mut m: Model, precision: Precision) -> Vec<Vec<f32>> {
    m.set_precision(precision);
    let adapter = trained_adapter(&m, &["q_proj", "v_proj", "o_proj", "down_proj"], 11);
    let vars: Vec<Var> = adapter.vars();
    let ids: Vec<u32> = (0..80).map(|i| (i * 37 + 5) % 97).collect();
    let input = ForwardInput::new(Tensor::from_vec(ids, (2, 40), &Device::Cpu).unwrap());
    let model = Adapted::new(&m, Some(std::sync::Arc::new(adapter)));
    let logits = model.forward(&input).unwrap(); // [2, 40, 97]
    let n = logits.elem_count();
    let weights: Vec<f32> = (0..n)
        .map(|k| ((k * 7919) % 101) as f32 / 101.0 - 0.5)
        .collect();
    let weights = Tensor::from_vec(weights, logits.shape(), &Device::Cpu).unwrap();
    let loss = (logits * weights).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    vars.iter()
        .map(|v| {
            g.get(v.as_tensor())
                .expect("every factor gets a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// The largest difference over all gradients, relative to the largest
/// magnitude of `want`'s.
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
fn qlora_gradients_equal_lora_over_the_dequantized_base() {
    for storage in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let (dense, quantized) = models(storage);
        let dense_f32 = gradients(dense, Precision::F32);
        let quant_f32 = gradients(quantized, Precision::F32);
        let (dense, quantized) = models(storage);
        let dense_bf16 = gradients(dense, Precision::Bf16);
        let quant_bf16 = gradients(quantized, Precision::Bf16);
        // Same values, only the order of f32 sums may differ.
        let same = rel_diff(&quant_f32, &dense_f32);
        assert!(same < 1e-4, "{storage:?}: f32 QLoRA vs LoRA {same}");
        let same = rel_diff(&quant_bf16, &dense_bf16);
        assert!(same < 1e-4, "{storage:?}: bf16 QLoRA vs LoRA {same}");
        // bf16 rounds the operands: close to f32, and not equal to it.
        let rounded = rel_diff(&quant_bf16, &dense_f32);
        assert!(
            rounded > 0.0 && rounded < 3e-2,
            "{storage:?}: bf16 vs f32 {rounded}"
        );
    }
}

/// Logits and one factor's gradient of a training forward with adapter
/// dropout drawn from `seed`.
fn with_dropout(
    m: &Model,
    adapter: &std::sync::Arc<LoraAdapter>,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let ids: Vec<u32> = (0..40).map(|i| (i * 13 + 3) % 97).collect();
    let mut input = ForwardInput::new(Tensor::from_vec(ids, (1, 40), &Device::Cpu).unwrap());
    input.adapters = skillet_models::Adapters::all(adapter.clone()).with_dropout(seed);
    let logits = m.forward(&input).unwrap();
    let g = logits.sum_all().unwrap().backward().unwrap();
    let a = adapter.vars()[0].clone();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (flat(&logits), flat(g.get(a.as_tensor()).unwrap()))
}

#[test]
fn adapter_dropout_still_applies_where_layers_are_fused() {
    // The fused LoRA op has no dropout: with dropout set, training must
    // take the composed path, so the seed changes the result.
    let (dense, _) = models(GgmlType::Q8_0);
    let settings = LoraSettings::new(
        4,
        8.0,
        0.5,
        false,
        Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
    )
    .unwrap();
    let adapter = LoraAdapter::new(&dense, &settings, 3, None).unwrap();
    for (i, v) in adapter.vars().iter().enumerate().skip(1).step_by(2) {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|k| ((k + i) % 5) as f32 * 0.05)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let adapter = std::sync::Arc::new(adapter);
    let (logits_1, grad_1) = with_dropout(&dense, &adapter, 1);
    let (logits_2, grad_2) = with_dropout(&dense, &adapter, 2);
    assert_ne!(logits_1, logits_2, "dropout ignored in the forward");
    assert_ne!(grad_1, grad_2, "dropout ignored in the gradient");
    // The same seed gives the same numbers.
    assert_eq!(with_dropout(&dense, &adapter, 1), (logits_1, grad_1));
}

/// The mean loss and every adapter gradient of one batch in `precision`.
fn loss_and_grads(mut m: Model, precision: Precision) -> (f32, Vec<Vec<f32>>) {
    m.set_precision(precision);
    let adapter = trained_adapter(&m, &["q_proj", "v_proj"], 3);
    let vars: Vec<Var> = adapter.vars();
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

#[test]
fn a_base_held_in_bf16_trains_as_the_f32_base_does_in_bf16() {
    // f32 storage: weights with more bits than bf16 keeps. Held in bf16,
    // they are rounded once at load as each bf16 product rounds them: the
    // same loss and gradients, bit for bit.
    let held = LoadOptions {
        frozen_bf16: true,
        ..Default::default()
    };
    let [f32_base, bf16_base] = loaded(GgmlType::F32, [LoadOptions::default(), held]);
    let (want, want_g) = loss_and_grads(f32_base, Precision::Bf16);
    let (got, got_g) = loss_and_grads(bf16_base, Precision::Bf16);
    assert_eq!(got, want);
    assert_eq!(got_g, want_g);
    // Held in bf16, its products stay in bf16 when f32 is asked for: not
    // the f32 base's f32 numbers.
    let [f32_base, bf16_base] = loaded(GgmlType::F32, [LoadOptions::default(), held]);
    let (f32_loss, _) = loss_and_grads(f32_base, Precision::F32);
    let (held_loss, _) = loss_and_grads(bf16_base, Precision::F32);
    assert_ne!(held_loss, f32_loss);
    assert!((held_loss - f32_loss).abs() < 1e-2 * f32_loss.abs());
}

/// The cached forward that sampling runs (GRPO samples with a copy of the
/// base in its blocks and the trained adapter, while training multiplies
/// the dequantized copy): two prompts prefilled, then decoded a token at
/// a time, give the dequantized model's logits with the same adapter, and
/// the int8 inputs only approximately.
#[test]
fn sampling_from_the_blocks_with_an_adapter_gives_the_dequantized_logits() {
    use skillet_models::{Activations, CachedBatch, CachedChunk};
    for storage in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let (dense, quantized) = models(storage);
        let adapter = trained_adapter(&dense, &["q_proj", "v_proj", "up_proj"], 3);
        let adapter: Arc<dyn skillet_models::Adapter> = Arc::new(adapter);
        let prompts: [Vec<u32>; 2] = [vec![5, 9, 13, 2, 77, 41], vec![8, 60, 3]];
        let run = |m: &Model, activations: Activations| -> Vec<f32> {
            let model = Adapted::new(m, Some(adapter.clone()));
            let mut cache = model.new_cache(2, 16);
            let mut out = Vec::new();
            let mut chunks: Vec<Vec<u32>> = prompts.to_vec();
            for step in 0..4 {
                let batch = CachedBatch {
                    chunks: chunks
                        .iter()
                        .enumerate()
                        .map(|(slot, tokens)| CachedChunk {
                            slot,
                            tokens: tokens.clone(),
                            adapter: None,
                        })
                        .collect(),
                    adapters: vec![],
                    activations,
                };
                let logits = model.forward_cached(&batch, &mut cache).unwrap();
                out.extend(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                // The next tokens, fixed, so both models decode alike.
                chunks = vec![vec![(step * 7 + 1) % 97], vec![(step * 11 + 4) % 97]];
            }
            out
        };
        let want = run(&dense, Activations::F32);
        let got = run(&quantized, Activations::F32);
        let d = rel_diff(&[got], std::slice::from_ref(&want));
        assert!(d < 1e-5, "{storage:?}: blocks vs dequantized {d}");
        let int8 = run(&quantized, Activations::Int8);
        let d = rel_diff(&[int8], &[want]);
        assert!(d > 0.0 && d < 5e-2, "{storage:?}: int8 inputs {d}");
    }
}
