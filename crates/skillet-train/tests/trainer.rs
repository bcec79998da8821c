//! Trainer invariants on a tiny random model built in code: resume equals
//! an uninterrupted run bit for bit, gradient accumulation equals one big
//! batch, seeds make runs repeat, LoRA gradients agree with finite
//! differences, B = 0 is the base model and merging changes nothing.

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use skillet_adapters::{LoraAdapter, LoraSettings, Targets, load_peft, merged_weight};
use skillet_data::TokenizedExample;
use skillet_models::{
    Adapted, Architecture, CausalLm, ForwardInput, LoadOptions, MemoryWeights, Model,
    random_weights, tiny_config_for,
};
use skillet_train::{
    AdamW, AdamWConfig, Event, LoopSettings, Schedule, ScheduleKind, Sft, TrainState, Trainer,
    causal_lm_loss, checkpoint_dir, collate, collect_grads, load_checkpoint_state,
};

fn weights() -> (skillet_models::ModelConfig, MemoryWeights) {
    weights_for(Architecture::Llama)
}

/// A tiny random model in the shape of `arch`.
fn weights_for(arch: Architecture) -> (skillet_models::ModelConfig, MemoryWeights) {
    let cfg = tiny_config_for(arch, 61);
    let w = random_weights(&cfg, 5).unwrap();
    (cfg, w)
}

/// One of each decoder implementation and its switches.
const ARCHS: [Architecture; 3] = [
    Architecture::Llama,
    Architecture::Qwen3,
    Architecture::Gemma3,
];

fn examples(n: usize) -> Vec<TokenizedExample> {
    (0..n)
        .map(|i| {
            let len = 6 + (i * 7) % 9;
            let ids: Vec<u32> = (0..len)
                .map(|j| ((i * 13 + j * 5) % 60 + 1) as u32)
                .collect();
            let trainable = (0..len).map(|j| j >= len / 3).collect();
            TokenizedExample {
                line: i + 1,
                ids,
                trainable,
                full_len: len,
            }
        })
        .collect()
}

fn settings(dropout_seed: u64) -> LoopSettings {
    LoopSettings {
        epochs: 2,
        max_steps: None,
        batch_size: 2,
        grad_accum: 2,
        max_grad_norm: Some(1.0),
        eval_every: None,
        save_every: Some(1),
        seed: dropout_seed,
    }
}

fn sft<'a>(train: &'a [TokenizedExample], valid: &'a [TokenizedExample]) -> Sft<'a> {
    Sft {
        train,
        valid,
        packing: None,
        pad_id: 0,
        eval_batch: 2,
    }
}

fn lora(r: usize, dropout: f32) -> LoraSettings {
    LoraSettings::new(
        r,
        2.0 * r as f64,
        dropout,
        false,
        Targets::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
    )
    .unwrap()
}

fn model_with(adapter_from: Option<&Path>, lora_settings: &LoraSettings) -> (Model, LoraAdapter) {
    let (cfg, w) = weights();
    let model = Model::load(cfg, &w, LoadOptions::default()).unwrap();
    let initial = adapter_from.map(|d| load_peft(d).unwrap().1);
    let adapter = LoraAdapter::new(&model, lora_settings, 99, initial.as_ref()).unwrap();
    (model, adapter)
}

/// `model` with `adapter` on every call.
fn adapted<'a>(model: &'a Model, adapter: &LoraAdapter) -> Adapted<'a> {
    Adapted::new(model, Some(std::sync::Arc::new(adapter.clone())))
}

