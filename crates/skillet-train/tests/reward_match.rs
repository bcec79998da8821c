//! The reward model against TRL's `RewardTrainer` (fixtures/reward/make.py
//! made the reference): Skillet's encoding of the pairs is what TRL scored,
//! the adapter PEFT saved from TRL's model loads and scores every sequence
//! as TRL did, and two training steps from it (Bradley–Terry loss with
//! margins and `center_rewards_coefficient`) agree in loss, gradient norm,
//! TRL's logged metrics, every LoRA and `score` gradient and the updated
//! parameters, within 1e-4 relative. The trained adapter is saved in
//! PEFT's sequence-classification form and reads back as it was.

mod common;

use candle_core::{Device, Tensor};
use common::{close, fixtures, ids, rel_diff};
use skillet_adapters::{RewardAdapter, peft_tensor_name, read_peft};
use skillet_data::{EncodeOptions, Encoder, PairFormat, TokenizedPair, read_pairs};
use skillet_models::{Adapted, LoadOptions, ModelSource};
use skillet_tokenizer::{ChatTemplate, Tokenizer};
use skillet_train::{
    AdamW, AdamWConfig, LoopSettings, Objective, Reward, RewardSettings, Schedule, ScheduleKind,
    TrainState, Trainable, Trainer, backward, collect_grads, pair_batch, score_sequences,
};

