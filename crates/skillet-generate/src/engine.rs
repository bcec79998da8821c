//! Continuous batching: sequences join and leave a running batch between
//! decode steps (Orca, Yu et al. 2022). Each sequence owns a slot of a
//! preallocated key/value cache, its sampler, stop conditions and adapter,
//! so one forward call advances sequences of different adapters,
//! lengths and sampling settings together.
//!
//! A step: admit waiting requests into free slots; give every decoding
//! sequence its last token and the prefilling ones a share of the prefill
//! budget (long prompts are prefilled in chunks, so running streams keep
//! getting a token every step); run one ragged forward; sample; stream the
//! new text; retire finished sequences and free their slots at once. A
//! sequence whose output sink is gone (client disconnected) is dropped as
//! soon as its next output is refused.
//!
//! A freed slot keeps its keys and values: a new request goes to the free
//! slot whose tokens (under the same adapter) share the longest prefix with
//! its prompt, and only the rest of the prompt is prefilled (a chat's
//! system prompt and earlier turns, a repeated few-shot prefix).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use skillet_models::{Activations, Adapter, CachedBatch, CachedChunk, CausalLm, KvCache};
use skillet_tokenizer::Tokenizer;

use crate::{FinishReason, GenerateError, Generation, Sampler, SamplingParams, TextStream};

/// Sizes of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together (cache slots).
    pub max_batch: usize,
    /// Positions per sequence (prompt plus output).
    pub capacity: usize,
    /// Prompt tokens prefilled per step, over all prefilling sequences.
    pub prefill_chunk: usize,
    /// How quantized weights take their inputs.
    pub activations: Activations,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            capacity: 2048,
            prefill_chunk: 256,
            activations: Activations::F32,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Most new tokens (cut to what the slot can hold).
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// Text that ends generation (not included in the output).
    pub stop: Vec<String>,
    /// Token ids that end generation (in `ids`, not in the text).
    pub eos_ids: Vec<u32>,
    /// The adapter, or the base model.
    pub adapter: Option<Arc<dyn Adapter>>,
    /// Report each chosen token's log-probability and this many
    /// alternatives (`Some(0)`: the chosen one only).
    pub logprobs: Option<usize>,
}

/// A token's log-probability under the model (log-softmax of the raw
/// logits) and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens with theirs, best first.
    pub top: Vec<(u32, f32)>,
}

/// What a sequence reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A token was generated; `text` is the text that became final with it
    /// (possibly empty, e.g. half of a character or a possible stop string).
    Token {
        /// The token id.
        id: u32,
        /// Final text released by this token.
        text: String,
        /// With `Request::logprobs`.
        logprob: Option<TokenLogprob>,
    },
    /// The sequence ended (its slot is free again).
    Finished(Generation),
    /// The sequence failed and was dropped.
    Failed(String),
}

/// Where a sequence's events go; returning `false` cancels it.
pub type Sink<'a> = Box<dyn FnMut(Event) -> bool + Send + 'a>;

/// A request's handle in the engine.
pub type SeqId = u64;

struct Sequence<'a> {
    id: SeqId,
    request: Request,
    sink: Sink<'a>,
    sampler: Sampler,
    /// Prompt plus generated ids.
    ids: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    stream: TextStream,
    budget: usize,
    arrived: Instant,
    first_token: Option<Instant>,
}

impl Sequence<'_> {
    fn prompt_len(&self) -> usize {
        self.request.prompt.len()
    }

    fn generated(&self) -> &[u32] {
        &self.ids[self.prompt_len()..]
    }
}

/// What a slot's cache holds: the tokens fed so far and their adapter.
#[derive(Default)]
struct Held {
    tokens: Vec<u32>,
    adapter: Option<Arc<dyn Adapter>>,
}

impl Held {
    /// Positions of `prompt` (under `adapter`) already in this slot.
    fn common(&self, prompt: &[u32], adapter: &Option<Arc<dyn Adapter>>) -> usize {
        shared_prefix(&self.tokens, &self.adapter, prompt, adapter)
    }
}