fn adapter_values(a: &LoraAdapter) -> Vec<Vec<f32>> {
    a.vars()
        .iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// Every LoRA B variable (A and B alternate in `vars()`).
fn b_vars(adapter: &LoraAdapter) -> Vec<Var> {
    adapter.vars().into_iter().skip(1).step_by(2).collect()
}

/// Sets every LoRA B to `value` (B = 0 at init gives A no gradient).
fn fill_b(adapter: &LoraAdapter, value: f64) {
    for b in b_vars(adapter) {
        b.set(&(Tensor::ones(b.shape(), b.dtype(), b.device()).unwrap() * value).unwrap())
            .unwrap();
    }
}

/// `(loss(x + eps) − loss(x − eps)) / 2eps` in element `k` of `var`, which
/// is left as it was.
fn central_difference(var: &Var, k: usize, eps: f32, loss: impl Fn() -> f32) -> f32 {
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let at = |delta: f32| {
        let mut v = orig.clone();
        v[k] += delta;
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        loss()
    };
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    at(0.0);
    numeric
}

/// Largest absolute element.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Euclidean norm.
fn l2(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

fn opt_config() -> AdamWConfig {
    AdamWConfig {
        lr: 5e-2,
        weight_decay: 0.01,
        ..Default::default()
    }
}

fn run(
    out: &Path,
    s: &LoopSettings,
    data: &[TokenizedExample],
    resume: Option<&Path>,
    lora_settings: &LoraSettings,
) -> Vec<Vec<f32>> {
    run_with_warmup(out, s, data, resume, lora_settings, 2)
}

fn run_with_warmup(
    out: &Path,
    s: &LoopSettings,
    data: &[TokenizedExample],
    resume: Option<&Path>,
    lora_settings: &LoraSettings,
    warmup: u64,
) -> Vec<Vec<f32>> {
    let (model, adapter) = model_with(resume, lora_settings);
    let mut opt = AdamW::new(adapter.vars(), opt_config());
    let state = match resume {
        Some(dir) => load_checkpoint_state(dir, &mut opt).unwrap(),
        None => TrainState::default(),
    };
    let mut trainer = Trainer {
        model: &model,
        trainable: &adapter,
        opt,
        schedule: Schedule {
            kind: ScheduleKind::Cosine,
            peak: opt_config().lr,
            warmup,
            total: 0,
        },
        settings: s.clone(),
        out: out.to_path_buf(),
        base_model: None,
        state,
    };
    let sft = sft(data, &data[..2]);
    trainer.schedule.total = trainer.total_steps(&sft);
    let mut losses = Vec::new();
    trainer
        .run(&sft, &mut |e| {
            if let Event::Train { loss, .. } = e {
                losses.push(*loss)
            }
        })
        .unwrap();
    assert!(losses.iter().all(|l| l.is_finite()));
    adapter_values(&adapter)
}

#[test]
fn resume_from_any_step_equals_an_uninterrupted_run() {
    let data = examples(7);
    let s = settings(3);
    let ls = lora(4, 0.1);
    let full = tempfile::tempdir().unwrap();
    let reference = run(full.path(), &s, &data, None, &ls);
    // 7 examples, batch 2 -> 4 micro-batches, accumulation 2 -> 2 steps per epoch, 2 epochs.
    let total = 4;
    assert!(checkpoint_dir(full.path(), total).exists());
    for k in 1..total {
        let resumed = tempfile::tempdir().unwrap();
        let got = run(
            resumed.path(),
            &s,
            &data,
            Some(&checkpoint_dir(full.path(), k)),
            &ls,
        );
        assert_eq!(got, reference, "resuming from step {k} changed the result");
    }
    // Same seed, same adapter; another seed, another one (data order and dropout).
    let again = tempfile::tempdir().unwrap();
    assert_eq!(run(again.path(), &s, &data, None, &ls), reference);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(run(other.path(), &settings(4), &data, None, &ls), reference);
}

#[test]
fn accumulating_four_batches_of_one_equals_one_batch_of_four() {
    let data = examples(4);
    let ls = lora(4, 0.0);
    let one_step = |batch_size: usize, grad_accum: usize| {
        let s = LoopSettings {
            epochs: 1,
            batch_size,
            grad_accum,
            save_every: None,
            ..settings(1)
        };
        let out = tempfile::tempdir().unwrap();
        // No warmup: the first (only) step must have a non-zero rate.
        run_with_warmup(out.path(), &s, &data, None, &ls, 0)
    };
    let big = one_step(4, 1);
    let accumulated = one_step(1, 4);
    for (a, b) in big.iter().zip(&accumulated) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 + 1e-5 * y.abs(), "{x} vs {y}");
        }
    }
    // And it really trained: B moved away from zero.
    assert!(big[1].iter().any(|v| *v != 0.0));
}

