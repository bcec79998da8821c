//! DPO against TRL's `DPOTrainer` (fixtures/dpo/make.py made the
//! reference): Skillet's encoding of the pairs equals the token ids TRL
//! trained on, and for each loss (sigmoid, hinge, ipo, robust) two steps
//! from PEFT's starting adapter agree in loss (ln 2 at the first sigmoid
//! step), gradient norm, TRL's logged metrics, every LoRA gradient and the
//! updated adapter, within 1e-4 relative.

mod common;

use candle_core::Device;
use common::{close, fixtures, ids, rel_diff};
use skillet_adapters::{LoraAdapter, load_peft, peft_tensor_name};
use skillet_data::{EncodeOptions, Encoder, PairFormat, TokenizedPair, read_pairs};
use skillet_models::{Adapted, LoadOptions, ModelSource};
use skillet_tokenizer::{ChatTemplate, Tokenizer};
use skillet_train::{
    AdamW, AdamWConfig, Dpo, DpoLoss, DpoSettings, LoopSettings, Objective, PairSet, Schedule,
    ScheduleKind, TrainState, Trainable, Trainer, backward, collect_grads, pair_batch, pair_logps,
};

#[test]
fn two_dpo_steps_match_trl_for_every_loss() {
    let dir = fixtures().join("dpo");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json")).unwrap()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("steps.safetensors"), &Device::Cpu).unwrap();
    let hf = fixtures().join("tiny-hf/llama");

    // Skillet's own encoding is what TRL was given.
    let tok = Tokenizer::from_hf_dir(&hf).unwrap();
    let tmpl = ChatTemplate::from_hf_dir(&hf, tok.specials())
        .unwrap()
        .unwrap();
    let file = dir.join("pairs.jsonl");
    let (format, read) = read_pairs(&file, PairFormat::Auto).unwrap();
    assert_eq!(format, PairFormat::Conversational);
    let opts = EncodeOptions {
        max_seq_len: 64,
        train_on_prompt: false,
        add_eos: true,
    };
    let pairs: Vec<TokenizedPair> = Encoder::new(&tok, Some(&tmpl), opts)
        .encode_pairs(&file, &read)
        .unwrap();
    for (p, want) in pairs.iter().zip(record["pairs"].as_array().unwrap()) {
        assert_eq!(p.prompt, ids(&want["prompt_ids"]), "line {}", p.line);
        assert_eq!(p.chosen, ids(&want["chosen_ids"]), "line {}", p.line);
        assert_eq!(p.rejected, ids(&want["rejected_ids"]), "line {}", p.line);
    }

    let base = ModelSource::open(&hf)
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap();
    let (config, initial) = load_peft(&dir.join("initial")).unwrap();
    let settings = config.settings().unwrap();
    let hp = &record["hyper"];
    let f = |k: &str| hp[k].as_f64().unwrap();
    let pad = tok.specials().pad.as_ref().map_or(0, |p| p.id);
    for (loss_name, run) in record["losses"].as_object().unwrap() {
        let loss = match loss_name.as_str() {
            "sigmoid" => DpoLoss::Sigmoid,
            "hinge" => DpoLoss::Hinge,
            "ipo" => DpoLoss::Ipo,
            "robust" => DpoLoss::Robust,
            other => panic!("unknown loss {other}"),
        };
        let adapter = LoraAdapter::new(&base, &settings, 0, Some(&initial)).unwrap();
        // The reference: PEFT's starting adapter has B = 0, the base itself.
        let start = Adapted::new(&base, Trainable::adapter(&adapter));
        let refs = pair_logps(&start, &pairs, 4, pad).unwrap();
        let objective = Dpo {
            settings: DpoSettings {
                loss,
                beta: f("beta"),
                label_smoothing: run["label_smoothing"].as_f64().unwrap(),
            },
            train: PairSet {
                pairs: &pairs,
                reference: &refs,
            },
            valid: PairSet {
                pairs: &[],
                reference: &[],
            },
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
        let vars = adapter.vars();
        let mut worst = 0f32;
        for (k, want) in run["steps"].as_array().unwrap().iter().enumerate() {
            let n = k + 1;
            // File order, two pairs per step, as TRL's sequential sampler.
            let batch = pair_batch(&pairs, &[2 * k, 2 * k + 1], pad);
            let policy = Adapted::new(&base, Trainable::adapter(&adapter));
            let part = objective.loss(&policy, &batch).unwrap();
            let grads = collect_grads(
                &backward(&policy, &(part.graph / 2.0).unwrap()).unwrap(),
                &vars,
            )
            .unwrap();
            for (p, (ga, gb)) in adapter
                .params
                .iter()
                .zip(grads.chunks(2).map(|g| (&g[0], &g[1])))
            {
                for (part, g) in [("lora_A", ga), ("lora_B", gb)] {
                    let key = format!(
                        "{loss_name}.step{n}.grad.{}",
                        peft_tensor_name(&p.module, part)
                    );
                    let d = rel_diff(g, &reference[&key]);
                    assert!(d < 1e-4, "{key}: relative difference {d}");
                    worst = worst.max(d);
                }
            }
            let stats = trainer
                .step(&objective, std::slice::from_ref(&batch))
                .unwrap();
            close(
                stats.loss,
                want["loss"].as_f64().unwrap(),
                &format!("{loss_name} step {n} loss"),
            );
            if n == 1 && loss == DpoLoss::Sigmoid {
                assert!(
                    (stats.loss - std::f64::consts::LN_2).abs() < 1e-7,
                    "{}",
                    stats.loss
                );
            }
            close(
                stats.grad_norm,
                want["grad_norm"].as_f64().unwrap(),
                &format!("{loss_name} step {n} grad norm"),
            );
            for name in [
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected",
            ] {
                let got = stats.metrics[name];
                let w = want[name].as_f64().unwrap();
                // Rewards are β times differences of f32 log-probabilities
                // near 50, whose last bits (≈ 4e-6) both sides round: an
                // absolute floor of 1e-5, else 1e-4 relative.
                assert!(
                    (got - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                    "{loss_name} step {n} {name}: {got} vs TRL {w}"
                );
            }
            for p in &adapter.params {
                for (part, var) in [("lora_A", &p.a), ("lora_B", &p.b)] {
                    let key = format!(
                        "{loss_name}.step{n}.after.{}",
                        peft_tensor_name(&p.module, part)
                    );
                    let d = rel_diff(var, &reference[&key]);
                    assert!(d < 1e-4, "{key}: relative difference {d}");
                    worst = worst.max(d);
                }
            }
        }
        eprintln!("{loss_name}: worst relative difference {worst:e}");
    }
}
