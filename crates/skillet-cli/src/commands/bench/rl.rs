//! The preference and RL workloads of `skillet bench`: DPO steps over
//! preference pairs and GRPO steps (sampling, scoring and the update), each
//! through the objective and trainer `skillet train` runs.

use skillet_adapters::LoraAdapter;
use skillet_data::{EncodeOptions, PairFormat};
use skillet_models::{Adapted, CausalLm, Model};
use skillet_runtime::{Bundle, PairData, PromptSet, PromptSource, RewardFn, quantized_sampler};
use skillet_train::{
    Dpo, DpoLoss, DpoSettings, Grpo, GrpoBatch, GrpoLoss, GrpoSettings, Objective, PairSet,
    RewardSpec, ScaleRewards, Trainable, pair_logps,
};

use super::{Args, bench_trainer, lora_settings, prepare_training, time_steps};

/// What a workload measured: tokens/s, the median step time and the
/// tokens per sequence it reports.
pub(super) struct Timed {
    pub tokens_per_s: f64,
    pub step_seconds: f64,
    pub seq: usize,
}

/// DPO (sigmoid loss, β 0.1) on `args.pairs`, `args.batch` pairs per step,
/// with TRL's default reference: the base with the adapter off, whose
/// log-probabilities are computed once before the timed steps (as
/// `skillet train` does) and not timed. Tokens are both sides' prompt and
/// completion tokens.
pub(super) fn dpo(args: &Args, bundle: &Bundle, model: &mut Model) -> anyhow::Result<Timed> {
    let options = EncodeOptions {
        max_seq_len: 1024,
        train_on_prompt: false,
        add_eos: true,
    };
    let data = PairData::load(&args.pairs, PairFormat::Auto, bundle, options, None)?;
    let adapter = LoraAdapter::new(model, &lora_settings(args)?, 0, None)?;
    prepare_training(model, &adapter, args);
    let pad = bundle.pad_id();
    let reference = pair_logps(
        &Adapted::new(&*model, adapter.adapter()),
        &data.tokenized,
        args.batch,
        pad,
    )?;
    let objective = Dpo {
        settings: DpoSettings {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
        },
        train: PairSet {
            pairs: &data.tokenized,
            reference: &reference,
        },
        valid: PairSet {
            pairs: &[],
            reference: &[],
        },
        pad_id: pad,
        eval_batch: 1,
    };
    let order: Vec<usize> = (0..data.tokenized.len()).collect();
    let batches = objective.batches(&order, args.batch);
    let mut trainer = bench_trainer(&*model, &adapter);
    let (tokens_per_s, step_seconds) = time_steps(args, |i| {
        let batch = &batches[i % batches.len()];
        trainer.step(&objective, std::slice::from_ref(batch))?;
        Ok(batch.rows.real_tokens())
    })?;
    let sides = 2 * data.tokenized.len().max(1);
    let tokens: usize = data
        .tokenized
        .iter()
        .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
        .sum();
    Ok(Timed {
        tokens_per_s,
        step_seconds,
        seq: tokens / sides,
    })
}

/// GRPO on `args.prompts`: each step samples `args.generations`
/// completions of `args.batch / args.generations` prompts, every one
/// exactly `args.seq` tokens long (end-of-turn ignored, so both sides of a
/// comparison generate the same lengths), scores them with `json_valid`,
/// and updates (DAPO loss, β 0: no reference pass, one iteration, TRL's
/// defaults). Sampling reads the base in its quantized blocks where it
/// has them, as `skillet train` does, its inputs in f32 or int8
/// (`--activations`). Tokens are the completion tokens
/// sampled per step.
pub(super) fn grpo(args: &Args, bundle: &Bundle, model: &mut Model) -> anyhow::Result<Timed> {
    let g = args.generations.max(1);
    if !args.batch.is_multiple_of(g) {
        anyhow::bail!(
            "grpo: --batch ({}) counts completions and must be a multiple of --generations ({g})",
            args.batch
        );
    }
    let prompts = PromptSet::load(&args.prompts, bundle, usize::MAX)?;
    let adapter = LoraAdapter::new(model, &lora_settings(args)?, 0, None)?;
    prepare_training(model, &adapter, args);
    let settings = GrpoSettings {
        loss: GrpoLoss::Dapo,
        beta: 0.0,
        epsilon: 0.2,
        epsilon_high: 0.2,
        num_generations: g,
        max_completion_length: args.seq,
        temperature: 1.0,
        scale_rewards: ScaleRewards::Group,
        num_iterations: 1,
        bias_correction_kl: true,
    };
    let rewards = RewardFn::build_all(&[RewardSpec::JsonValid { weight: 1.0 }], model)?;
    let none = prompts.subset(&[]);
    let sampler = quantized_sampler(bundle, false)?;
    let source = PromptSource {
        train: &prompts,
        valid: &none,
        tokenizer: &bundle.tokenizer,
        rewards: &rewards,
        settings,
        top_p: 1.0,
        seed: 0,
        pad_id: bundle.pad_id(),
        sampler: sampler.as_ref().map(|m| m as &dyn CausalLm),
        activations: args.activations.resolve(),
        ignore_eos: true,
    };
    let objective = Grpo {
        settings,
        source: &source,
        reference: None,
        reference_model: None,
        pad_id: bundle.pad_id(),
    };
    let order: Vec<usize> = (0..prompts.ids.len()).collect();
    let batches: Vec<GrpoBatch> = objective.batches(&order, args.batch);
    let mut trainer = bench_trainer(&*model, &adapter);
    let (tokens_per_s, step_seconds) = time_steps(args, |i| {
        let group = std::slice::from_ref(&batches[i % batches.len()]);
        let step = trainer.state.step;
        let (ready, _) = objective
            .prepare(trainer.model, trainer.trainable.adapter(), group, step)?
            .ok_or_else(|| anyhow::anyhow!("GRPO prepared nothing to train on"))?;
        let stats = trainer.step(&objective, &ready)?;
        Ok(stats.tokens)
    })?;
    Ok(Timed {
        tokens_per_s,
        step_seconds,
        seq: args.seq,
    })
}
