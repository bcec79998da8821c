//! From a checked request to the model's thread and back: the context and
//! queue limits, one engine sequence per choice, and the answer as one
//! JSON object or as server-sent events. Chat and text completions differ
//! only in their JSON shapes ([`Shape`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use skillet_generate::{Event, FinishReason, Request, TokenLogprob};
use skillet_models::Adapter;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::error::ApiError;
use crate::openai::Checked;
use crate::state::{AppState, now};
use crate::worker::Command;

/// Which OpenAI object family the answer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `chat.completion` / `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// A request ready for the engine.
pub struct Job {
    /// Chat or text.
    pub kind: Kind,
    /// The `model` the client named (echoed back).
    pub model: String,
    /// The adapter, or the base model.
    pub adapter: Option<Arc<dyn Adapter>>,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Checked shared options.
    pub checked: Checked,
    /// Report log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Stream events.
    pub stream: bool,
    /// With streaming, a last chunk with usage.
    pub include_usage: bool,
}

/// Tells the model's thread when a request is over (finished, failed, or
/// its client gone), so whatever is left of it is dropped at once.
struct Ticket {
    state: Arc<AppState>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.state.send(Command::Release { ticket: self.id });
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One choice's result.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: usize,
    finish: Option<FinishReason>,
    logprobs: Vec<TokenLogprob>,
}

/// How the answer is written.
struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

/// A value that differs per request and per call: the clock mixed with
/// the ticket (ids and seeds need uniqueness, not secrecy).
fn unique(ticket: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos ^ ticket.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^ (x >> 33)
}

/// Checks limits, queues one sequence per choice and answers.
pub async fn run(state: Arc<AppState>, job: Job) -> Result<Response, ApiError> {
    if state.stopping.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable("The server is shutting down"));
    }
    let ctx = state.config.ctx;
    let prompt_len = job.prompt.len();
    if prompt_len == 0 {
        return Err(ApiError::invalid("The prompt has no tokens"));
    }
    let room = ctx.saturating_sub(prompt_len);
    let max_tokens = match job.checked.max_tokens {
        Some(m) if m > room => {
            let p = if job.kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            };
            return Err(ApiError::param(
                "max_tokens",
                format!(
                    "This model's context is {ctx} tokens, but {} were requested ({prompt_len} in the {p}, {m} for the completion)",
                    prompt_len + m
                ),
            ));
        }
        Some(m) => m,
        None if room == 0 => {
            return Err(ApiError::param(
                if job.kind == Kind::Chat {
                    "messages"
                } else {
                    "prompt"
                },
                format!("The prompt has {prompt_len} tokens; this model's context is {ctx}"),
            ));
        }
        None => room,
    };
    let limit = state.config.max_batch + state.config.max_queue;
    if state.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
        state.in_flight.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::queue_full());
    }
    let ticket = Ticket {
        id: state.ticket(),
        state: state.clone(),
    };
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_len as u64, Ordering::Relaxed);
    let (tx, rx) = unbounded_channel();
    let eos_ids = if job.ignore_eos {
        Vec::new()
    } else {
        state.bundle.tokenizer.eos_ids().to_vec()
    };
    let arrived = Instant::now();
    let base_seed = job
        .checked
        .sampling
        .seed
        .unwrap_or_else(|| unique(ticket.id));
    for choice in 0..job.checked.n {
        let sampling = job
            .checked
            .sampling
            .resolve(base_seed.wrapping_add(choice as u64))?;
        state.send(Command::Submit {
            ticket: ticket.id,
            choice,
            request: Request {
                prompt: job.prompt.clone(),
                max_tokens,
                sampling,
                stop: job.checked.stop.clone(),
                eos_ids: eos_ids.clone(),
                adapter: job.adapter.clone(),
                logprobs: job.logprobs,
            },
            events: tx.clone(),
            arrived,
        })?;
    }
    drop(tx);
    let shape = Shape {
        kind: job.kind,
        id: format!(
            "{}-{:016x}",
            if job.kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            unique(ticket.id)
        ),
        created: now(),
        model: job.model.clone(),
    };
    if job.stream {
        Ok(stream(state, shape, job, rx, ticket, prompt_len))
    } else {
        whole(&state, &shape, &job, rx, ticket, prompt_len).await
    }
}

/// Waits for every choice and answers with one JSON object.
async fn whole(
    state: &AppState,
    shape: &Shape,
    job: &Job,
    mut rx: UnboundedReceiver<(usize, Event)>,
    ticket: Ticket,
    prompt_len: usize,
) -> Result<Response, ApiError> {
    let mut choices: Vec<Choice> = (0..job.checked.n).map(|_| Choice::default()).collect();
    let mut left = job.checked.n;
    while left > 0 {
        let Some((i, event)) = rx.recv().await else {
            return Err(ApiError::internal("the model worker dropped a request"));
        };
        let c = &mut choices[i];
        match event {
            Event::Token { text, logprob, .. } => {
                c.text.push_str(&text);
                c.tokens += 1;
                c.logprobs.extend(logprob);
            }
            Event::Finished(g) => {
                c.text = g.text;
                c.finish = Some(g.finish_reason);
                left -= 1;
            }
            Event::Failed(m) => return Err(ApiError::internal(m)),
        }
    }
    drop(ticket);
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    let body = json!({
        "id": shape.id,
        "object": if shape.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": shape.created,
        "model": shape.model,
        "system_fingerprint": Value::Null,
        "choices": choices.iter().enumerate().map(|(i, c)| {
            let logprobs = job.logprobs.map(|_| logprobs_json(state, shape.kind, &c.logprobs));
            let finish = c.finish.map(FinishReason::as_str);
            match shape.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text, "refusal": Value::Null},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
                Kind::Completion => json!({
                    "index": i, "text": c.text, "logprobs": logprobs, "finish_reason": finish,
                }),
            }
        }).collect::<Vec<_>>(),
        "usage": usage(prompt_len, completion),
    });
    Ok(axum::Json(body).into_response())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// A token's text and bytes for log-probability lists.