#[test]
fn reward_model_matches_trl() {
    let dir = fixtures().join("reward");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json")).unwrap()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("steps.safetensors"), &Device::Cpu).unwrap();
    let hf = fixtures().join("tiny-hf/llama");

    // Skillet's own encoding is what TRL was given, margins included.
    let tok = Tokenizer::from_hf_dir(&hf).unwrap();
    let tmpl = ChatTemplate::from_hf_dir(&hf, tok.specials())
        .unwrap()
        .unwrap();
    let file = dir.join("pairs.jsonl");
    let (_, read) = read_pairs(&file, PairFormat::Auto).unwrap();
    let opts = EncodeOptions {
        max_seq_len: 64,
        train_on_prompt: false,
        add_eos: true,
    };
    let pairs: Vec<TokenizedPair> = Encoder::new(&tok, Some(&tmpl), opts)
        .encode_pairs(&file, &read)
        .unwrap();
    let want_pairs = record["pairs"].as_array().unwrap();
    for (p, want) in pairs.iter().zip(want_pairs) {
        assert_eq!(
            p.side(true).ids,
            ids(&want["chosen_ids"]),
            "line {}",
            p.line
        );
        assert_eq!(
            p.side(false).ids,
            ids(&want["rejected_ids"]),
            "line {}",
            p.line
        );
        assert_eq!(
            p.margin,
            want["margin"].as_f64().unwrap(),
            "line {}",
            p.line
        );
    }

    let base = ModelSource::open(&hf)
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap();
    // The adapter PEFT saved from TRL's model scores as TRL did. Padding
    // with the end-of-turn id (this tokenizer's pad) changes nothing: the
    // reward is read at each sequence's true end.
    let pad = tok.specials().pad.as_ref().map_or(0, |p| p.id);
    assert_eq!(pad, tok.specials().eos.as_ref().unwrap().id);
    let frozen = RewardAdapter::load(&base, &dir.join("initial")).unwrap();
    let scorer = Adapted::new(&base, Trainable::adapter(&frozen));
    let sequences: Vec<Vec<u32>> = pairs
        .iter()
        .flat_map(|p| [p.side(true).ids, p.side(false).ids])
        .collect();
    let got = score_sequences(&scorer, &frozen.score, &sequences, 3, pad).unwrap();
    let want: Vec<f64> = record["initial_rewards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    for (g, w) in got.iter().zip(&want) {
        close(*g as f64, *w, "initial reward");
    }

    let initial = read_peft(&dir.join("initial")).unwrap();
    let settings = initial.config.settings().unwrap();
    let hp = &record["hyper"];
    let f = |k: &str| hp[k].as_f64().unwrap();
    let adapter = RewardAdapter::new(&base, &settings, 0, Some(&initial)).unwrap();
    let objective = Reward {
        settings: RewardSettings {
            center_rewards_coefficient: Some(f("center")),
        },
        score: adapter.score.clone(),
        train: &pairs,
        valid: &pairs,
        pad_id: pad,
        eval_batch: 4,
    };
    let lr = f("lr");
    let mut trainer = Trainer {
        model: &base,
        trainable: &adapter,
        opt: AdamW::new(
            adapter.vars(),
            AdamWConfig {
                lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        ),
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak: lr,
            warmup: 0,
            total: 2,
        },
        settings: LoopSettings {
            epochs: 1,
            max_steps: Some(2),
            batch_size: 2,
            grad_accum: 1,
            max_grad_norm: Some(f("max_grad_norm")),
            eval_every: None,
            save_every: None,
            seed: 0,
        },
        out: std::env::temp_dir(),
        base_model: None,
        state: TrainState::default(),
    };
    // The parameters with their names in TRL's records.
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for p in &adapter.lora.params {
        named.push((peft_tensor_name(&p.module, "lora_A"), p.a.clone()));
        named.push((peft_tensor_name(&p.module, "lora_B"), p.b.clone()));
    }
    named.push((
        "base_model.model.score.weight".into(),
        adapter.score.clone(),
    ));
    let vars = adapter.vars();
    assert_eq!(vars.len(), named.len());
    let mut worst = 0f32;
    for (k, want) in record["steps"].as_array().unwrap().iter().enumerate() {
        let n = k + 1;
        // File order, two pairs per step, as TRL's sequential sampler.
        let batch = pair_batch(&pairs, &[2 * k, 2 * k + 1], pad);
        let model = Adapted::new(&base, Trainable::adapter(&adapter));
        let part = objective.loss(&model, &batch).unwrap();
        let grads = collect_grads(
            &backward(&model, &(part.graph / 2.0).unwrap()).unwrap(),
            &vars,
        )
        .unwrap();
        for ((name, _), g) in named.iter().zip(&grads) {
            let key = format!("step{n}.grad.{name}");
            let d = rel_diff(g, &reference[&key]);
            assert!(d < 1e-4, "{key}: relative difference {d}");
            worst = worst.max(d);
        }
        let stats = trainer
            .step(&objective, std::slice::from_ref(&batch))
            .unwrap();
        close(stats.loss, want["loss"].as_f64().unwrap(), "loss");
        close(
            stats.grad_norm,
            want["grad_norm"].as_f64().unwrap(),
            "grad norm",
        );
        for name in ["accuracy", "margin", "mean_reward"] {
            let (got, w) = (stats.metrics[name], want[name].as_f64().unwrap());
            // Margins are differences of rewards near 0.3 whose last f32
            // bits both sides round: an absolute floor of 1e-6.
            assert!(
                (got - w).abs() <= 1e-6 + 1e-4 * w.abs(),
                "step {n} {name}: {got} vs TRL {w}"
            );
        }
        for (name, t) in &named {
            let key = format!("step{n}.after.{name}");
            let d = rel_diff(t, &reference[&key]);
            assert!(d < 1e-4, "{key}: relative difference {d}");
            worst = worst.max(d);
        }
    }
    eprintln!("reward model: worst relative difference {worst:e}");

    // Held-out metrics carry TRL's evaluation names.
    let model = Adapted::new(&base, Trainable::adapter(&adapter));
    let m = objective.validate(&model).unwrap();
    for k in [
        "loss",
        "accuracy",
        "margin",
        "mean_reward",
        "min_reward",
        "max_reward",
    ] {
        assert!(m[k].is_finite(), "{k}");
    }
    assert!(m["min_reward"] <= m["mean_reward"] && m["mean_reward"] <= m["max_reward"]);

    // Saved as PEFT saves a sequence-classification adapter; read back equal.
    let out = tempfile::tempdir().unwrap();
    Trainable::save(&adapter, out.path(), None).unwrap();
    let saved = read_peft(out.path()).unwrap();
    assert_eq!(saved.config.task_type.as_deref(), Some("SEQ_CLS"));
    assert_eq!(
        saved.config.modules_to_save,
        Some(serde_json::json!(["score"]))
    );
    assert_eq!(
        rel_diff(&saved.modules["score.weight"], &adapter.score),
        0.0
    );
    let again = RewardAdapter::load(&base, out.path()).unwrap();
    let a = score_sequences(
        &Adapted::new(&base, Trainable::adapter(&again)),
        &again.score,
        &sequences,
        8,
        pad,
    )
    .unwrap();
    let b = score_sequences(&model, &adapter.score, &sequences, 8, pad).unwrap();
    // The trainable adapter runs through the fused training kernel and the
    // loaded one through plain products: the same numbers summed in
    // another order, so equal to f32 rounding, not bit for bit.
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
            "sequence {i}: {x} read back, {y} as trained"
        );
    }
    // A LoRA-only reader refuses it rather than dropping the head.
    let err = skillet_adapters::load_peft(out.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("score.weight"), "{err}");
}
