//! `skillet`: fine-tune, evaluate and serve open language models.
//!
//! A thin binary: arguments are parsed here and each subcommand lives in
//! its own file under `commands/`. Errors print as one line on stderr and
//! exit with a non-zero code.

mod bundle;
mod commands;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Fine-tune, evaluate and serve open language models, in one binary.
#[derive(Debug, Parser)]
#[command(name = "skillet", version, about, long_about = None)]
struct Cli {
    /// Worker threads for tensor math (default: all cores).
    #[arg(long, global = true, env = "SKILLET_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a model's architecture, size, storage types and special tokens.
    Inspect(commands::inspect::Args),
    /// Turn text into token ids with a model's tokenizer.
    Tokenize(commands::tokenize::Args),
    /// Next-token loss and perplexity of a text file under a model.
    Score(commands::score::Args),
    /// Generate text from a prompt (optionally through the chat template).
    Generate(commands::generate::Args),
    /// Write a model as a Hugging Face folder (f32 safetensors, tokenizer, template).
    Convert(commands::convert::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKILLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(n) = cli.threads {
        // candle's CPU kernels size their pools from this variable; set it
        // before any tensor work starts.
        // SAFETY: single-threaded at this point, before any pool exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string()) };
    }
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Score(a) => commands::score::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Convert(a) => commands::convert::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