fn token_text(state: &AppState, id: u32) -> String {
    state
        .bundle
        .tokenizer
        .decode(&[id], false)
        .unwrap_or_default()
}

fn logprobs_json(state: &AppState, kind: Kind, lps: &[TokenLogprob]) -> Value {
    match kind {
        Kind::Chat => {
            let entry = |id: u32, lp: f32| {
                let t = token_text(state, id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            json!({"content": lps.iter().map(|l| {
                let mut e = entry(l.id, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            }).collect::<Vec<_>>(), "refusal": Value::Null})
        }
        Kind::Completion => {
            let tokens: Vec<String> = lps.iter().map(|l| token_text(state, l.id)).collect();
            let mut offset = 0;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let o = offset;
                    offset += t.len();
                    o
                })
                .collect();
            json!({
                "tokens": tokens,
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|l| {
                    l.top.iter().map(|&(id, lp)| (token_text(state, id), json!(lp))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// Server-sent events: a chunk per piece of text of each choice, a last
/// chunk per choice with its finish reason, optionally a usage chunk, then
/// `data: [DONE]`. Dropping the stream (client gone) releases the ticket.
fn stream(
    state: Arc<AppState>,
    shape: Shape,
    job: Job,
    rx: UnboundedReceiver<(usize, Event)>,
    ticket: Ticket,
    prompt_len: usize,
) -> Response {
    struct S {
        state: Arc<AppState>,
        shape: Shape,
        job: Job,
        rx: UnboundedReceiver<(usize, Event)>,
        ticket: Option<Ticket>,
        left: usize,
        tokens: usize,
        started: Vec<bool>,
        done: bool,
        prompt_len: usize,
    }
    let s = S {
        left: job.checked.n,
        started: vec![false; job.checked.n],
        state,
        shape,
        job,
        rx,
        ticket: Some(ticket),
        tokens: 0,
        done: false,
        prompt_len,
    };
    let body = futures_util::stream::unfold(s, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if s.left == 0 {
                s.done = true;
                s.ticket.take();
                let mut out = String::new();
                if s.job.include_usage {
                    let mut c = chunk_base(&s.shape);
                    c["choices"] = json!([]);
                    c["usage"] = usage(s.prompt_len, s.tokens);
                    out.push_str(&sse(&c));
                }
                out.push_str("data: [DONE]\n\n");
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), s));
            }
            let Some((i, event)) = s.rx.recv().await else {
                // The worker dropped the request: end the stream.
                s.done = true;
                return Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), s));
            };
            let mut out = String::new();
            if s.shape.kind == Kind::Chat && !s.started[i] {
                s.started[i] = true;
                out.push_str(&sse(&choice_chunk(
                    &s,
                    i,
                    Some(json!({"role": "assistant", "content": ""})),
                    None,
                    None,
                )));
            }
            match event {
                Event::Token { text, logprob, .. } => {
                    s.tokens += 1;
                    if text.is_empty() && logprob.is_none() {
                        if out.is_empty() {
                            continue;
                        }
                    } else {
                        let lp = logprob.map(|l| logprobs_json(&s.state, s.shape.kind, &[l]));
                        out.push_str(&sse(&choice_chunk(
                            &s,
                            i,
                            Some(json!({"content": text})),
                            lp,
                            None,
                        )));
                    }
                }
                Event::Finished(g) => {
                    s.left -= 1;
                    out.push_str(&sse(&choice_chunk(
                        &s,
                        i,
                        Some(json!({})),
                        None,
                        Some(g.finish_reason),
                    )));
                }
                Event::Failed(m) => {
                    tracing::error!("a streamed sequence failed: {m}");
                    s.done = true;
                    let err = ApiError::internal(m);
                    out.push_str(&sse(&err.body()));
                    out.push_str("data: [DONE]\n\n");
                }
            }
            return Some((Ok(Bytes::from(out)), s));
        }

        fn choice_chunk(
            s: &S,
            i: usize,
            delta: Option<Value>,
            logprobs: Option<Value>,
            finish: Option<FinishReason>,
        ) -> Value {
            let mut c = chunk_base(&s.shape);
            let finish = finish.map(FinishReason::as_str);
            let choice = match s.shape.kind {
                Kind::Chat => {
                    json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
                }
                Kind::Completion => json!({
                    "index": i,
                    "text": delta.as_ref().and_then(|d| d.get("content")).cloned().unwrap_or(json!("")),
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
            };
            c["choices"] = json!([choice]);
            if s.job.include_usage {
                c["usage"] = Value::Null;
            }
            c
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e).into_response())
}

fn chunk_base(shape: &Shape) -> Value {
    json!({
        "id": shape.id,
        "object": if shape.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": shape.created,
        "model": shape.model,
        "system_fingerprint": Value::Null,
    })
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}