#[test]
fn lora_gradients_agree_with_finite_differences() {
    let data = examples(3);
    let refs: Vec<&TokenizedExample> = data.iter().collect();
    let batch = collate(&refs, 0);
    let (base, adapter) = model_with(None, &lora(2, 0.0));
    let model = adapted(&base, &adapter);
    // Non-zero B so A gets a gradient too.
    fill_b(&adapter, 0.05);
    let loss_of = |m: &dyn CausalLm| {
        let parts = causal_lm_loss(m, &batch).unwrap();
        (parts.sum / parts.tokens as f64).unwrap()
    };
    let loss = loss_of(&model);
    let grads = collect_grads(&loss.backward().unwrap(), &adapter.vars()).unwrap();
    let eps = 1e-3f32;
    let mut checked = 0;
    for (var, grad) in adapter.vars().iter().zip(&grads) {
        let g = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The largest-gradient entry of each tensor.
        let (idx, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let numeric = central_difference(var, idx, eps, || {
            loss_of(&model).to_scalar::<f32>().unwrap()
        });
        assert!(
            (numeric - gi).abs() <= 2e-3 + 2e-2 * gi.abs(),
            "analytic {gi} vs numeric {numeric}"
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * adapter.params.len());
}

#[test]
fn zero_b_is_the_base_model_and_merging_changes_nothing() {
    let (cfg, w) = weights();
    let base = Model::load(cfg.clone(), &w, LoadOptions::default()).unwrap();
    let ls = lora(4, 0.0);
    let (plain, adapter) = model_with(None, &ls);
    let model = adapted(&plain, &adapter);
    let ids = Tensor::new(&[[3u32, 9, 27, 20, 1, 44]], &Device::Cpu).unwrap();
    let logits = |m: &dyn CausalLm| {
        m.forward(&ForwardInput::new(ids.clone()))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(
        logits(&model),
        logits(&base),
        "B = 0 must leave the model unchanged"
    );

    for b in b_vars(&adapter) {
        let vals: Vec<f32> = (0..b.elem_count())
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.01)
            .collect();
        b.set(&Tensor::from_vec(vals, b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let adapted = logits(&model);
    assert!(
        adapted
            .iter()
            .zip(logits(&base))
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
    let mut merged = w.clone();
    for p in &adapter.params {
        let key = format!("{}.weight", p.module);
        let m = merged_weight(&merged.tensors[&key], &p.a, &p.b, ls.scale(), None).unwrap();
        merged.tensors.insert(key, m);
    }
    let merged_model = Model::load(cfg, &merged, LoadOptions::default()).unwrap();
    let diff = logits(&merged_model)
        .iter()
        .zip(&adapted)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "merged vs unmerged: {diff}");
}

#[test]
fn only_lora_parameters_receive_gradients() {
    let (cfg, w) = weights();
    let base = Model::load(cfg, &w, LoadOptions::default()).unwrap();
    let adapter = LoraAdapter::new(&base, &lora(2, 0.0), 1, None).unwrap();
    let model = adapted(&base, &adapter);
    fill_b(&adapter, 0.01);
    let data = examples(2);
    let parts = causal_lm_loss(&model, &collate(&data.iter().collect::<Vec<_>>(), 0)).unwrap();
    let store = (parts.sum / parts.tokens as f64)
        .unwrap()
        .backward()
        .unwrap();
    for var in adapter.vars() {
        let g = store
            .get(var.as_tensor())
            .expect("every LoRA tensor gets a gradient");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "zero gradient"
        );
    }
    // Frozen matrices get no gradient at all, not even one computed and
    // dropped (candle's matmul stores it under the transposed view): no
    // gradient in the store has a frozen matrix's shape, either way round.
    // (In this model no activation or LoRA tensor shares those shapes.)
    let debug = format!("{store:?}");
    let stored: std::collections::HashSet<Vec<usize>> = debug
        .split("Tensor[")
        .skip(1)
        .filter_map(|s| s.split(';').next())
        .map(|dims| {
            dims.trim_start_matches("dims ")
                .split(", ")
                .filter_map(|d| d.trim().parse().ok())
                .collect()
        })
        .collect();
    // The parse reads every LoRA tensor's gradient, which is there.
    for var in adapter.vars() {
        assert!(
            stored.contains(var.as_tensor().dims()),
            "could not read the gradient store: {debug:.200}"
        );
    }
    for (name, t) in &w.tensors {
        if let [o, i] = t.dims() {
            assert!(
                !stored.contains(&vec![*o, *i]) && !stored.contains(&vec![*i, *o]),
                "{name} {:?}: a gradient was computed",
                t.dims()
            );
        }
    }
}

#[test]
fn packed_batches_give_the_same_loss_as_padded_ones() {
    let (cfg, w) = weights();
    let model = Model::load(cfg, &w, LoadOptions::default()).unwrap();
    let data = examples(5);
    let refs: Vec<&TokenizedExample> = data.iter().collect();
    let padded = causal_lm_loss(&model, &collate(&refs, 0)).unwrap();
    let max_len = data.iter().map(|e| e.ids.len()).max().unwrap() * 2;
    let packed_seqs = skillet_data::pack(&refs, max_len);
    assert!(packed_seqs.len() < data.len(), "nothing was packed");
    let packed = causal_lm_loss(
        &model,
        &skillet_train::collate_packed(&packed_seqs.iter().collect::<Vec<_>>(), 0),
    )
    .unwrap();
    assert_eq!(packed.tokens, padded.tokens);
    let (a, b) = (
        packed.sum.to_scalar::<f32>().unwrap(),
        padded.sum.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * b.abs(), "packed {a} vs padded {b}");
}

/// The tiny model written as a Q8_0 GGUF in `dir`, opened.
fn q8_source(dir: &Path) -> skillet_models::ModelSource {
    use skillet_models::{ModelSource, export::write_gguf};
    let (cfg, w) = weights();
    let gguf = dir.join("q8.gguf");
    write_gguf(&cfg, &w, &gguf, &|_| skillet_gguf::GgmlType::Q8_0, vec![]).unwrap();
    ModelSource::open(&gguf).unwrap()
}

#[test]
fn qlora_on_a_quantized_gguf_trains_like_lora_on_its_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    let source = q8_source(dir.path());
    let data = examples(4);
    let train_with = |keep_quantized: bool| {
        let model = source
            .load_model(LoadOptions {
                keep_quantized,
                ..Default::default()
            })
            .unwrap();
        let adapter = LoraAdapter::new(&model, &lora(4, 0.0), 7, None).unwrap();
        let out = tempfile::tempdir().unwrap();
        let s = LoopSettings {
            epochs: 1,
            save_every: None,
            ..settings(2)
        };
        let mut trainer = Trainer {
            model: &model,
            trainable: &adapter,
            opt: AdamW::new(adapter.vars(), opt_config()),
            schedule: Schedule {
                kind: ScheduleKind::Constant,
                peak: opt_config().lr,
                warmup: 0,
                total: 1,
            },
            settings: s,
            out: out.path().to_path_buf(),
            base_model: None,
            state: TrainState::default(),
        };
        trainer.run(&sft(&data, &[]), &mut |_| {}).unwrap();
        assert_eq!(trainer.state.step, 1);
        adapter_values(&adapter)
    };
    let qlora = train_with(true);
    assert_eq!(
        qlora,
        train_with(false),
        "QLoRA must see exactly the dequantized weights"
    );
    assert!(
        qlora[1].iter().any(|v| *v != 0.0),
        "the adapter did not train"
    );
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let data = examples(6);
    let (model, adapter) = model_with(None, &lora(4, 0.0));
    let out = tempfile::tempdir().unwrap();
    // An absurd learning rate: step 1 succeeds (and is checkpointed), then
    // the weights overflow and the loss becomes non-finite.
    let huge = AdamWConfig {
        lr: 1e30,
        ..opt_config()
    };
    let mut trainer = Trainer {
        model: &model,
        trainable: &adapter,
        opt: AdamW::new(adapter.vars(), huge),
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak: huge.lr,
            warmup: 0,
            total: 10,
        },
        settings: LoopSettings {
            epochs: 5,
            batch_size: 2,
            grad_accum: 1,
            save_every: Some(1),
            ..settings(1)
        },
        out: out.path().to_path_buf(),
        base_model: None,
        state: TrainState::default(),
    };
    let err = trainer
        .run(&sft(&data, &[]), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is NaN") || err.contains("is inf") || err.contains("gradient norm is"),
        "{err}"
    );
    assert!(err.contains("stopping"), "{err}");
    let failed_at = trainer.state.step + 1;
    // Every checkpoint written before the failure is complete and loadable.
    let last =
        skillet_train::latest_checkpoint(out.path()).expect("a checkpoint before the failure");
    assert!(
        last.ends_with(format!("step-{:06}", failed_at - 1)),
        "{}",
        last.display()
    );
    let mut opt = AdamW::new(adapter.vars(), huge);
    assert_eq!(
        load_checkpoint_state(&last, &mut opt).unwrap().step,
        failed_at - 1
    );
    load_peft(&last).unwrap();
    assert!(
        !out.path().join("checkpoints").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".partial"))
    );
}

