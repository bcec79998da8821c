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
    /// Keys any request may use, each with its owner (empty: no
    /// authentication).
    pub api_keys: Vec<ApiKey>,
    /// The key for loading and unloading adapters (else any API key), which
    /// also sees every owner's files and jobs.
    pub admin_key: Option<ApiKey>,
    /// The fine-tuning service's data directory (database, uploaded
    /// files); `None`: the files and jobs endpoints are off.
    pub data_dir: Option<PathBuf>,
    /// Largest uploaded file in bytes.
    pub max_file_bytes: usize,
    /// The command that trains a job: program and leading arguments (the
    /// run's config, or `--resume DIR`, is added); empty: jobs fail
    /// with "no trainer command configured".
    pub trainer: Vec<String>,
    /// Fine-tuning jobs that run at once.
    pub max_jobs: usize,
    /// Threads of each training process (`None`: all cores).
    pub train_threads: Option<usize>,
    /// Niceness of the training processes (so serving gets the cores
    /// first).
    pub train_nice: i32,
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
            data_dir: None,
            max_file_bytes: 512 << 20,
            trainer: Vec::new(),
            max_jobs: 1,
            train_threads: None,
            train_nice: 10,
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

/// An API key, kept only as its SHA-256 digest, and the owner it stands
/// for (whose files, jobs and models it sees).
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
    /// The owner's name.
    pub owner: String,
}

impl ApiKey {
    /// `key` for `owner`.
    pub fn new(key: &str, owner: &str) -> Self {
        Self {
            digest: digest(key),
            owner: owner.to_string(),
        }
    }

    /// Whether a presented key's digest is this key's, in time that does
    /// not depend on where they differ.
    pub fn matches(&self, presented: &[u8; 32]) -> bool {
        self.digest
            .iter()
            .zip(presented)
            .fold(0u8, |d, (a, b)| d | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}, <redacted>)", self.owner)
    }
}

/// A key's SHA-256 digest.
pub fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// Reads a keys file: one key per line, optionally followed by
/// whitespace and its owner's name (`default` where absent); blank lines
/// and `#` comments skipped.
pub fn parse_keys(text: &str) -> Vec<ApiKey> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let key = parts.next().unwrap_or_default();
            ApiKey::new(key, parts.next().unwrap_or("default"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_kept_as_digests_with_their_owners() {
        let keys = parse_keys("# team keys\nsk-a ann\n\nsk-b\n  sk-c   carl  \n");
        let owners: Vec<&str> = keys.iter().map(|k| k.owner.as_str()).collect();
        assert_eq!(owners, ["ann", "default", "carl"]);
        assert!(keys[0].matches(&digest("sk-a")));
        assert!(!keys[0].matches(&digest("sk-b")));
        assert!(!format!("{keys:?}").contains("sk-a"));
    }
}
