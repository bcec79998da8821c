//! `skillet bench`: speed and memory of training and inference workloads
//! on one model, measured the same way as the PyTorch reference in
//! `bench/reference/` so the two can be compared side by side.
//!
//! Each timed workload runs `--warmup` untimed steps, then `--steps` timed
//! ones; the median step time gives tokens/s. Peak RSS is the process's
//! high-water mark (VmHWM), so with no `--workload` each workload runs in
//! its own child process. MFU is useful FLOPs (2 per matmul parameter per
//! token forward, 4 with the input gradient, 6 with weight gradients) over
//! an f32 GEMM rate measured at start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use candle_core::{Device, Tensor};
use serde::Serialize;
use skillet_adapters::{LoraAdapter, LoraSettings, Targets};
use skillet_data::{DataFormat, EncodeOptions};
use skillet_generate::{GenerateOptions, SamplingParams, generate};
use skillet_models::{
    Activations, Adapted, Adapter, CausalLm, ForwardInput, LoadOptions, Model, Rng,
};

use crate::args::{ActivationsArg, PrecisionArg};
use skillet_train::{
    AdamW, AdamWConfig, FullWeights, LoopSettings, Schedule, ScheduleKind, Sft, TrainBatch,
    TrainState, Trainable, Trainer, collate, collate_packed,
};

use skillet_runtime::Bundle;
use skillet_runtime::Dataset;

mod rl;

const WORKLOADS: [&str; 11] = [
    "lora",
    "qlora",
    "qlora-nf4",
    "full",
    "sft",
    "dpo",
    "grpo",
    "score",
    "decode",
    "prefill",
    "prefill-lora",
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model (default: the fetched default model, see scripts/fetch-model.sh).
    #[arg(long, env = "SKILLET_MODEL")]
    model: Option<PathBuf>,
    /// lora, qlora (over a GGUF's own blocks), qlora-nf4 (a dense base
    /// quantized to NF4 at load, double quantized; needs an f32/f16/bf16
    /// model, e.g. from `skillet export --type f16`), full, sft, dpo
    /// (`--batch` pairs of `--pairs` per
    /// step), grpo (`--batch` completions of `--seq` tokens per step,
    /// `--generations` per prompt of `--prompts`), score, decode, prefill
    /// (batch-1 prompt of `--seq` tokens over the quantized base, as
    /// generation runs it) or prefill-lora (the same with an unmerged LoRA
    /// adapter); all but the prefills and qlora-nf4 when absent.
    #[arg(long)]
    workload: Option<String>,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence (random ids; sft uses the data's own lengths).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps (median reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// JSONL data for the sft workload (default: the bundled example).
    #[arg(long, default_value = "examples/contacts/train.jsonl")]
    data: PathBuf,
    /// Preference pairs for the dpo workload.
    #[arg(long, default_value = "examples/contacts/pairs_train.jsonl")]
    pairs: PathBuf,
    /// Prompts for the grpo workload.
    #[arg(long, default_value = "examples/contacts/prompts_train.jsonl")]
    prompts: PathBuf,
    /// grpo: completions sampled per prompt (G).
    #[arg(long, default_value_t = 8)]
    generations: usize,
    /// Recompute each layer's activations in backward (training
    /// workloads): less memory, more compute.
    #[arg(long)]
    checkpointing: bool,
    /// LoRA workloads: the adapted modules, comma-separated (PEFT's default
    /// for Llama is q_proj,v_proj).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj"
    )]
    targets: Vec<String>,
    /// sft: pad each batch to its longest example (the usual recipe)
    /// instead of packing its examples into one row.
    #[arg(long)]
    pad: bool,
    /// decode, the prefills and grpo's sampling: how quantized weights take their inputs
    /// (f32: the dequantized model's numbers; int8: rounded per block of
    /// 32, as llama.cpp does).
    #[arg(long, value_enum, default_value_t = ActivationsArg::F32)]
    activations: ActivationsArg,
    /// Precision of the frozen weights' products in training and scoring
    /// workloads (auto: bf16 where the CPU has AMX tiles, as `train.precision`).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    /// Print one JSON object (a single workload) instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead of benchmarking, write a GGUF with random weights of this
    /// shape (llama-3.2-1b, llama-3.2-3b, tiny; Q4_1 blocks, the tokenizer
    /// of `--model`) to `--out`, for benchmarks at that size.
    #[arg(long, requires = "out")]
    write_random: Option<String>,
    /// Where `--write-random` writes.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct Row {
    workload: String,
    batch: usize,
    seq: usize,
    /// The precision the workload ran in (generation workloads: how the
    /// quantized products took their inputs, f32 or int8).
    #[serde(default)]
    precision: String,
    tokens_per_s: f64,
    peak_rss_mib: f64,
    mfu: f64,
    step_seconds: f64,
    gemm_gflops: f64,
    /// Which library ran the f32 products (`gemm`, or MKL where present
    /// and measured faster per shape).
    #[serde(default)]
    products: String,
    /// The adapted modules of the LoRA workloads, comma-separated (empty
    /// for the others).
    #[serde(default)]
    targets: String,
}