#[test]
fn fused_kernels_train_like_the_composed_ops() {
    // The same model and adapter twice: once with every fused kernel (norms,
    // RoPE, attention, SwiGLU, LM head + cross-entropy), once with composed
    // candle ops throughout. The adapted output projection's fused op adds
    // the residual, and so does the frozen one's under PEFT's default
    // targets (q and v alone), where k, gate and up are frozen products
    // that norm their input.
    let target_sets: [&[&str]; 2] = [
        &["q_proj", "v_proj", "o_proj", "down_proj"],
        &["q_proj", "v_proj"],
    ];
    for (arch, targets) in ARCHS.into_iter().flat_map(|a| target_sets.map(|t| (a, t))) {
        let build = |composed_ops: bool| {
            let (cfg, w) = weights_for(arch);
            let opts = LoadOptions {
                composed_ops,
                ..Default::default()
            };
            let model = Model::load(cfg, &w, opts).unwrap();
            let settings = LoraSettings::new(
                2,
                4.0,
                0.0,
                false,
                Targets::Names(targets.iter().map(|t| (*t).into()).collect()),
            )
            .unwrap();
            let adapter = LoraAdapter::new(&model, &settings, 1, None).unwrap();
            fill_b(&adapter, 0.03);
            (model, adapter)
        };
        let (fused, fused_adapter) = build(false);
        let (composed, composed_adapter) = build(true);
        // A padded batch, a packed one, and one of 2 x 150 tokens (298
        // targets: two chunks of the fused head, three query tiles).
        let data = examples(5);
        let refs: Vec<&TokenizedExample> = data.iter().collect();
        let padded = collate(&refs, 0);
        let packed = skillet_data::pack(&refs, 40);
        let packed = skillet_train::collate_packed(&packed.iter().collect::<Vec<_>>(), 0);
        assert!(packed.segments.is_some());
        let ids: Vec<u32> = (0..300u32).map(|i| (i * 7 + i / 13) % 60 + 1).collect();
        let big = skillet_train::TrainBatch {
            batch: 2,
            seq: 150,
            labels: ids.iter().map(|&i| i as i64).collect(),
            key_mask: vec![1; 300],
            ids,
            positions: None,
            segments: None,
        };
        assert!(big.target_count() > 256);
        for batch in [padded, packed, big] {
            let run = |model: &Model, adapter: &LoraAdapter, fused: bool| {
                let model = adapted(model, adapter);
                let parts = skillet_train::causal_lm_loss_with(&model, &batch, fused).unwrap();
                let loss = (parts.sum.clone() / parts.tokens as f64).unwrap();
                let grads = collect_grads(&loss.backward().unwrap(), &adapter.vars()).unwrap();
                (loss.to_scalar::<f32>().unwrap(), parts.correct, grads)
            };
            let (fused_loss, fused_correct, fused_grads) = run(&fused, &fused_adapter, true);
            let (loss, correct, grads) = run(&composed, &composed_adapter, false);
            // For evaluation: the same value, nothing to differentiate.
            let value =
                skillet_train::causal_lm_loss_value(&adapted(&fused, &fused_adapter), &batch)
                    .unwrap();
            assert!(!value.sum.track_op());
            let value = (value.sum / value.tokens as f64).unwrap();
            assert_eq!(value.to_scalar::<f32>().unwrap(), fused_loss);
            assert!(
                (fused_loss - loss).abs() < 1e-5 * loss.abs(),
                "{fused_loss} vs {loss}"
            );
            assert_eq!(fused_correct, correct);
            for (a, b) in fused_grads.iter().zip(&grads) {
                let (diff, norm) = (l2(&(a - b).unwrap()), l2(b));
                assert!(
                    diff <= 1e-4 * norm + 1e-9,
                    "{arch:?} {targets:?}: gradient differs: {diff} vs norm {norm}"
                );
            }
        }
    }
}

