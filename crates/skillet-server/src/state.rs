//! What every handler shares: the model, its tokenizer and template, the
//! adapters being served, the channel to the model's thread, counters.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use skillet_adapters::LoraAdapter;
use skillet_models::{Adapter, Model};
use skillet_runtime::Bundle;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routes::Caller;
use crate::worker::Command;

/// One adapter being served.
#[derive(Debug, Clone)]
pub struct AdapterEntry {
    /// The adapter.
    pub adapter: Arc<dyn Adapter>,
    /// Its folder.
    pub path: PathBuf,
    /// When it was loaded (Unix seconds).
    pub created: u64,
}

/// Shared state of the server.
pub struct AppState {
    /// The settings.
    pub config: ServerConfig,
    /// Tokenizer and chat template.
    pub bundle: Bundle,
    /// The base model (adapters are checked against it).
    pub model: Arc<Model>,
    /// Adapters by name.
    pub adapters: RwLock<BTreeMap<String, AdapterEntry>>,
    /// To the model's thread (closed at shutdown).
    worker: Mutex<Option<Sender<Command>>>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Requests admitted and not yet finished.
    pub in_flight: AtomicUsize,
    next_ticket: AtomicU64,
    /// When the server started (Unix seconds).
    pub started: u64,
    /// Set on SIGTERM: new generation requests get 503.
    pub stopping: AtomicBool,
    /// The fine-tuning service's database (where `data_dir` is set).
    pub store: Option<Arc<skillet_store::Store>>,
    /// The fine-tuning jobs' worker (where `data_dir` is set).
    pub runner: Option<crate::job_runner::Runner>,
    /// Fine-tuned models loaded so far, by name (who may use one is
    /// asked of the store on every request).
    tuned: RwLock<BTreeMap<String, AdapterEntry>>,
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    /// State for a loaded model.
    pub fn new(
        config: ServerConfig,
        bundle: Bundle,
        model: Arc<Model>,
        worker: Sender<Command>,
        metrics: Arc<Metrics>,
        store: Option<Arc<skillet_store::Store>>,
        runner: Option<crate::job_runner::Runner>,
    ) -> Self {
        Self {
            config,
            bundle,
            model,
            adapters: RwLock::new(BTreeMap::new()),
            worker: Mutex::new(Some(worker)),
            metrics,
            in_flight: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(1),
            started: now(),
            stopping: AtomicBool::new(false),
            store,
            runner,
            tuned: RwLock::new(BTreeMap::new()),
        }
    }

    /// A new request ticket.
    pub fn ticket(&self) -> u64 {
        self.next_ticket.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a command to the model's thread.
    pub fn send(&self, cmd: Command) -> Result<(), ApiError> {
        let worker = self
            .worker
            .lock()
            .map_err(|_| ApiError::internal("worker channel poisoned"))?;
        worker
            .as_ref()
            .ok_or_else(|| ApiError::unavailable("The server is shutting down"))?
            .send(cmd)
            .map_err(|_| ApiError::unavailable("the model worker has stopped"))
    }

    /// Shutdown: cancels whatever still runs and closes the model thread's
    /// queue, so its loop ends.
    pub fn close_worker(&self) {
        if let Ok(mut w) = self.worker.lock()
            && let Some(tx) = w.take()
        {
            let _ = tx.send(Command::CancelAll);
        }
    }

    /// The adapter `model` names, or `None` for the base model. With an
    /// adapters folder, an adapter there that is not loaded yet is loaded
    /// now; so is a fine-tuned model (`ft:…`) the caller may use.
    pub fn resolve(
        &self,
        model: &str,
        caller: &Caller,
    ) -> Result<Option<Arc<dyn Adapter>>, ApiError> {
        if model == self.config.model_id {
            return Ok(None);
        }
        if model.starts_with("ft:") {
            return self.tuned(model, caller).map(|e| Some(e.adapter));
        }
        if let Some(e) = self.read_adapters()?.get(model) {
            return Ok(Some(e.adapter.clone()));
        }
        if let Some(dir) = &self.config.adapters_dir
            && is_plain_name(model)
            && dir.join(model).join("adapter_config.json").is_file()
        {
            let entry = self.load(model, &dir.join(model))?;
            return Ok(Some(entry.adapter));
        }
        Err(ApiError::model_not_found(model))
    }

    /// The fine-tuned model `name` if `caller` may use it, loaded on first
    /// use.
    pub fn tuned(&self, name: &str, caller: &Caller) -> Result<AdapterEntry, ApiError> {
        let record = match &self.store {
            Some(store) => store
                .model(caller.scope(), name)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            None => None,
        }
        .ok_or_else(|| ApiError::model_not_found(name))?;
        let poisoned = || ApiError::internal("fine-tuned model cache poisoned");
        if let Some(e) = self.tuned.read().map_err(|_| poisoned())?.get(name) {
            return Ok(e.clone());
        }
        let path = PathBuf::from(&record.path);
        let adapter = LoraAdapter::load(self.model.as_ref(), &path)
            .map_err(|e| ApiError::internal(format!("loading {name}: {e}")))?;
        let entry = AdapterEntry {
            adapter: Arc::new(adapter),
            path,
            created: record.created_at.max(0) as u64,
        };
        let mut map = self.tuned.write().map_err(|_| poisoned())?;
        Ok(map.entry(name.to_string()).or_insert(entry).clone())
    }

    /// Forgets a fine-tuned model loaded before (it was deleted).
    pub fn forget_tuned(&self, name: &str) {
        if let Ok(mut map) = self.tuned.write() {
            map.remove(name);
        }
    }

    fn read_adapters(
        &self,
    ) -> Result<std::sync::RwLockReadGuard<'_, BTreeMap<String, AdapterEntry>>, ApiError> {
        self.adapters
            .read()
            .map_err(|_| ApiError::internal("adapter registry poisoned"))
    }

