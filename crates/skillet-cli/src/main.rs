//! `skillet`: fine-tune, evaluate and serve open language models.
//!
//! A thin binary: arguments are parsed here and each subcommand lives in
//! its own file under `commands/`. Errors print as one line on stderr and
//! exit with a non-zero code.

mod args;
mod commands;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Fine-tune, evaluate and serve open language models, in one binary.
#[derive(Debug, Parser)]
#[command(name = "skillet", version, about, long_about = None)]
struct Cli {
    /// Worker threads for tensor math (default: RAYON_NUM_THREADS if set,
    /// else the cores this process may use).
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
    /// Speed and memory of training and inference workloads (see BENCHMARKS.md).
    Bench(commands::bench::Args),
    /// Check training data against a model: validation and a dry run of the loss mask.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Write a model (an adapter merged in or not) as GGUF or a Hugging Face folder, or an adapter as llama.cpp LoRA GGUF.
    Export(commands::export::Args),
    /// Fold a LoRA adapter into the base weights and write a Hugging Face folder.
    Merge(commands::merge::Args),
    /// Held-out loss, accuracy, exact match and forgetting check of a model (+ adapter).
    Eval(commands::eval::Args),
    /// Scores under a reward model: accuracy and margins on pairs, or a score per text.
    Reward(commands::reward::Args),
    /// Fine-tune a LoRA adapter from a TOML config; evaluate before and after.
    Train(commands::train::Args),
    /// Serve the model and its adapters as an OpenAI-compatible HTTP API.
    Serve(commands::serve::Args),
}

/// Sizes candle's thread pools, which read `RAYON_NUM_THREADS`. Always set
/// explicitly: left alone, candle 0.11 counts physical cores its own way
/// while rayon counts logical ones, and on our 2-core machine batch-1
/// decode ran at 33 tokens/s instead of 44-48 with an explicit 2.
fn set_thread_count(requested: Option<usize>) -> usize {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let available = std::thread::available_parallelism().map_or(1, usize::from);
    let n = requested.or(from_env).unwrap_or(available).max(1);
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    if std::env::var_os(SPIN_LIMIT).is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var(SPIN_LIMIT, SPIN_LIMIT_DEFAULT) };
    }
    n
}

/// How long candle's helper threads for elementwise ops spin after each op
/// before they sleep. Its default (25,000 pauses, about a millisecond)
/// kept its helper busy while our own pool's threads worked: 8.8% of a
/// LoRA step's CPU samples on 2 cores went to that spinning, 2.6% with
/// this limit.
const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const SPIN_LIMIT_DEFAULT: &str = "1000";

/// Whether the command is a long stretch of tensor math (training,
/// scoring, benchmarks), for [`keep_freed_memory`].
fn computes(command: &Command) -> bool {
    matches!(
        command,
        Command::Train(_)
            | Command::Eval(_)
            | Command::Score(_)
            | Command::Reward(_)
            | Command::Bench(_)
    )
}

/// Keeps freed memory in the process for the next tensor of the same size,
/// instead of glibc's defaults: one arena for all threads, allocations up
/// to 256 MiB from the heap and not mapped each on its own, and up to
/// 1 GiB of free heap kept rather than handed back. A training step
/// allocates and frees the same multi-megabyte buffers every layer; with
/// the defaults each came back as fresh pages, about a million page faults
/// per `skillet bench` LoRA run at 4 × 256 tokens, 400,000 with these
/// (BENCHMARKS.md). Peak memory is the same. Left alone where the user
/// tunes glibc's allocator through the environment. (Set this way only
/// where [`with_huge_pages`] could not restart the program.)
fn keep_freed_memory() {
    if user_tunes_the_allocator() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called in main before any other thread exists; mallopt only
    // sets the allocator's parameters.
    unsafe {
        // glibc before 2.35 or so refuses a map threshold above 32 MiB;
        // setting the trim threshold alone would then freeze the map
        // threshold at 128 KiB, worse than the defaults.
        let mapped = libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20) == 1
            || libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1;
        if mapped {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Score(a) => commands::score::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Data(c) => commands::data::run(c),
        Command::Export(a) => commands::export::run(a),
        Command::Merge(a) => commands::merge::run(a),
        Command::Reward(a) => commands::reward::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Serve(a) => commands::serve::run(a),
    }
}

/// Whether the environment already tunes glibc's allocator.
fn user_tunes_the_allocator() -> bool {
    const TUNING: [&str; 5] = [
        "GLIBC_TUNABLES",
        "MALLOC_ARENA_MAX",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_TOP_PAD_",
    ];
    TUNING.iter().any(|v| std::env::var_os(v).is_some())
}

/// glibc's allocator as [`keep_freed_memory`] sets it, and asking the
/// kernel for transparent huge pages (2 MiB) for the heap. Most Linux
/// systems give them only to memory that asks (`madvise` mode), and glibc
/// asks only when told at start, through this variable.
const TUNABLES: &str = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=268435456:\
                        glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=1073741824";

/// Restarts the program with [`TUNABLES`] (nothing else changes: the same
/// arguments, environment and open files), for commands that stream
/// weights or tensors far larger than the caches. Reading the weights is
/// the cost of a decode step, and on 4 KiB pages the CPU's prefetchers
/// stop at every page and each page needs its own TLB entry: with huge
/// pages a decode step of the default model ran about 10% faster on an
/// AMD EPYC Zen 4 (BENCHMARKS.md). Nothing happens where the user tunes
/// the allocator already, off Linux with glibc, or if the restart fails.
fn with_huge_pages() {
    if user_tunes_the_allocator() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Ok(exe) = std::env::current_exe() {
        use std::os::unix::process::CommandExt;
        // `exec` returns only when it fails; the program then carries on.
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", TUNABLES)
            .exec();
        tracing::debug!("could not restart with huge pages: {err}");
    }
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
    if computes(&cli.command) || matches!(cli.command, Command::Generate(_) | Command::Serve(_)) {
        with_huge_pages();
    }
    let threads = set_thread_count(cli.threads);
    if computes(&cli.command) {
        keep_freed_memory();
    }
    // The command itself runs on one of the pool's threads, so the serial
    // parts between parallel ops do not add a thread: n threads on n
    // cores, where running from the main thread meant n + 1, with idle
    // workers spinning against the main thread (batch-1 decode lost a
    // third of its time to that on 2 cores).
    let result = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(|| run(cli.command)),
        Err(_) => run(cli.command),
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
