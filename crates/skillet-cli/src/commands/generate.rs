//! `skillet generate`: text from a prompt, streamed to the terminal.

use std::io::Write;

use serde::Serialize;
use skillet_generate::{GenerateOptions, generate};
use skillet_models::{Adapted, LoadOptions};
use skillet_runtime::SamplingOptions;
use skillet_tokenizer::Message;

use crate::args::{ActivationsArg, AdapterArg, ModelArg};
use crate::output::print_json;
use skillet_runtime::Bundle;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    adapter: AdapterArg,
    /// Wrap the prompt as a user message with the model's chat template and
    /// its generation prompt (the same template training uses).
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The prompt text.
    #[arg(long, short = 'p')]
    prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic argmax).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalty on tokens already in the prompt or output (1 = off; 1.1–1.3 typical).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed for sampling (same seed, same output).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable); not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// How quantized weights take their inputs (f32: the dequantized
    /// model's numbers; int8: rounded as llama.cpp rounds them for each
    /// weight type, to compare with it, and the faster at one sequence where
    /// the CPU has AVX512-VNNI or AVX2 without AMX; auto: `skillet serve`'s
    /// default, int8 where the CPU has AMX tiles, VNNI or AVX2, to get the
    /// server's exact answers).
    #[arg(long, value_enum, default_value_t = ActivationsArg::F32)]
    activations: ActivationsArg,
    /// With --json: each new token's log-probability and this many most
    /// likely alternatives (0: the chosen token's only).
    #[arg(long, requires = "json", value_parser = clap::value_parser!(u32).range(0..=20))]
    logprobs: Option<u32>,
}

#[derive(Serialize)]
struct Output {
    text: String,
    ids: Vec<u32>,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish_reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Vec<Logprob>>,
}

/// One new token's log-probability (log-softmax of the raw logits).
#[derive(Serialize)]
struct Logprob {
    id: u32,
    logprob: f32,
    /// The most likely tokens, best first: `[id, logprob]`.
    top: Vec<(u32, f32)>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sampling = SamplingOptions {
        temperature: Some(args.temperature),
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: Some(args.repetition_penalty),
        seed: Some(args.seed),
        ..Default::default()
    }
    .resolve(args.seed)
    .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?;
    let b = Bundle::open(&args.model.model)?;
    let prompt_ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", args.prompt.clone()));
        b.chat_prompt(&messages)?
    } else {
        b.text_prompt(&args.prompt)?
    };
    // Decoding reads the GGUF's quantized blocks directly (a Q4_1 weight is
    // a sixth of its f32 size); longer prompts are dequantized per matmul.
    let opts = LoadOptions {
        keep_quantized: true,
        ..Default::default()
    };
    let (model, adapter) = b.load_with_adapters(opts, &args.adapter.adapters)?;
    let model = Adapted::new(&model, adapter);
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop: args.stop.clone(),
        eos_ids: b.tokenizer.eos_ids().to_vec(),
        activations: args.activations.resolve(),
        logprobs: args.logprobs.map(|k| k as usize),
    };
    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let g = generate(&model, &b.tokenizer, &prompt_ids, &opts, |piece| {
        if stream {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if args.json {
        return print_json(&Output {
            text: g.text.clone(),
            completion_tokens: g.ids.len(),
            ids: g.ids,
            prompt_tokens: g.prompt_tokens,
            finish_reason: g.finish_reason.as_str(),
            logprobs: args.logprobs.map(|_| {
                g.logprobs
                    .into_iter()
                    .map(|l| Logprob {
                        id: l.id,
                        logprob: l.logprob,
                        top: l.top,
                    })
                    .collect()
            }),
        });
    }
    println!();
    eprintln!(
        "[{} prompt tokens in {:.2}s; {} new tokens, {:.1} tok/s decode; finish: {}]",
        g.prompt_tokens,
        g.prefill_seconds,
        g.ids.len(),
        g.decode_tokens_per_second(),
        g.finish_reason.as_str()
    );
    Ok(())
}