/// Leading tokens two sequences share, where both run under the same
/// adapter (0 otherwise).
fn shared_prefix(
    a: &[u32],
    a_adapter: &Option<Arc<dyn Adapter>>,
    b: &[u32],
    b_adapter: &Option<Arc<dyn Adapter>>,
) -> usize {
    let same = match (a_adapter, b_adapter) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    };
    if !same {
        return 0;
    }
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The batching engine over one model.
pub struct Engine<'a> {
    model: &'a dyn CausalLm,
    tokenizer: &'a Tokenizer,
    config: EngineConfig,
    cache: KvCache,
    /// Running sequences by slot.
    slots: Vec<Option<Sequence<'a>>>,
    /// What each slot's cache holds (kept after its sequence leaves).
    held: Vec<Held>,
    /// Prompt tokens taken from a slot's cache instead of prefilled.
    reused: u64,
    waiting: VecDeque<Sequence<'a>>,
    next_id: SeqId,
}

impl<'a> Engine<'a> {
    /// An engine with an empty cache of `config.max_batch` slots.
    pub fn new(model: &'a dyn CausalLm, tokenizer: &'a Tokenizer, config: EngineConfig) -> Self {
        let config = EngineConfig {
            max_batch: config.max_batch.max(1),
            capacity: config
                .capacity
                .clamp(2, model.config().max_position_embeddings.max(2)),
            prefill_chunk: config.prefill_chunk.max(1),
            activations: config.activations,
        };
        Self {
            cache: model.new_cache(config.max_batch, config.capacity),
            model,
            tokenizer,
            slots: (0..config.max_batch).map(|_| None).collect(),
            held: (0..config.max_batch).map(|_| Held::default()).collect(),
            reused: 0,
            waiting: VecDeque::new(),
            next_id: 0,
            config,
        }
    }

    /// Queues `request`; its events go to `sink`. A request that cannot
    /// run (empty prompt, prompt longer than a slot) fails at once.
    pub fn add(&mut self, request: Request, mut sink: Sink<'a>) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        let cap = self.config.capacity;
        if request.prompt.is_empty() {
            sink(Event::Failed("the prompt has no tokens".into()));
            return id;
        }
        if request.prompt.len() >= cap {
            sink(Event::Failed(format!(
                "the prompt has {} tokens; the context is {cap}",
                request.prompt.len()
            )));
            return id;
        }
        let budget = request.max_tokens.min(cap - request.prompt.len());
        self.waiting.push_back(Sequence {
            id,
            sampler: Sampler::new(request.sampling.clone()),
            ids: request.prompt.clone(),
            prefilled: 0,
            stream: TextStream::new(request.stop.clone()),
            budget,
            arrived: Instant::now(),
            first_token: None,
            request,
            sink,
        });
        id
    }