fn default_model() -> anyhow::Result<PathBuf> {
    let cache = skillet_kernels::cache_dir()
        .ok_or_else(|| anyhow::anyhow!("no cache folder: set SKILLET_CACHE or HOME"))?;
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.is_file() {
        bail!(
            "{}: default model not found; run scripts/fetch-model.sh or pass --model",
            p.display()
        );
    }
    Ok(p)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// f32 GEMM rate on this machine (GFLOP/s): the best of ten 2048³
/// products, long enough that a busy moment at start does not set it.
fn gemm_gflops() -> anyhow::Result<f64> {
    const N: usize = 2048;
    let a = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        let _ = a.matmul(&b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (N as f64).powi(3) / best / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Parameters of the matrices every token passes through (projections and LM head).
fn matmul_params(m: &dyn CausalLm) -> f64 {
    let c = m.config();
    let (h, q, kv) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let layer = h * q * 2 + h * kv * 2 + 3 * h * c.intermediate_size;
    (c.num_hidden_layers * layer + c.vocab_size * h) as f64
}

fn random_batch(vocab: usize, batch: usize, seq: usize) -> TrainBatch {
    let mut rng = Rng::new(1234);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    // Labels = ids at every position, as `model(ids, labels=ids)`.
    let labels = ids.iter().map(|&i| i as i64).collect();
    TrainBatch {
        batch,
        seq,
        ids,
        key_mask: vec![1; batch * seq],
        positions: None,
        segments: None,
        labels,
    }
}

/// Greedy generation of exactly `max_tokens` tokens (no stop, no EOS).
fn greedy(max_tokens: usize, activations: ActivationsArg) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::default(),
        stop: vec![],
        eos_ids: vec![],
        activations: activations.resolve(),
        logprobs: None,
    }
}

/// Rank 8, alpha 16 over `args.targets`.
fn lora_settings(args: &Args) -> anyhow::Result<LoraSettings> {
    let targets = Targets::Names(args.targets.clone());
    Ok(LoraSettings::new(8, 16.0, 0.0, false, targets)?)
}

/// The benchmarks' trainer for `trainable`: AdamW at a constant 1e-4,
/// clipping at 1.0, one micro-batch per step.
fn bench_trainer<'a>(model: &'a Model, trainable: &'a dyn Trainable) -> Trainer<'a> {
    Trainer {
        model,
        trainable,
        opt: AdamW::new(
            trainable.vars(),
            AdamWConfig {
                lr: 1e-4,
                ..Default::default()
            },
        ),
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            peak: 1e-4,
            warmup: 0,
            total: 0,
        },
        settings: LoopSettings {
            epochs: 1,
            max_steps: None,
            batch_size: 1,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            eval_every: None,
            save_every: None,
            seed: 0,
        },
        out: std::env::temp_dir(),
        base_model: None,
        state: TrainState::default(),
    }
}

