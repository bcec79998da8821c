//! OpenAI's fine-tuning jobs endpoints:
//! - `POST /v1/fine_tuning/jobs` creates a job (checked at once, so a bad
//!   option or a missing file is a 400);
//! - `GET /v1/fine_tuning/jobs` (`after`, `limit`) lists them;
//! - `GET /v1/fine_tuning/jobs/{id}` reads one;
//! - `POST /v1/fine_tuning/jobs/{id}/cancel` cancels one;
//! - `GET /v1/fine_tuning/jobs/{id}/events` and `GET …/checkpoints`
//!   (`after`, `limit`) list what it did.
//!
//! Every record is scoped to the key's owner: another owner's job is a 404.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use skillet_store::{CheckpointRecord, EventRecord, JobRecord, JobStatus, NewJob, Store};

use crate::error::ApiError;
use crate::job_spec::JobSpec;
use crate::openai::body_object;
use crate::routes::Caller;
use crate::state::AppState;

type Shared = State<Arc<AppState>>;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(e.to_string())
}

/// The store, or a 404 where the service is off.
fn store(state: &AppState) -> Result<&Store, ApiError> {
    state.store.as_deref().ok_or_else(|| {
        ApiError::not_found(
            "the files and fine-tuning endpoints are off (start the server with --data-dir)",
        )
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No such fine-tuning job: {id}")).with_param("fine_tuning_job_id")
}

/// A job as OpenAI shows it.
pub fn job_object(j: &JobRecord) -> Value {
    let request: Value = serde_json::from_str(&j.request).unwrap_or_default();
    let spec = JobSpec::parse(&request).ok();
    json!({
        "object": "fine_tuning.job",
        "id": j.id,
        "model": j.model,
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": j.owner,
        "result_files": j.result_files,
        "status": j.status,
        "validation_file": j.validation_file,
        "training_file": j.training_file,
        "hyperparameters": spec.as_ref().map(|s| s.hyperparameters()),
        "method": spec.as_ref().map(|s| s.method_object()),
        "trained_tokens": j.trained_tokens,
        "error": j.error.as_deref().and_then(|e| serde_json::from_str::<Value>(e).ok()),
        "user_provided_suffix": j.suffix,
        "seed": j.seed,
        "estimated_finish": j.estimated_finish,
        "integrations": [],
        "metadata": request.get("metadata").cloned().unwrap_or(Value::Null),
        "skillet": request.get("skillet").cloned().unwrap_or(Value::Null),
    })
}

fn event_object(e: &EventRecord) -> Value {
    json!({
        "object": "fine_tuning.job.event",
        "id": e.id,
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.kind,
        "data": e.data.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()),
    })
}

fn checkpoint_object(c: &CheckpointRecord) -> Value {
    json!({
        "object": "fine_tuning.job.checkpoint",
        "id": c.id,
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.model,
        "fine_tuning_job_id": c.job_id,
        "step_number": c.step,
        "metrics": serde_json::from_str::<Value>(&c.metrics).unwrap_or_default(),
    })
}

/// A page: `data`, `has_more` (one more was read than shown).
fn page(mut items: Vec<Value>, limit: usize) -> Response {
    let has_more = items.len() > limit;
    items.truncate(limit);
    axum::Json(json!({"object": "list", "data": items, "has_more": has_more})).into_response()
}

/// `after` and `limit` of a list request.
#[derive(Deserialize)]
pub struct Paging {
    after: Option<String>,
    limit: Option<usize>,
}

impl Paging {
    fn limit(&self, default: usize) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(default),
            Some(n) if (1..=10_000).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::param(
                "limit",
                "`limit` must be between 1 and 10000",
            )),
        }
    }
}