#[test]
fn full_fine_tuning_gradients_match_composed_ops_and_finite_differences() {
    let data = examples(4);
    let batch = collate(&data.iter().collect::<Vec<_>>(), 0);
    for arch in ARCHS {
        let load = |composed_ops: bool| {
            let (cfg, w) = weights_for(arch);
            let opts = LoadOptions {
                composed_ops,
                trainable: true,
                ..Default::default()
            };
            Model::load(cfg, &w, opts).unwrap()
        };
        let (fused, composed) = (load(false), load(true));
        let names: Vec<&str> = fused.parameters().iter().map(|(n, _)| n.as_str()).collect();
        // Every weight is trainable; the tied head is the embedding, once.
        assert!(names.contains(&"model.embed_tokens.weight"));
        assert!(names.contains(&"model.layers.0.input_layernorm.weight"));
        assert!(names.contains(&"model.layers.1.mlp.down_proj.weight"));
        assert!(!names.contains(&"lm_head.weight"));
        let loss_of = |model: &Model, fused_ce: bool| {
            let parts = skillet_train::causal_lm_loss_with(model, &batch, fused_ce).unwrap();
            (parts.sum / parts.tokens as f64).unwrap()
        };
        let vars = |m: &Model| {
            m.parameters()
                .iter()
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        let g_fused =
            collect_grads(&loss_of(&fused, true).backward().unwrap(), &vars(&fused)).unwrap();
        let g_comp = collect_grads(
            &loss_of(&composed, false).backward().unwrap(),
            &vars(&composed),
        )
        .unwrap();
        for ((name, _), (a, b)) in fused.parameters().iter().zip(g_fused.iter().zip(&g_comp)) {
            let (diff, scale) = (max_abs(&(a - b).unwrap()), max_abs(b));
            assert!(scale > 0.0, "{arch:?} {name} got a zero gradient");
            assert!(diff <= 1e-4 * scale, "{arch:?} {name}: {diff} vs {scale}");
        }
        // Central differences on the tied embedding (used twice), a norm and a
        // projection (whose weight gradient both models compute the same way).
        // With QK-norm, a key norm; in Gemma, a norm after the MLP too.
        let mut checked = vec![
            ("model.embed_tokens.weight", 64 * 7 + 3),
            ("model.norm.weight", 5),
            ("model.layers.0.mlp.up_proj.weight", 100),
        ];
        if arch != Architecture::Llama {
            checked.push(("model.layers.1.self_attn.k_norm.weight", 3));
        }
        if arch == Architecture::Gemma3 {
            checked.push(("model.layers.0.post_feedforward_layernorm.weight", 9));
        }
        for (which, k) in checked {
            let i = names.iter().position(|n| *n == which).unwrap();
            let var = &fused.parameters()[i].1;
            let fd = central_difference(var, k, 1e-2, || {
                loss_of(&fused, true).to_scalar::<f32>().unwrap()
            }) as f64;
            let g = g_fused[i].flatten_all().unwrap().to_vec1::<f32>().unwrap()[k] as f64;
            // 5e-5: what f32 rounding of a loss near 4 leaves in a central
            // difference over 2e-2.
            assert!(
                (fd - g).abs() <= 2e-2 * fd.abs() + 5e-5,
                "{arch:?} {which}[{k}]: finite difference {fd} vs gradient {g}"
            );
        }
        // One fused AdamW step on every weight lowers the loss.
        let before = loss_of(&fused, true).to_scalar::<f32>().unwrap();
        let mut opt = AdamW::new(vars(&fused), opt_config());
        opt.step(&g_fused, 1e-2).unwrap();
        let after = loss_of(&fused, true).to_scalar::<f32>().unwrap();
        assert!(after < before, "{arch:?}: loss {before} -> {after}");
    }
}

/// The adapter's gradients for `batch`, on `base` (checkpointed or not).
fn lora_grads(
    mut base: Model,
    checkpointing: bool,
    dropout: f32,
    batch: &skillet_train::TrainBatch,
) -> Vec<Tensor> {
    let adapter = LoraAdapter::new(&base, &lora(2, dropout), 1, None).unwrap();
    fill_b(&adapter, 0.03);
    if checkpointing {
        base.set_activation_checkpointing(Some(adapter.vars()));
    }
    let model = adapted(&base, &adapter).with_dropout(7);
    let parts = causal_lm_loss(&model, batch).unwrap();
    let loss = (parts.sum / parts.tokens as f64).unwrap();
    let store = skillet_train::backward(&model, &loss).unwrap();
    collect_grads(&store, &adapter.vars()).unwrap()
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let data = examples(4);
    let batch = collate(&data.iter().collect::<Vec<_>>(), 0);
    // LoRA with dropout on (the recomputed forward must draw the same masks).
    let run_lora = |checkpointing: bool| {
        let (cfg, w) = weights();
        let base = Model::load(cfg, &w, LoadOptions::default()).unwrap();
        lora_grads(base, checkpointing, 0.3, &batch)
    };
    // Full fine-tuning: every weight, the embedding outside the layers.
    let run_full = |checkpointing: bool| {
        let (cfg, w) = weights();
        let opts = LoadOptions {
            trainable: true,
            ..Default::default()
        };
        let mut model = Model::load(cfg, &w, opts).unwrap();
        let vars: Vec<_> = model.parameters().iter().map(|(_, v)| v.clone()).collect();
        if checkpointing {
            model.set_activation_checkpointing(Some(vars.clone()));
        }
        let parts = causal_lm_loss(&model, &batch).unwrap();
        let loss = (parts.sum / parts.tokens as f64).unwrap();
        collect_grads(&skillet_train::backward(&model, &loss).unwrap(), &vars).unwrap()
    };
    for (plain, checkpointed) in [
        (run_lora(false), run_lora(true)),
        (run_full(false), run_full(true)),
    ] {
        assert_eq!(plain.len(), checkpointed.len());
        for (a, b) in plain.iter().zip(&checkpointed) {
            let (diff, scale) = (max_abs(&(a - b).unwrap()), max_abs(a));
            assert!(scale > 0.0);
            assert!(diff <= 1e-5 * scale, "{diff} vs {scale}");
        }
    }
}

/// Without dropout the projections take their norms inside the fused ops
/// (a dense base) or multiply the GGUF blocks (QLoRA), and the recomputed
/// forward must take the very same products as the first one: few rows
/// (≤ 16, where a quantized base may read its blocks directly) and many.
#[test]
fn activation_checkpointing_repeats_fused_and_quantized_products_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let source = q8_source(dir.path());
    let data = examples(4);
    let few = collate(&data[..1].iter().collect::<Vec<_>>(), 0);
    let many = collate(&data.iter().collect::<Vec<_>>(), 0);
    assert!(few.batch * few.seq <= 16 && many.batch * many.seq > 16);
    for batch in [&few, &many] {
        for keep_quantized in [false, true] {
            let load = || {
                let opts = LoadOptions {
                    keep_quantized,
                    ..Default::default()
                };
                source.load_model(opts).unwrap()
            };
            let plain = lora_grads(load(), false, 0.0, batch);
            let checkpointed = lora_grads(load(), true, 0.0, batch);
            let rows = batch.batch * batch.seq;
            for (a, b) in plain.iter().zip(&checkpointed) {
                assert!(max_abs(a) > 0.0, "{rows} rows: a zero gradient");
                assert_eq!(
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{rows} rows, quantized base {keep_quantized}: checkpointing changed a gradient"
                );
            }
        }
    }
}
