//! `skillet generate`: text from a prompt, streamed to the terminal.

use std::io::Write;

use serde::Serialize;
use skillet_generate::{GenerateOptions, SamplingParams, generate};
use skillet_tokenizer::Message;

use crate::bundle::{AdapterArg, Bundle, ModelArg};
use crate::output::print_json;

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
}

#[derive(Serialize)]
struct Output {
    text: String,
    ids: Vec<u32>,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish_reason: &'static str,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        anyhow::bail!("--temperature must be >= 0, got {}", args.temperature);
    }
    if let Some(p) = args.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        anyhow::bail!("--top-p must be in (0, 1], got {p}");
    }
    if args.repetition_penalty.is_nan() || args.repetition_penalty <= 0.0 {
        anyhow::bail!(
            "--repetition-penalty must be > 0, got {}",
            args.repetition_penalty
        );
    }
    let b = Bundle::open(&args.model.model)?;
    let prompt_ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", args.prompt.clone()));
        let rendered = b.template()?.render(&messages, true)?;
        // The template already holds every special token it wants.
        b.tokenizer.encode(&rendered, false)?
    } else {
        b.tokenizer.encode(&args.prompt, true)?
    };
    // Decoding reads the GGUF's quantized blocks directly (a Q4_1 weight is
    // a sixth of its f32 size); longer prompts are dequantized per matmul.
    let opts = skillet_models::LoadOptions {
        keep_quantized: true,
        ..Default::default()
    };
    let model = b.load_model_with_opts(args.adapter.adapter.as_deref(), opts)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        stop: args.stop.clone(),
        eos_ids: b.tokenizer.eos_ids().to_vec(),
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
