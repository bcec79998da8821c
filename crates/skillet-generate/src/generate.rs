//! One prompt at a time: the batching engine with a single slot, the text
//! streamed to a callback as it becomes final.

use skillet_models::{Activations, CausalLm, ModelError};
use skillet_tokenizer::{Tokenizer, TokenizerError};

use crate::{Engine, EngineConfig, Event, Request, SamplingParams, TokenLogprob};

/// Errors of a generation call.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Decoding text failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Invalid request.
    #[error("{0}")]
    Invalid(String),
}

impl From<candle_core::Error> for GenerateError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(e.into())
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// Text that ends generation (not included in the output).
    pub stop: Vec<String>,
    /// Token ids that end generation (included in `ids`, not in `text`).
    pub eos_ids: Vec<u32>,
    /// How quantized weights take their inputs.
    pub activations: Activations,
    /// Report each new token's log-probability and this many alternatives
    /// (`Some(0)`: the chosen token's only) in `Generation::logprobs`.
    pub logprobs: Option<usize>,
}

impl GenerateOptions {
    /// The engine request for `prompt` with these options (no adapter).
    pub fn request(&self, prompt: Vec<u32>) -> Request {
        Request {
            prompt,
            max_tokens: self.max_tokens,
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
            eos_ids: self.eos_ids.clone(),
            adapter: None,
            logprobs: self.logprobs,
        }
    }
}

/// Why generation ended (OpenAI's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS token or stop string.
    Stop,
    /// Token budget or context length reached.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New text (special tokens and stop strings removed).
    pub text: String,
    /// New token ids, including a final EOS token if one was produced.
    pub ids: Vec<u32>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Seconds from the request to its first token (queue and prefill).
    pub prefill_seconds: f64,
    /// Seconds spent producing tokens after the first.
    pub decode_seconds: f64,
    /// Each new token's log-probability, where `GenerateOptions::logprobs`
    /// asked for them (`generate` gathers them; the engine streams them in
    /// `Event::Token` and leaves this empty).
    pub logprobs: Vec<TokenLogprob>,
}

impl Generation {
    /// Decode speed: tokens after the first per second.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.ids.len().saturating_sub(1);
        if n == 0 || self.decode_seconds <= 0.0 {
            0.0
        } else {
            n as f64 / self.decode_seconds
        }
    }
}

/// Generates from `prompt` (token ids), calling `on_text` with each new
/// piece of text as soon as it is final.
pub fn generate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) + Send,
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::Invalid("the prompt has no tokens".into()));
    }
    let ctx = model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(GenerateError::Invalid(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt.len()
        )));
    }
    let config = EngineConfig {
        max_batch: 1,
        capacity: (prompt.len() + opts.max_tokens).min(ctx),
        activations: opts.activations,
        ..EngineConfig::default()
    };
    let mut result = None;
    let mut logprobs = Vec::new();
    {
        let mut engine = Engine::new(model, tokenizer, config);
        engine.add(
            opts.request(prompt.to_vec()),
            Box::new(|e| {
                match e {
                    Event::Token { text, logprob, .. } => {
                        logprobs.extend(logprob);
                        if !text.is_empty() {
                            on_text(&text);
                        }
                    }
                    Event::Finished(g) => result = Some(Ok(g)),
                    Event::Failed(m) => result = Some(Err(GenerateError::Invalid(m))),
                }
                true
            }),
        );
        engine.run_to_end()?;
    }
    let mut g = result
        .unwrap_or_else(|| Err(GenerateError::Invalid("generation did not finish".into())))?;
    g.logprobs = logprobs;
    Ok(g)
}
