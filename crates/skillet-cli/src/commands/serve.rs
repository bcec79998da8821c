//! `skillet serve`: the OpenAI-compatible API over a model and its
//! adapters (see `skillet_server`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use skillet_server::{ApiKey, ServerConfig, parse_keys};

use crate::args::{ActivationsArg, ModelArg};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// The id the base model answers to in `model` (default: the file or folder name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Serve a PEFT LoRA adapter as NAME (repeatable): --adapter NAME=DIR.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// A folder of adapter folders: each can be requested by its folder
    /// name (loaded on first use), and runtime loads are confined to it.
    #[arg(long)]
    adapters_dir: Option<PathBuf>,
    /// Let /v1/load_lora_adapter read adapters from any path.
    #[arg(long)]
    allow_any_adapter_path: bool,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(
        long,
        env = "SKILLET_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    api_key: Option<String>,
    /// A file with one API key per line, each optionally followed by its
    /// owner's name (an owner sees only their own files, jobs and models;
    /// `default` where no name is given). Keys are kept as SHA-256 digests.
    #[arg(long, alias = "api-keys")]
    api_key_file: Option<PathBuf>,
    /// The fine-tuning service's data directory (its SQLite database and
    /// uploaded files). Default: `skillet` under the user's data directory
    /// ($XDG_DATA_HOME, else ~/.local/share).
    #[arg(long, env = "SKILLET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Largest uploaded file in bytes.
    #[arg(long, default_value_t = 512 << 20)]
    max_file_bytes: usize,
    /// Fine-tuning jobs that train at once (each in its own process).
    #[arg(long, default_value_t = 1)]
    max_jobs: usize,
    /// Threads of each training process (default: all cores). Serving
    /// keeps its own threads; training runs niced (see --train-nice), so
    /// requests get the cores first.
    #[arg(long)]
    train_threads: Option<usize>,
    /// Niceness of training processes (0: the same priority as serving).
    #[arg(long, default_value_t = 10)]
    train_nice: i32,
    /// The key that may load and unload adapters (else any API key may).
    #[arg(long, env = "SKILLET_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Sequences decoded together (KV-cache slots).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests that may wait for a slot before new ones get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Context per sequence, prompt plus completion (at most the model's).
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Prompt tokens prefilled per decode step (smaller keeps running
    /// streams smoother while long prompts arrive).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// How quantized weights take their inputs: int8 rounds them per block
    /// of 32 as llama.cpp does, at about 1% error per product; auto picks
    /// int8 where the CPU has AMX tiles, AVX512-VNNI or AVX2, f32 elsewhere.
    #[arg(long, value_enum, default_value_t = ActivationsArg::Auto)]
    activations: ActivationsArg,
    /// Seconds running requests get to finish after SIGTERM or Ctrl-C
    /// before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Seconds a client may take to send a request head; also how long an
    /// idle keep-alive connection stays open.
    #[arg(long, default_value_t = 30)]
    header_timeout: u64,
    /// Open connections at most (more clients wait to be accepted).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
}

fn parse_adapter(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, dir) = spec
        .split_once('=')
        .filter(|(n, d)| !n.is_empty() && !d.is_empty())
        .with_context(|| format!("--adapter {spec:?}: expected NAME=DIR"))?;
    Ok((name.to_string(), PathBuf::from(dir)))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = ServerConfig::new(args.model.model.clone());
    if let Some(name) = args.served_model_name {
        cfg.model_id = name;
    }
    cfg.adapters = args
        .adapters
        .iter()
        .map(|s| parse_adapter(s))
        .collect::<anyhow::Result<_>>()?;
    cfg.adapters_dir = args.adapters_dir;
    cfg.allow_any_adapter_path = args.allow_any_adapter_path;
    cfg.addr = SocketAddr::new(args.host, args.port);
    cfg.api_keys = match (args.api_key, args.api_key_file) {
        (Some(k), _) => vec![ApiKey::new(&k, "default")],
        (None, Some(f)) => {
            parse_keys(&std::fs::read_to_string(&f).with_context(|| f.display().to_string())?)
        }
        (None, None) => Vec::new(),
    };
    cfg.admin_key = args.admin_key.map(|k| ApiKey::new(&k, "admin"));
    cfg.data_dir = Some(match args.data_dir {
        Some(d) => d,
        None => user_data_dir()?,
    });
    cfg.max_file_bytes = args.max_file_bytes;
    // Jobs train in a child process of this same binary.
    cfg.trainer = vec![
        std::env::current_exe()
            .context("locating the skillet binary for training jobs")?
            .display()
            .to_string(),
        "train".into(),
    ];
    cfg.max_jobs = args.max_jobs;
    cfg.train_threads = args.train_threads;
    cfg.train_nice = args.train_nice;
    cfg.max_batch = args.max_batch;
    cfg.max_queue = args.max_queue;
    cfg.ctx = args.ctx;
    cfg.max_body_bytes = args.max_body_bytes;
    cfg.prefill_chunk = args.prefill_chunk;
    cfg.activations = args.activations.resolve();
    cfg.shutdown_grace_secs = args.shutdown_grace;
    cfg.header_timeout_secs = args.header_timeout;
    cfg.max_connections = args.max_connections;
    let keys = cfg.api_keys.len();
    let activations = cfg.activations;
    skillet_server::serve(cfg, |addr| {
        eprintln!(
            "listening on http://{addr} ({}, {activations:?} activations)",
            if keys == 0 {
                "no API key required".to_string()
            } else {
                format!("{keys} API key(s)")
            }
        );
    })?;
    eprintln!("stopped");
    Ok(())
}

/// `skillet` under the user's data directory: $XDG_DATA_HOME, else
/// ~/.local/share.
fn user_data_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var_os("HOME").ok_or_else(|| anyhow::anyhow!("no HOME: give --data-dir"))?,
        )
        .join(".local/share"),
    };
    Ok(base.join("skillet"))
}
