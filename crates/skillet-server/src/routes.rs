//! The HTTP routes: health, models, chat and text completions, adapter
//! load/unload, metrics; and the API-key check in front of them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use skillet_models::Adapter;

use crate::error::ApiError;
use crate::generation::{self, Job, Kind};
use crate::openai::{ChatRequest, Common, CompletionRequest, StreamOptions, body_object, fields};
use crate::state::AppState;

type Shared = State<Arc<AppState>>;

/// `GET /health`: 200 once the model is loaded (the server only listens then).
pub async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Every model `caller` may use: the base model, the adapters, and the
/// caller's fine-tuned models (`parent` = base).
fn model_objects(state: &AppState, caller: &Caller) -> Result<Vec<Value>, ApiError> {
    let base = &state.config.model_id;
    let mut data = vec![json!({
        "id": base, "object": "model", "created": state.started, "owned_by": "skillet",
        "root": state.config.model.display().to_string(), "parent": Value::Null,
    })];
    for (name, e) in state.adapters()? {
        data.push(json!({
            "id": name, "object": "model", "created": e.created, "owned_by": "skillet",
            "root": e.path.display().to_string(), "parent": base,
        }));
    }
    if let Some(store) = &state.store {
        for m in store
            .models(caller.scope())
            .map_err(|e| ApiError::internal(e.to_string()))?
        {
            data.push(json!({
                "id": m.name, "object": "model", "created": m.created_at, "owned_by": m.owner,
                "root": m.name, "parent": base,
            }));
        }
    }
    Ok(data)
}

