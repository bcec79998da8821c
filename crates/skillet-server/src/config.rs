//! The server's settings, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use skillet_models::Activations;

/// Everything `skillet serve` was told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The base model (GGUF file or Hugging Face folder).
    pub model: PathBuf,
    /// The id the base model is served under.
    pub model_id: String,
    /// Adapters loaded at start: (name, folder).
    pub adapters: Vec<(String, PathBuf)>,
    /// Adapters in this folder can be requested by name (loaded on first
    /// use), and runtime loads are confined to it.
    pub adapters_dir: Option<PathBuf>,
    /// Let `/v1/load_lora_adapter` read any path (not only `adapters_dir`).
    pub allow_any_adapter_path: bool,
    /// Where to listen.
    pub addr: SocketAddr,
    /// Keys any request may use (empty: no authentication).
    pub api_keys: Vec<String>,
    /// The key for loading and unloading adapters (else any API key).
    pub admin_key: Option<String>,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests waiting beyond the running ones before 429.
    pub max_queue: usize,
    /// Positions per sequence (prompt plus completion).
    pub ctx: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Most messages in one chat request.
    pub max_messages: usize,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    /// Prompt tokens prefilled per engine step.
    pub prefill_chunk: usize,
    /// How quantized weights take their inputs.
    pub activations: Activations,
    /// Seconds running streams get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds a client may take to send a request head, and may keep an
    /// idle connection open between requests.
    pub header_timeout_secs: u64,
    /// Open connections at most.
    pub max_connections: usize,
}

impl ServerConfig {
    /// Settings for `model` with the defaults of `skillet serve`.
    pub fn new(model: PathBuf) -> Self {
        let model_id = model
            .file_stem()
            .or_else(|| model.file_name())
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        Self {
            model,
            model_id,
            adapters: Vec::new(),
            adapters_dir: None,
            allow_any_adapter_path: false,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            admin_key: None,
            max_batch: 8,
            max_queue: 64,
            ctx: 2048,
            max_body_bytes: 1 << 20,
            max_messages: 256,
            max_n: 8,
            prefill_chunk: 256,
            activations: Activations::F32,
            shutdown_grace_secs: 30,
            header_timeout_secs: 30,
            max_connections: 1024,
        }
    }
}
