//! GRPO's formulas against TRL's `GRPOTrainer._compute_loss`
//! (fixtures/grpo/make.py made the reference) on fixed completions and
//! rewards: per-token log-probabilities at the sampling temperature (policy
//! and reference), advantages for every `scale_rewards`, and for `dapo`,
//! `grpo` and `dr_grpo` with and without the KL term and with clipping on
//! both sides, the loss, TRL's KL and clip-ratio metrics and every LoRA
//! gradient, within 1e-4 relative.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, flat, ids, rel_diff_values};
use skillet_adapters::{LoraAdapter, load_peft, peft_tensor_name};
use skillet_models::{Adapted, LoadOptions, ModelSource};
use skillet_train::{
    GrpoLoss, GrpoSettings, RolloutBatch, ScaleRewards, Trainable, advantages, backward,
    collect_grads, grpo_loss, rollout_rows, shared_prompt_rows, token_logps,
};

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-6 + 1e-4 * want.abs(),
        "{what}: {got} vs TRL {want}"
    );
}

#[test]
fn grpo_losses_and_gradients_match_trl() {
    let dir = fixtures().join("grpo");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("losses.json")).unwrap()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("losses.safetensors"), &Device::Cpu).unwrap();
    let base = ModelSource::open(&fixtures().join("tiny-hf/llama"))
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap();
    let (config, initial) = load_peft(&dir.join("initial")).unwrap();
    let adapter = LoraAdapter::new(&base, &config.settings().unwrap(), 0, Some(&initial)).unwrap();
    let policy = Adapted::new(&base, Trainable::adapter(&adapter));

    let g = record["num_generations"].as_u64().unwrap() as usize;
    let prompts: Vec<Vec<u32>> = record["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let completions: Vec<Vec<u32>> = record["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = completions
        .iter()
        .enumerate()
        .map(|(i, c)| (prompts[i / g].as_slice(), c.as_slice()))
        .collect();
    let groups: Vec<Vec<&[u32]>> = completions
        .chunks(g)
        .map(|cs| cs.iter().map(Vec::as_slice).collect())
        .collect();
    let groups: Vec<(&[u32], &[&[u32]])> = prompts
        .iter()
        .zip(&groups)
        .map(|(p, cs)| (p.as_slice(), cs.as_slice()))
        .collect();
    // One row per completion, and each prompt once with its completions
    // after it: both against TRL.
    for (layout, (rows, owner)) in [
        ("separate", rollout_rows(&pairs, 0)),
        ("shared", shared_prompt_rows(&groups, 0)),
    ] {
        check_layout(
            layout,
            &record,
            &reference,
            &adapter,
            &policy,
            &base,
            &rows,
            &owner,
            &completions,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check_layout(
    layout: &str,
    record: &serde_json::Value,
    reference: &std::collections::HashMap<String, Tensor>,
    adapter: &LoraAdapter,
    policy: &dyn skillet_models::CausalLm,
    base: &dyn skillet_models::CausalLm,
    rows: &skillet_train::TrainBatch,
    owner: &[usize],
    completions: &[Vec<u32>],
) {
    let g = record["num_generations"].as_u64().unwrap() as usize;
    let max_len = record["max_completion_length"].as_u64().unwrap() as usize;
    let temperature = record["temperature"].as_f64().unwrap();
    // TRL's [rows, max_completion_length] tensors, at the completion tokens.
    let at_completions = |t: &Tensor| -> Vec<f32> {
        let m = t.to_vec2::<f32>().unwrap();
        completions
            .iter()
            .enumerate()
            .flat_map(|(i, c)| m[i][..c.len()].to_vec())
            .collect()
    };
    let current = flat(&token_logps(policy, rows, temperature).unwrap());
    let d = rel_diff_values(&current, &at_completions(&reference["current_logps"]));
    assert!(d < 1e-5, "{layout}: policy log-probabilities: {d}");
    let ref_logps = flat(&token_logps(base, rows, temperature).unwrap());
    let d = rel_diff_values(&ref_logps, &at_completions(&reference["ref_logps"]));
    assert!(d < 1e-5, "{layout}: reference log-probabilities: {d}");

    let weights: Vec<f64> = record["reward_weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    let rewards: Vec<f64> = record["reward_values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .zip(&weights)
                .map(|(v, w)| v.as_f64().unwrap() * w)
                .sum()
        })
        .collect();
    let vars = adapter.vars();
    let mut worst = 0f32;
    for case in record["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let scale = match case["scale_rewards"].as_str().unwrap() {
            "group" => ScaleRewards::Group,
            "batch" => ScaleRewards::Batch,
            _ => ScaleRewards::None,
        };
        let (adv, zero) = advantages(&rewards, g, scale);
        for (a, w) in adv.iter().zip(case["advantages"].as_array().unwrap()) {
            close(*a, w.as_f64().unwrap(), &format!("{name} advantage"));
        }
        close(
            zero,
            case["frac_reward_zero_std"].as_f64().unwrap(),
            "frac_reward_zero_std",
        );
        let epsilon = case["epsilon"].as_f64().unwrap();
        let s = GrpoSettings {
            loss: match case["loss_type"].as_str().unwrap() {
                "dapo" => GrpoLoss::Dapo,
                "grpo" => GrpoLoss::Grpo,
                _ => GrpoLoss::DrGrpo,
            },
            beta: case["beta"].as_f64().unwrap(),
            epsilon,
            epsilon_high: case["epsilon_high"].as_f64().unwrap_or(epsilon),
            num_generations: g,
            max_completion_length: max_len,
            temperature,
            scale_rewards: scale,
            num_iterations: 1,
            bias_correction_kl: case["bias_correction_kl"].as_bool().unwrap_or(true),
        };
        let batch = RolloutBatch {
            rows: rows.clone(),
            owner: owner.to_vec(),
            advantages: adv,
            lens: completions.iter().map(Vec::len).collect(),
            old: case["old"]
                .as_bool()
                .unwrap()
                .then(|| at_completions(&reference[&format!("{name}.old_logps")])),
            reference: (s.beta != 0.0).then(|| ref_logps.clone()),
        };
        let part = grpo_loss(&s, policy, &batch).unwrap();

        let tokens = rows.target_count();
        let units = match s.loss {
            GrpoLoss::Dapo => tokens,
            _ => completions.len(),
        };
        close(
            part.value / units as f64,
            case["loss"].as_f64().unwrap(),
            &format!("{name} loss"),
        );
        let metrics = &case["metrics"];
        for (k, v) in &part.token_metrics {
            close(
                v / tokens as f64,
                metrics[k].as_f64().unwrap(),
                &format!("{name} {k}"),
            );
        }
        assert_eq!(part.token_metrics.contains_key("kl"), s.beta != 0.0);
        let grads = collect_grads(
            &backward(policy, &(part.graph / units as f64).unwrap()).unwrap(),
            &vars,
        )
        .unwrap();
        for (p, gs) in adapter.params.iter().zip(grads.chunks(2)) {
            for (part, g) in [("lora_A", &gs[0]), ("lora_B", &gs[1])] {
                let key = format!("{name}.grad.{}", peft_tensor_name(&p.module, part));
                let d = rel_diff_values(&flat(g), &flat(&reference[&key]));
                assert!(d < 1e-4, "{layout} {key}: relative difference {d}");
                worst = worst.max(d);
            }
        }
    }
    eprintln!("GRPO ({layout}): worst relative gradient difference {worst:e}");
}
