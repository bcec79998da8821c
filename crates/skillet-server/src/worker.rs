//! The model's own thread: it owns the batching engine, takes requests
//! and cancellations from the HTTP handlers over a channel, and sends each
//! sequence's events back on the request's channel. Nothing here runs on
//! the async runtime, so compute never blocks request handling.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use skillet_generate::{Engine, EngineConfig, Event, Request, SeqId};
use skillet_models::CausalLm;
use skillet_tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// What handlers ask of the worker.
pub enum Command {
    /// Generate `request` as choice `choice` of ticket `ticket`.
    Submit {
        /// The HTTP request's ticket (one per request, shared by its choices).
        ticket: u64,
        /// Which choice (`n` > 1 gives several).
        choice: usize,
        /// What to generate.
        request: Request,
        /// Where its events go, tagged with the choice.
        events: UnboundedSender<(usize, Event)>,
        /// When the HTTP request arrived.
        arrived: Instant,
    },
    /// The ticket's client is gone or done: drop what is left of it.
    Release {
        /// The ticket.
        ticket: u64,
    },
    /// Shutdown: drop every sequence.
    CancelAll,
}

/// Runs the engine until the command channel closes and nothing is left.
pub fn run(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    config: EngineConfig,
    commands: Receiver<Command>,
    metrics: Arc<Metrics>,
) {
    let mut engine = Engine::new(model, tokenizer, config);
    let mut tickets: HashMap<u64, Vec<SeqId>> = HashMap::new();
    let mut open = true;
    while open || engine.has_work() {
        if !engine.has_work() {
            match commands.recv() {
                Ok(cmd) => apply(&mut engine, &mut tickets, cmd, &metrics),
                Err(_) => break,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(cmd) => apply(&mut engine, &mut tickets, cmd, &metrics),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if let Err(e) = engine.step() {
            tracing::error!("a decode step failed: {e}");
        }
        metrics
            .running
            .store(engine.running() as u64, Ordering::Relaxed);
        metrics
            .waiting
            .store(engine.waiting() as u64, Ordering::Relaxed);
        metrics
            .cached_prompt_tokens
            .store(engine.reused_prompt_tokens(), Ordering::Relaxed);
    }
}

fn apply<'a>(
    engine: &mut Engine<'a>,
    tickets: &mut HashMap<u64, Vec<SeqId>>,
    cmd: Command,
    metrics: &Arc<Metrics>,
) {
    match cmd {
        Command::Submit {
            ticket,
            choice,
            request,
            events,
            arrived,
        } => {
            let metrics = metrics.clone();
            let mut last: Option<Instant> = None;
            let id = engine.add(
                request,
                Box::new(move |e| {
                    if let Event::Token { .. } = e {
                        let now = Instant::now();
                        match last {
                            None => metrics.ttft.observe((now - arrived).as_secs_f64()),
                            Some(t) => metrics.inter_token.observe((now - t).as_secs_f64()),
                        }
                        last = Some(now);
                        metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    }
                    let live = events.send((choice, e)).is_ok();
                    if !live {
                        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    live
                }),
            );
            tickets.entry(ticket).or_default().push(id);
        }
        Command::CancelAll => {
            for (_, ids) in tickets.drain() {
                for id in ids {
                    engine.cancel(id);
                }
            }
        }
        Command::Release { ticket } => {
            for id in tickets.remove(&ticket).unwrap_or_default() {
                if engine.cancel(id) {
                    metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