fn text<'a>(req: &'a Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::param(name, format!("`{name}` must be a string"))),
    }
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let req = body_object(&raw)?;
    let model =
        text(&req, "model")?.ok_or_else(|| ApiError::param("model", "`model` is required"))?;
    let base = &state.config.model_id;
    // The job runs as its creator: files and models are theirs, admin or
    // not.
    let own = skillet_store::Scope::Owner(&caller.owner);
    if model != base && store.model(own, model).map_err(internal)?.is_none() {
        return Err(ApiError::param(
            "model",
            format!(
                "Model {model} is not available for fine-tuning here: use {base} or one of your fine-tuned models"
            ),
        ));
    }
    let training_file = text(&req, "training_file")?
        .ok_or_else(|| ApiError::param("training_file", "`training_file` is required"))?;
    let validation_file = text(&req, "validation_file")?;
    for (param, id) in [
        ("training_file", Some(training_file)),
        ("validation_file", validation_file),
    ] {
        let Some(id) = id else { continue };
        let f = store.file(own, id).map_err(internal)?;
        match f {
            None => {
                return Err(ApiError::param(param, format!("invalid {param}: {id}")));
            }
            Some(f) if f.purpose != "fine-tune" => {
                return Err(ApiError::param(
                    param,
                    format!("File {id} has purpose {:?}, not \"fine-tune\"", f.purpose),
                ));
            }
            Some(_) => {}
        }
    }
    let suffix = text(&req, "suffix")?.filter(|s| !s.is_empty());
    if let Some(s) = suffix
        && (s.len() > 64
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        return Err(ApiError::param(
            "suffix",
            "`suffix` takes up to 64 letters, digits, `-`, `_` and `.`",
        ));
    }
    match req.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.len() <= 16 && m.values().all(Value::is_string) => {}
        Some(_) => {
            return Err(ApiError::param(
                "metadata",
                "`metadata` holds up to 16 string values",
            ));
        }
    }
    let seed = match req.get("seed") {
        None | Some(Value::Null) => {
            // As OpenAI does: one is chosen and shown on the job.
            let id = skillet_store::new_id("seed");
            i64::from_str_radix(&id[id.len() - 8..], 16).unwrap_or(42) & 0x7fff_ffff
        }
        Some(v) => v
            .as_i64()
            .filter(|s| (0..=i64::from(i32::MAX)).contains(s))
            .ok_or_else(|| {
                ApiError::param("seed", "`seed` must be an integer from 0 to 2147483647")
            })?,
    };
    let spec = JobSpec::parse(&req)?;
    // The options are checked now, with placeholder paths, so a bad one is
    // a 400 rather than a failed job.
    let here = std::path::Path::new(".");
    spec.run_config(
        &crate::job_spec::RunPaths {
            model: here,
            output_dir: here,
            train: here,
            validation: None,
            init_adapter: None,
        },
        seed as u64,
    )?;
    let job = store
        .add_job(&NewJob {
            owner: &caller.owner,
            model,
            training_file,
            validation_file,
            suffix,
            seed,
            request: &req.to_string(),
        })
        .map_err(internal)?;
    store
        .add_event(
            &job.id,
            "info",
            &format!("Created fine-tuning job: {}", job.id),
            None,
        )
        .map_err(internal)?;
    if let Some(r) = &state.runner {
        r.wake();
    }
    Ok(axum::Json(job_object(&job)).into_response())
}

/// `GET /v1/fine_tuning/jobs`.
pub async fn list(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    Query(p): Query<Paging>,
) -> Result<Response, ApiError> {
    let limit = p.limit(20)?;
    let jobs = store(&state)?
        .jobs(caller.scope(), p.after.as_deref(), limit + 1)
        .map_err(internal)?;
    Ok(page(jobs.iter().map(job_object).collect(), limit))
}

fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    store(state)?
        .job(caller.scope(), id)
        .map_err(internal)?
        .ok_or_else(|| not_found(id))
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn retrieve(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(job_object(&visible(&state, &caller, &id)?)).into_response())
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: the job ends `cancelled`; a
/// running child is killed within a poll of the worker.
pub async fn cancel(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let job = visible(&state, &caller, &id)?;
    let store = store(&state)?;
    if !store
        .set_job_status(&id, JobStatus::Cancelled)
        .map_err(internal)?
    {
        return Err(ApiError::invalid(format!(
            "Job {id} has already ended ({})",
            job.status.as_str()
        ))
        .with_param("fine_tuning_job_id"));
    }
    store
        .add_event(&id, "info", "Fine-tuning job cancelled", None)
        .map_err(internal)?;
    if let Some(r) = &state.runner {
        r.wake();
    }
    Ok(axum::Json(job_object(&visible(&state, &caller, &id)?)).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}/events`, newest first.
pub async fn events(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    Query(p): Query<Paging>,
) -> Result<Response, ApiError> {
    let limit = p.limit(20)?;
    let events = store(&state)?
        .events(caller.scope(), &id, p.after.as_deref(), limit + 1)
        .map_err(internal)?
        .ok_or_else(|| not_found(&id))?;
    Ok(page(events.iter().map(event_object).collect(), limit))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`, latest first.
pub async fn checkpoints(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
    Query(p): Query<Paging>,
) -> Result<Response, ApiError> {
    let limit = p.limit(10)?;
    let list = store(&state)?
        .checkpoints(caller.scope(), &id, p.after.as_deref(), limit + 1)
        .map_err(internal)?
        .ok_or_else(|| not_found(&id))?;
    Ok(page(list.iter().map(checkpoint_object).collect(), limit))
}