    /// The adapters being served, by name.
    pub fn adapters(&self) -> Result<Vec<(String, AdapterEntry)>, ApiError> {
        Ok(self
            .read_adapters()?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    /// Reads the adapter in `path` and serves it as `name`. A name in use
    /// keeps its adapter (the first load wins) and is returned as is.
    pub fn load(&self, name: &str, path: &Path) -> Result<AdapterEntry, ApiError> {
        if name == self.config.model_id || name.is_empty() {
            return Err(ApiError::param(
                "lora_name",
                format!("`{name}` cannot name an adapter"),
            ));
        }
        let adapter = LoraAdapter::load(self.model.as_ref(), path)
            .map_err(|e| ApiError::param("lora_path", format!("cannot load the adapter: {e}")))?;
        let entry = AdapterEntry {
            adapter: Arc::new(adapter),
            path: path.to_path_buf(),
            created: now(),
        };
        let mut map = self
            .adapters
            .write()
            .map_err(|_| ApiError::internal("adapter registry poisoned"))?;
        Ok(map.entry(name.to_string()).or_insert(entry).clone())
    }

    /// Stops serving adapter `name`; requests already running on it finish.
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        let mut map = self
            .adapters
            .write()
            .map_err(|_| ApiError::internal("adapter registry poisoned"))?;
        map.remove(name)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found(format!("no adapter named `{name}` is loaded")))
    }

    /// Where `lora_path` may be read from: inside the adapters folder (a
    /// relative path is taken from there), unless any path is allowed.
    pub fn confine(&self, lora_path: &str) -> Result<PathBuf, ApiError> {
        let requested = PathBuf::from(lora_path);
        if self.config.allow_any_adapter_path {
            return Ok(requested);
        }
        let Some(root) = &self.config.adapters_dir else {
            return Err(ApiError::forbidden(
                "loading adapters at run time needs --adapters-dir (paths are confined to it) or --allow-any-adapter-path",
            ));
        };
        let joined = if requested.is_absolute() {
            requested
        } else {
            root.join(requested)
        };
        let outside = || {
            ApiError::forbidden(format!(
                "lora_path must be inside the adapters folder {}",
                root.display()
            ))
        };
        let (Ok(real), Ok(root)) = (joined.canonicalize(), root.canonicalize()) else {
            return Err(if joined.components().any(|c| c == Component::ParentDir) {
                outside()
            } else {
                ApiError::param("lora_path", format!("{lora_path}: no such folder"))
            });
        };
        if !real.starts_with(&root) {
            return Err(outside());
        }
        Ok(real)
    }
}

/// A name that is one plain path component (no separators, no `..`).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.starts_with('.')
}
