//! `skillet serve`: an OpenAI-compatible HTTP API over one loaded model
//! and any number of LoRA adapters. Requests for the base model and for
//! different adapters are decoded together in one continuously batched
//! engine (each row of a batch applies its own adapter), which runs on the
//! calling thread; HTTP runs on a small tokio runtime beside it, so model
//! compute never blocks request handling.
#![warn(missing_docs)]

mod config;
mod error;
mod files;
mod generation;
mod job_runner;
mod job_spec;
mod jobs_api;
mod listen;
mod metrics;
mod openai;
mod routes;
mod state;
mod web;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use skillet_generate::EngineConfig;
use skillet_models::{CausalLm, LoadOptions};
use skillet_runtime::Bundle;

pub use config::{ApiKey, ServerConfig, digest, parse_keys};
pub use error::ApiError;

use crate::metrics::Metrics;
use crate::state::AppState;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model or a start-up adapter could not be loaded.
    #[error(transparent)]
    Runtime(#[from] Box<skillet_runtime::RuntimeError>),
    /// A start-up adapter was refused.
    #[error("adapter {name}: {message}")]
    Adapter {
        /// Its name.
        name: String,
        /// Why.
        message: String,
    },
    /// Sockets or threads.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The fine-tuning service's database.
    #[error("{0}")]
    Store(#[from] skillet_store::StoreError),
}

/// The router over `state`.
fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/", get(web::index))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::models))
        .route(
            "/v1/models/{model}",
            get(routes::model).delete(routes::delete_model),
        )
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/load_lora_adapter", post(routes::load_adapter))
        .route("/v1/unload_lora_adapter", post(routes::unload_adapter))
        .route(
            "/v1/files",
            post(files::upload)
                .layer(DefaultBodyLimit::max(
                    state.config.max_file_bytes + (1 << 20),
                ))
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route(
            "/v1/fine_tuning/jobs",
            post(jobs_api::create).get(jobs_api::list),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(jobs_api::retrieve))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(jobs_api::cancel))
        .route("/v1/fine_tuning/jobs/{id}/events", get(jobs_api::events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(jobs_api::checkpoints),
        )
        .fallback(routes::fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::guard,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Loads the model and adapters, listens, and serves until SIGTERM or
/// Ctrl-C; then stops accepting, lets running requests finish (up to the
/// grace period), and returns. `on_ready` gets the bound address once
/// requests are accepted. The engine runs on the calling thread.
pub fn serve(config: ServerConfig, on_ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let bundle = Bundle::open(&config.model).map_err(Box::new)?;
    // Decoding reads quantized blocks directly; longer prefill chunks are
    // dequantized per product.
    let model = Arc::new(
        bundle
            .load_model(LoadOptions {
                keep_quantized: true,
                ..Default::default()
            })
            .map_err(Box::new)?,
    );
    let mut config = config;
    config.ctx = config
        .ctx
        .clamp(2, model.config().max_position_embeddings.max(2));
    let engine = EngineConfig {
        max_batch: config.max_batch.max(1),
        capacity: config.ctx,
        prefill_chunk: config.prefill_chunk.max(1),
        activations: config.activations,
    };
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let adapters = config.adapters.clone();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let header_timeout = Duration::from_secs(config.header_timeout_secs.max(1));
    let max_connections = config.max_connections;
    let addr = config.addr;
    // One server per data directory: a second one would resume the same
    // jobs into the same run folders. Held until this function returns.
    let _lock = match &config.data_dir {
        Some(dir) => Some(lock_data_dir(dir)?),
        None => None,
    };
    let store = match &config.data_dir {
        Some(dir) => Some(Arc::new(skillet_store::Store::open(
            &dir.join("skillet.db"),
        )?)),
        None => None,
    };
    let runner = match (&store, &config.data_dir) {
        (Some(store), Some(dir)) => Some(job_runner::Runner::start(
            store.clone(),
            job_runner::RunnerConfig {
                model: config.model.clone(),
                model_id: config.model_id.clone(),
                data_dir: dir.clone(),
                trainer: config.trainer.clone(),
                max_jobs: config.max_jobs,
                train_threads: config.train_threads,
                train_nice: config.train_nice,
            },
        )?),
        _ => None,
    };
    let state = Arc::new(AppState::new(
        config,
        bundle,
        model.clone(),
        tx,
        metrics.clone(),
        store,
        runner,
    ));
    for (name, dir) in &adapters {
        state.load(name, dir).map_err(|e| ServeError::Adapter {
            name: name.clone(),
            message: e.message,
        })?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("skillet-http")
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
    let bound = listener.local_addr()?;
    let app = router(state.clone());
    let server_state = state.clone();
    runtime.spawn(async move {
        let stop = Arc::new(tokio::sync::Notify::new());
        let signalled = stop.clone();
        let draining = server_state.clone();
        let shutdown = async move {
            wait_for_signal().await;
            routes::stop(&draining);
            signalled.notify_waiters();
        };
        let limits = listen::ConnectionLimits {
            header_timeout,
            max_connections,
        };
        tokio::select! {
            _ = listen::serve(listener, app, limits, shutdown) => {}
            _ = async { stop.notified().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("grace period over; cancelling what still runs");
            }
        }
        // No more requests: close the model thread's queue.
        server_state.close_worker();
    });
    on_ready(bound);
    let tokenizer = &state.bundle.tokenizer;
    worker::run(model.as_ref(), tokenizer, engine, rx, metrics);
    if let Some(r) = &state.runner {
        r.stop();
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// An exclusive lock on `dir/skillet.lock`, or an error naming the
/// directory when another server holds it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, ServeError> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("skillet.lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(ServeError::Io(std::io::Error::other(format!(
                "another skillet serve is using the data directory {}",
                dir.display()
            ))))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(ServeError::Io(e)),
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