    /// Drops sequence `id` wherever it is; its slot is free at once.
    /// Returns whether it was still there.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|s| s.id != id);
        let mut found = self.waiting.len() != before;
        for s in self.slots.iter_mut() {
            if s.as_ref().is_some_and(|s| s.id == id) {
                *s = None;
                found = true;
            }
        }
        found
    }

    /// Prompt tokens so far taken from a slot's cache instead of computed.
    pub fn reused_prompt_tokens(&self) -> u64 {
        self.reused
    }

    /// Empties `slot`'s cache (after a failure its contents are unknown).
    fn forget(&mut self, slot: usize) {
        self.cache.clear(slot);
        self.held[slot] = Held::default();
    }

    /// Sequences waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences holding a slot.
    pub fn running(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Whether there is anything to do.
    pub fn has_work(&self) -> bool {
        self.running() + self.waiting() > 0
    }

    /// Runs steps until every sequence has finished.
    pub fn run_to_end(&mut self) -> Result<(), GenerateError> {
        while self.has_work() {
            self.step()?;
        }
        Ok(())
    }

    /// One scheduling step and one forward call. An error of the forward
    /// call fails the sequences of that batch and is returned.
    pub fn step(&mut self) -> Result<(), GenerateError> {
        self.admit();
        let mut batch = CachedBatch {
            activations: self.config.activations,
            ..CachedBatch::default()
        };
        let mut rows = Vec::new(); // (slot, whether this row's logits are sampled)
        // Prompts go in chunks of `prefill_chunk` tokens from their start,
        // whatever else runs, so a sequence is computed the same way alone
        // or batched; a step takes whole chunks up to that many tokens (at
        // least one).
        let chunk = self.config.prefill_chunk;
        let mut prefill = 0;
        for (slot, seq) in self.slots.iter_mut().enumerate() {
            let Some(seq) = seq else { continue };
            let tokens = if seq.prefilled < seq.prompt_len() {
                let n = (seq.prompt_len() - seq.prefilled).min(chunk);
                if prefill > 0 && prefill + n > chunk {
                    continue;
                }
                prefill += n;
                seq.request.prompt[seq.prefilled..seq.prefilled + n].to_vec()
            } else {
                vec![*seq.ids.last().expect("a prefilled sequence has a token")]
            };
            let adapter = seq.request.adapter.as_ref().map(|a| {
                match batch.adapters.iter().position(|b| Arc::ptr_eq(a, b)) {
                    Some(i) => i,
                    None => {
                        batch.adapters.push(a.clone());
                        batch.adapters.len() - 1
                    }
                }
            });
            let n = tokens.len();
            batch.chunks.push(CachedChunk {
                slot,
                tokens,
                adapter,
            });
            let done = seq.prefilled >= seq.prompt_len() || seq.prefilled + n == seq.prompt_len();
            seq.prefilled = (seq.prefilled + n).min(seq.prompt_len());
            rows.push((slot, done));
        }
        if batch.chunks.is_empty() {
            return Ok(());
        }
        let logits = match self
            .model
            .forward_cached(&batch, &mut self.cache)
            .and_then(|l| Ok(l.to_vec2::<f32>()?))
        {
            Ok(l) => l,
            Err(e) => {
                for &(slot, _) in &rows {
                    if let Some(mut s) = self.slots[slot].take() {
                        (s.sink)(Event::Failed(e.to_string()));
                    }
                    self.forget(slot);
                }
                return Err(e.into());
            }
        };
        for c in &batch.chunks {
            self.held[c.slot].tokens.extend_from_slice(&c.tokens);
        }
        for (&(slot, sample), row) in rows.iter().zip(&logits) {
            if sample && let Err(e) = self.advance(slot, row) {
                if let Some(mut s) = self.slots[slot].take() {
                    (s.sink)(Event::Failed(e.to_string()));
                }
                self.forget(slot);
            }
        }
        Ok(())
    }

    /// Moves waiting sequences into free slots, each into the one whose
    /// cache shares the longest prefix with its prompt; that prefix is not
    /// computed again (the last prompt token always is, for its logits).
    /// Where a running sequence's cache holds more of the prompt, that
    /// prefix is copied from it instead. A request whose prompt is mostly
    /// one a running sequence is still prefilling (the completions of one
    /// prompt sampled together, users sharing a long system prompt) waits
    /// until those positions exist, and is then copied, not computed again.
    fn admit(&mut self) {
        while let Some(seq) = self.waiting.front() {
            let (prompt, adapter) = (&seq.request.prompt, &seq.request.adapter);
            let usable = prompt.len() - 1;
            let best = |slots: &mut dyn Iterator<Item = usize>| {
                slots
                    .map(|s| (s, self.held[s].common(prompt, adapter).min(usable)))
                    .max_by_key(|&(s, c)| (c, std::cmp::Reverse(s)))
            };
            let running = || (0..self.slots.len()).filter(|&s| self.slots[s].is_some());
            let Some((slot, common)) =
                best(&mut (0..self.slots.len()).filter(|&s| self.slots[s].is_none()))
            else {
                return;
            };
            let copied = best(&mut running()).filter(|&(_, c)| c > common);
            let have = copied.map_or(common, |(_, c)| c);
            let pending = self.slots.iter().flatten().any(|r| {
                let shared = shared_prefix(&r.request.prompt, &r.request.adapter, prompt, adapter)
                    .min(usable);
                r.prefilled < shared && shared > have && 2 * shared >= prompt.len()
            });
            if pending {
                return;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                return;
            };
            let keep = match copied {
                Some((from, c)) => {
                    self.cache.copy_prefix(from, slot, c);
                    c
                }
                None => {
                    self.cache.truncate(slot, common);
                    common
                }
            };
            self.cache.reserve_room(slot, seq.prompt_len() + seq.budget);
            let held = &mut self.held[slot];
            held.tokens = seq.request.prompt[..keep].to_vec();
            held.adapter = seq.request.adapter.clone();
            seq.prefilled = keep;
            self.reused += keep as u64;
            self.slots[slot] = Some(seq);
        }
    }

    /// Samples the next token of the sequence in `slot` from `logits` and
    /// reports it; retires the sequence when it is done.
    fn advance(&mut self, slot: usize, logits: &[f32]) -> Result<(), GenerateError> {
        let seq = self.slots[slot]
            .as_mut()
            .expect("a sampled row has a sequence");
        let prompt_len = seq.prompt_len();
        let id = seq.sampler.sample(logits, &seq.ids, prompt_len);
        seq.ids.push(id);
        let now = Instant::now();
        seq.first_token.get_or_insert(now);
        let logprob = seq.request.logprobs.map(|k| logprob(logits, id, k));
        let eos = seq.request.eos_ids.contains(&id);
        let mut text = if eos {
            String::new()
        } else {
            seq.stream.push(self.tokenizer, &seq.ids[prompt_len..])?
        };
        let finish = if eos || seq.stream.stopped() {
            Some(FinishReason::Stop)
        } else if seq.generated().len() >= seq.budget {
            Some(FinishReason::Length)
        } else {
            None
        };
        if finish.is_some() {
            // The last token carries whatever text was still held back.
            text.push_str(&seq.stream.finish(self.tokenizer, &seq.ids[prompt_len..])?);
        }
        let live = (seq.sink)(Event::Token { id, text, logprob });
        let Some(reason) = finish else {
            if !live {
                self.slots[slot] = None;
            }
            return Ok(());
        };
        let mut seq = self.slots[slot].take().expect("checked above");
        let first = seq.first_token.unwrap_or(now);
        let generation = Generation {
            text: seq.stream.text().to_string(),
            ids: seq.generated().to_vec(),
            prompt_tokens: prompt_len,
            finish_reason: reason,
            prefill_seconds: (first - seq.arrived).as_secs_f64(),
            decode_seconds: first.elapsed().as_secs_f64(),
            logprobs: Vec::new(),
        };
        if live {
            (seq.sink)(Event::Finished(generation));
        }
        Ok(())
    }
}