/// `GET /v1/models`.
pub async fn models(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let data = model_objects(&state, &caller)?;
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/models/{model}`.
pub async fn model(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    model_objects(&state, &caller)?
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .map(|m| axum::Json(m).into_response())
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// `DELETE /v1/models/{model}`: a fine-tuned model of the caller's stops
/// being served (its job and checkpoints stay).
pub async fn delete_model(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let store = state
        .store
        .as_ref()
        .ok_or_else(|| ApiError::model_not_found(&id))?;
    store
        .delete_model(caller.scope(), &id)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::model_not_found(&id))?;
    state.forget_tuned(&id);
    Ok(axum::Json(json!({"id": id, "object": "model", "deleted": true})).into_response())
}

/// The body, with a too-large one answered as OpenAI does.
fn body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    match body {
        Ok(b) => body_object(&b),
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::too_large(state.config.max_body_bytes))
        }
        Err(r) => Err(ApiError::invalid(r.body_text())),
    }
}

/// A parsed request: the endpoint's own fields, the shared options
/// (checked) and the adapter they name (`None`: the base model).
struct Head<T> {
    own: T,
    common: Common,
    adapter: Option<Arc<dyn Adapter>>,
    checked: crate::openai::Checked,
}

/// A request body read as the endpoint's own fields `T` and the shared
/// options, checked, with the model they name.
fn request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    caller: &Caller,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Head<T>, ApiError> {
    let v = body(state, raw)?;
    let own: T = fields(&v)?;
    let common: Common = fields(&v)?;
    let adapter = state.resolve(&common.model, caller)?;
    let checked = common.check(state.config.max_n)?;
    Ok(Head {
        own,
        common,
        adapter,
        checked,
    })
}

/// The engine job of a checked request.
fn job(
    kind: Kind,
    common: Common,
    adapter: Option<Arc<dyn Adapter>>,
    prompt: Vec<u32>,
    checked: crate::openai::Checked,
    logprobs: Option<usize>,
) -> Job {
    Job {
        kind,
        include_usage: common.stream
            && common
                .stream_options
                .as_ref()
                .is_some_and(|o: &StreamOptions| o.include_usage),
        stream: common.stream,
        ignore_eos: common.ignore_eos,
        model: common.model,
        adapter,
        prompt,
        checked,
        logprobs,
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Head {
        own: req,
        common,
        adapter,
        checked,
    } = request::<ChatRequest>(&state, &caller, raw)?;
    if req.messages.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    if req.messages.len() > state.config.max_messages {
        return Err(ApiError::param(
            "messages",
            format!("At most {} messages", state.config.max_messages),
        ));
    }
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_message(i))
        .collect::<Result<Vec<_>, _>>()?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if !(0..=20).contains(&k) => {
            return Err(ApiError::param(
                "top_logprobs",
                "`top_logprobs` must be between 0 and 20",
            ));
        }
        (false, Some(_)) => {
            return Err(ApiError::param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let prompt = state.bundle.chat_prompt(&messages).map_err(|e| match e {
        skillet_runtime::RuntimeError::Tokenizer(t) => ApiError::param("messages", t.to_string()),
        other => other.into(),
    })?;
    generation::run(
        state.clone(),
        job(Kind::Chat, common, adapter, prompt, checked, logprobs),
    )
    .await
}

/// `POST /v1/completions`: a raw prompt, tokenized as `tokenizer(prompt)`
/// (with the BOS the tokenizer adds).
pub async fn completions(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Head {
        own: req,
        common,
        adapter,
        checked,
    } = request::<CompletionRequest>(&state, &caller, raw)?;
    let text = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::param(
                "prompt",
                "`prompt` must be a string (or a list holding one string)",
            ));
        }
    };
    if req.echo {
        return Err(ApiError::param("echo", "`echo` is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::param("suffix", "`suffix` is not supported"));
    }
    let logprobs = match req.logprobs {
        Some(k) if !(0..=5).contains(&k) => {
            return Err(ApiError::param(
                "logprobs",
                "`logprobs` must be between 0 and 5",
            ));
        }
        k => k.map(|k| k as usize),
    };
    let prompt = state.bundle.text_prompt(&text)?;
    generation::run(
        state.clone(),
        job(Kind::Completion, common, adapter, prompt, checked, logprobs),
    )
    .await
}

#[derive(Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadRequest {
    lora_name: String,
}

/// `POST /v1/load_lora_adapter`: serve the adapter at `lora_path` as
/// `lora_name`. Paths are confined to `--adapters-dir`.
pub async fn load_adapter(
    State(state): Shared,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let v = body(&state, raw)?;
    let req: LoadRequest = fields(&v)?;
    if state.adapters()?.iter().any(|(n, _)| *n == req.lora_name) {
        return Err(ApiError::param(
            "lora_name",
            format!(
                "an adapter named `{}` is already loaded; unload it first",
                req.lora_name
            ),
        ));
    }
    let path = state.confine(&req.lora_path)?;
    let s = state.clone();
    let name = req.lora_name.clone();
    tokio::task::spawn_blocking(move || s.load(&name, &path))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(json!({"status": "ok", "lora_name": req.lora_name})).into_response())
}

/// `POST /v1/unload_lora_adapter`: stop serving `lora_name`; requests
/// already running on it finish.
pub async fn unload_adapter(
    State(state): Shared,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    admin(&state, &headers)?;
    let v = body(&state, raw)?;
    let req: UnloadRequest = fields(&v)?;
    state.unload(&req.lora_name)?;
    Ok(axum::Json(json!({"status": "ok", "lora_name": req.lora_name})).into_response())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Who is calling: the owner of the key presented, and whether it is the
/// admin key (which sees every owner's records). Without keys configured,
/// every caller is the admin `local`.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The owner's name.
    pub owner: String,
    /// Whether the caller sees all owners' records.
    pub admin: bool,
}

impl Caller {
    /// The store scope of this caller.
    pub fn scope(&self) -> skillet_store::Scope<'_> {
        if self.admin {
            skillet_store::Scope::Admin
        } else {
            skillet_store::Scope::Owner(&self.owner)
        }
    }
}

/// The caller a bearer key stands for (`None`: no key matches).
fn caller(state: &AppState, headers: &HeaderMap) -> Option<Caller> {
    let config = &state.config;
    if config.api_keys.is_empty() && config.admin_key.is_none() {
        return Some(Caller {
            owner: "local".into(),
            admin: true,
        });
    }
    let presented = crate::config::digest(bearer(headers)?);
    if let Some(k) = &config.admin_key
        && k.matches(&presented)
    {
        return Some(Caller {
            owner: k.owner.clone(),
            admin: true,
        });
    }
    config
        .api_keys
        .iter()
        .find(|k| k.matches(&presented))
        .map(|k| Caller {
            owner: k.owner.clone(),
            admin: false,
        })
}

/// Adapter loading needs the admin key when one is set.
fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.config.admin_key {
        Some(key) if !bearer(headers).is_some_and(|k| key.matches(&crate::config::digest(k))) => {
            Err(ApiError::forbidden(
                "loading and unloading adapters needs the admin key",
            ))
        }
        _ => Ok(()),
    }
}

/// Every route but `/health` needs one of the API keys (or the admin key),
/// when keys are configured; the caller it stands for goes with the
/// request. Also counts requests for `/metrics`.
pub async fn guard(State(state): Shared, mut request: Request, next: Next) -> Response {
    let route = request.uri().path().to_string();
    match caller(&state, request.headers()) {
        Some(c) => {
            request.extensions_mut().insert(c);
        }
        // The page itself holds no data; it asks for a key to call the API.
        None if route != "/health" && route != "/" => {
            state.metrics.request(&route, 401);
            return ApiError::unauthorized().into_response();
        }
        None => {}
    }
    let response = next.run(request).await;
    let known = [
        "/",
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/files",
        "/v1/fine_tuning/jobs",
    ];
    let label = if known.contains(&route.as_str()) {
        route.as_str()
    } else {
        "other"
    };
    state.metrics.request(label, response.status().as_u16());
    response
}

/// Unknown routes, in OpenAI's error shape.
pub async fn fallback() -> ApiError {
    ApiError::not_found("Unknown route")
}

/// Whether the server is draining (used by shutdown).
pub fn stop(state: &AppState) {
    state.stopping.store(true, Ordering::Relaxed);
}