/// Runs `args.warmup` untimed, then `args.steps` timed calls of `step`
/// (given the call's index, returning the tokens it processed): tokens/s
/// of the median step (for variable-length data, of the median tokens per
/// step) and the median step time.
fn time_steps(
    args: &Args,
    mut step: impl FnMut(usize) -> anyhow::Result<usize>,
) -> anyhow::Result<(f64, f64)> {
    let mut times = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        let n = step(i)?;
        if i >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
            tokens.push(n as f64);
        }
    }
    Ok((median(tokens) / median(times.clone()), median(times)))
}

/// Sets activation checkpointing and the precision of the frozen weights'
/// products as `args` asks, for training `trainable`.
fn prepare_training(model: &mut Model, trainable: &dyn Trainable, args: &Args) {
    if args.checkpointing {
        model.set_activation_checkpointing(Some(trainable.vars()));
    }
    model.set_precision(args.precision.resolve());
}

/// Times SFT steps of `trainable` over `batches` (cycled), through the
/// trainer's own `step()`.
fn time_training(
    model: &mut Model,
    trainable: &dyn Trainable,
    batches: &[TrainBatch],
    args: &Args,
) -> anyhow::Result<(f64, f64)> {
    prepare_training(model, trainable, args);
    let objective = Sft {
        train: &[],
        valid: &[],
        packing: None,
        pad_id: 0,
        eval_batch: 1,
    };
    let mut trainer = bench_trainer(&*model, trainable);
    time_steps(args, |i| {
        let batch = &batches[i % batches.len()];
        trainer.step(&objective, std::slice::from_ref(batch))?;
        Ok(batch.real_tokens())
    })
}