/// Log-softmax of `logits` at `id`, and the `k` most likely tokens.
fn logprob(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
        });
        order.truncate(k);
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    }
    TokenLogprob {
        id,
        logprob: lp(id as usize),
        top: order.iter().take(k).map(|&i| (i as u32, lp(i))).collect(),
    }
}

/// Generates every request with one engine (as one continuous batch) and
/// returns the results in request order.
pub fn generate_all(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    config: EngineConfig,
    requests: Vec<Request>,
) -> Result<Vec<Generation>, GenerateError> {
    let n = requests.len();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut engine = Engine::new(model, tokenizer, config);
    for (i, r) in requests.into_iter().enumerate() {
        let tx = tx.clone();
        engine.add(
            r,
            Box::new(move |e| match e {
                Event::Finished(g) => tx.send((i, Ok(g))).is_ok(),
                Event::Failed(m) => tx.send((i, Err(m))).is_ok(),
                Event::Token { .. } => true,
            }),
        );
    }
    drop(tx);
    engine.run_to_end()?;
    let mut out: Vec<Option<Generation>> = vec![None; n];
    for (i, r) in rx.try_iter() {
        out[i] = Some(r.map_err(GenerateError::Invalid)?);
    }
    out.into_iter()
        .map(|g| g.ok_or_else(|| GenerateError::Invalid("a request did not finish".into())))
        .collect()
}