fn run_one(
    args: &Args,
    workload: &str,
    model_path: &std::path::Path,
    gemm: f64,
) -> anyhow::Result<Row> {
    let bundle = Bundle::open(model_path)?;
    // QLoRA trains over the quantized blocks; generation reads them.
    let keep_quantized = matches!(workload, "qlora" | "decode" | "prefill" | "prefill-lora");
    // A frozen base multiplied in bf16 is held in bf16, as `skillet train`
    // holds it.
    let frozen = matches!(
        workload,
        "lora" | "qlora" | "sft" | "dpo" | "grpo" | "score"
    );
    let quantize = (workload == "qlora-nf4")
        .then_some(skillet_models::QuantizeBase::Nf4 { double_quant: true });
    let mut model = bundle.load_model(LoadOptions {
        keep_quantized,
        trainable: workload == "full",
        frozen_bf16: frozen && args.precision.resolve().holds_base_in_bf16(),
        quantize,
        ..Default::default()
    })?;
    let params = matmul_params(&model);
    let vocab = model.config().vocab_size;
    let (tps, step, flops_per_token, seq) = match workload {
        "lora" | "qlora" | "qlora-nf4" => {
            let adapter = LoraAdapter::new(&model, &lora_settings(args)?, 0, None)?;
            let batches = [random_batch(vocab, args.batch, args.seq)];
            let (tps, step) = time_training(&mut model, &adapter, &batches, args)?;
            (tps, step, 4.0 * params, args.seq)
        }
        "sft" => {
            let opts = EncodeOptions {
                max_seq_len: 1024,
                train_on_prompt: false,
                add_eos: true,
            };
            let data = Dataset::load(&args.data, DataFormat::Auto, &bundle, opts)?;
            let adapter = LoraAdapter::new(&model, &lora_settings(args)?, 0, None)?;
            // The same `batch` examples per step as the padded recipe, packed
            // into one row (segments keep them apart) instead of padded.
            let batches: Vec<TrainBatch> = data
                .tokenized
                .chunks(args.batch)
                .map(|c| {
                    let refs: Vec<_> = c.iter().collect();
                    if args.pad {
                        return collate(&refs, bundle.pad_id());
                    }
                    let total = c.iter().map(|e| e.ids.len()).sum();
                    let packed = skillet_data::pack(&refs, total);
                    collate_packed(&packed.iter().collect::<Vec<_>>(), bundle.pad_id())
                })
                .collect();
            let mean_len = data.tokenized.iter().map(|t| t.ids.len()).sum::<usize>()
                / data.tokenized.len().max(1);
            let (tps, step) = time_training(&mut model, &adapter, &batches, args)?;
            (tps, step, 4.0 * params, mean_len)
        }
        "dpo" | "grpo" => {
            let t = if workload == "dpo" {
                rl::dpo(args, &bundle, &mut model)?
            } else {
                rl::grpo(args, &bundle, &mut model)?
            };
            // GRPO's tokens are completion tokens: sampled (2 per
            // parameter), then trained on (4; the prompts' are not counted).
            let flops = if workload == "dpo" { 4.0 } else { 6.0 };
            (t.tokens_per_s, t.step_seconds, flops * params, t.seq)
        }
        "score" => {
            model.set_precision(args.precision.resolve());
            let b = random_batch(vocab, args.batch, args.seq);
            let input = ForwardInput::new(Tensor::from_vec(
                b.ids.clone(),
                (args.batch, args.seq),
                &Device::Cpu,
            )?);
            let mut times = Vec::new();
            for i in 0..args.warmup + args.steps {
                let t = Instant::now();
                let _ = model.forward(&input)?;
                if i >= args.warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let step = median(times);
            (
                (args.batch * args.seq) as f64 / step,
                step,
                2.0 * params,
                args.seq,
            )
        }
        "decode" => {
            let prompt = bundle
                .tokenizer
                .encode("Tell me a story about a dragon.", false)?;
            let opts = greedy(128, args.activations);
            let mut rates = Vec::new();
            for i in 0..args.warmup + args.steps.min(3) {
                let g = generate(&model, &bundle.tokenizer, &prompt, &opts, |_| {})?;
                if i >= args.warmup {
                    rates.push(g.decode_tokens_per_second());
                }
            }
            let tps = median(rates);
            (tps, 1.0 / tps, 2.0 * params, 1)
        }
        "prefill" | "prefill-lora" => {
            // A random prompt of `seq` tokens, one new token: the time to
            // the first token, as a server's first step.
            let mut rng = Rng::new(99);
            let prompt: Vec<u32> = (0..args.seq)
                .map(|_| (rng.next_u64() % vocab.min(bundle.tokenizer.vocab_size()) as u64) as u32)
                .collect();
            let adapter = if workload == "prefill-lora" {
                let a = LoraAdapter::new(&model, &lora_settings(args)?, 0, None)?;
                // B away from zero, as a trained adapter: nothing is skipped.
                for v in a.vars().iter().skip(1).step_by(2) {
                    v.set(&Tensor::randn(0f32, 0.01, v.shape(), &Device::Cpu)?)?;
                }
                // Frozen, as a server loads it from its PEFT folder.
                let dir = std::env::temp_dir()
                    .join(format!("skillet-bench-adapter-{}", std::process::id()));
                skillet_adapters::save_peft(&a, &dir, None)?;
                let loaded = LoraAdapter::load(&model, &dir);
                let _ = std::fs::remove_dir_all(&dir);
                let a = loaded?;
                Some(Arc::new(a) as Arc<dyn Adapter>)
            } else {
                None
            };
            let adapted = Adapted::new(&model, adapter);
            let opts = greedy(1, args.activations);
            let mut times = Vec::new();
            for i in 0..args.warmup + args.steps {
                let g = generate(&adapted, &bundle.tokenizer, &prompt, &opts, |_| {})?;
                if i >= args.warmup {
                    times.push(g.prefill_seconds);
                }
            }
            let step = median(times);
            (args.seq as f64 / step, step, 2.0 * params, args.seq)
        }
        "full" => {
            let full = FullWeights {
                named: model.parameters().to_vec(),
            };
            let batches = [random_batch(vocab, args.batch, args.seq)];
            let (tps, step) = time_training(&mut model, &full, &batches, args)?;
            (tps, step, 6.0 * params, args.seq)
        }
        other => bail!(
            "unknown workload '{other}' (one of {})",
            WORKLOADS.join(", ")
        ),
    };
    let batch = match workload {
        "decode" | "prefill" | "prefill-lora" => 1,
        _ => args.batch,
    };
    // Generation reads the quantized blocks with f32 or int8 inputs.
    let precision = match workload {
        "decode" | "prefill" | "prefill-lora" => match args.activations.resolve() {
            Activations::F32 => "f32".to_string(),
            Activations::Int8 => "int8".to_string(),
        },
        _ => format!("{:?}", args.precision.resolve()).to_lowercase(),
    };
    Ok(Row {
        workload: workload.to_string(),
        batch,
        seq,
        precision,
        tokens_per_s: tps,
        peak_rss_mib: peak_rss_mib(),
        mfu: tps * flops_per_token / (gemm * 1e9),
        step_seconds: step,
        gemm_gflops: gemm,
        products: skillet_kernels::gemm_report().to_string(),
        targets: match workload {
            "lora" | "qlora" | "qlora-nf4" | "sft" | "dpo" | "grpo" | "prefill-lora" => {
                args.targets.join(",")
            }
            _ => String::new(),
        },
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = match &args.model {
        Some(p) => p.clone(),
        None => default_model()?,
    };
    if let (Some(shape), Some(out)) = (&args.write_random, &args.out) {
        skillet_runtime::write_random_model(shape, &model, skillet_gguf::GgmlType::Q4_1, out)?;
        println!("{}", out.display());
        return Ok(());
    }
    let gemm = gemm_gflops()?;
    if let Some(w) = &args.workload {
        let row = run_one(&args, w, &model, gemm)?;
        if args.json {
            return crate::output::print_json(&row);
        }
        print_table(&[row], gemm);
        return Ok(());
    }
    // Every workload at 4x256 and 1x512, each in its own process so each
    // peak RSS is its own.
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for w in WORKLOADS
        .into_iter()
        .filter(|w| !w.starts_with("prefill") && *w != "qlora-nf4")
    {
        let shapes: &[(usize, usize)] = match w {
            "decode" => &[(1, 1)],
            "sft" | "dpo" => &[(4, 0)],
            "grpo" => &[(16, 64)],
            _ => &[(4, 256), (1, 512)],
        };
        for &(b, t) in shapes {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args([
                "bench",
                "--json",
                "--workload",
                w,
                "--batch",
                &b.to_string(),
                "--steps",
                &args.steps.to_string(),
            ]);
            cmd.args(["--precision", &args.precision.name()]);
            cmd.args(["--warmup", &args.warmup.to_string(), "--model"])
                .arg(&model)
                .arg("--data")
                .arg(&args.data)
                .arg("--pairs")
                .arg(&args.pairs)
                .arg("--prompts")
                .arg(&args.prompts)
                .args(["--generations", &args.generations.to_string()]);
            if t > 0 {
                cmd.args(["--seq", &t.to_string()]);
            }
            let out = cmd.output()?;
            if out.status.success() {
                rows.push(serde_json::from_slice::<Row>(&out.stdout)?);
            } else {
                eprintln!(
                    "{w} {b}x{t}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    print_table(&rows, gemm);
    Ok(())
}

fn print_table(rows: &[Row], gemm: f64) {
    println!("f32 GEMM (2048³, gemm): {gemm:.1} GFLOP/s");
    for r in rows {
        println!(
            "f32 products ({} {} × {}): {}",
            r.workload, r.batch, r.seq, r.products
        );
    }
    println!();
    println!("| workload | batch × seq | precision | tokens/s | step (s) | peak RSS (MiB) | MFU |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} × {} | {} | {:.1} | {:.3} | {:.0} | {:.1}% |",
            r.workload,
            r.batch,
            r.seq,
            r.precision,
            r.tokens_per_s,
            r.step_seconds,
            r.peak_rss_mib,
            100.0 * r.mfu
        );
    }
}
