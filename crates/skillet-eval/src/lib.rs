//! Evaluation of a model (with or without an adapter) on held-out data:
//! loss, perplexity and token accuracy on the trained tokens; exact match
//! of greedy generations against each example's last assistant turn; and
//! perplexity on general text, the check for catastrophic forgetting.
#![warn(missing_docs)]

mod report;

pub use report::{Columns, RunFacts, Snapshot, loss_svg, write_report};

use serde::Serialize;
use skillet_data::{Example, Turn};
use skillet_generate::{EngineConfig, GenerateOptions, SamplingParams, generate_all};
use skillet_models::{Activations, CausalLm, ForwardInput};
use skillet_tokenizer::{ChatTemplate, Message, Tokenizer};

pub use skillet_train::{EvalStats, evaluate};

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] skillet_generate::GenerateError),
    /// Tokenizer or template failed.
    #[error(transparent)]
    Tokenizer(#[from] skillet_tokenizer::TokenizerError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] skillet_models::ModelError),
    /// Tensor failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Nothing to evaluate.
    #[error("{0}")]
    Empty(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, EvalError>;

/// One generated answer next to its reference.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Source line.
    pub line: usize,
    /// Expected text.
    pub reference: String,
    /// Generated text.
    pub generated: String,
    /// Equal after trimming whitespace.
    pub exact: bool,
}

/// Exact-match results.
#[derive(Debug, Clone, Serialize)]
pub struct ExactMatch {
    /// Fraction of examples whose generation equals the reference.
    pub exact_match: f64,
    /// Examples generated for.
    pub examples: usize,
    /// Every example's answer.
    pub samples: Vec<Sample>,
}

/// The prompt tokens and reference answer of an example: a conversation up
/// to its last assistant turn (rendered with the generation prompt), or a
/// prompt/completion pair. Raw text has none.
fn prompt_and_reference(
    ex: &Example,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Option<(Vec<u32>, String)>> {
    match ex {
        Example::Chat(turns) => {
            let Some(last) = turns.iter().rposition(|t: &Turn| t.role == "assistant") else {
                return Ok(None);
            };
            let Some(template) = template else {
                return Ok(None);
            };
            let msgs: Vec<Message> = turns[..last]
                .iter()
                .map(|t| Message::new(t.role.clone(), t.content.clone()))
                .collect();
            Ok(Some((
                template.prompt_ids(tokenizer, &msgs)?,
                turns[last].content.clone(),
            )))
        }
        Example::Completion { prompt, completion } => {
            Ok(Some((tokenizer.encode(prompt, false)?, completion.clone())))
        }
        Example::Text(_) => Ok(None),
    }
}

/// Sequences generated together by [`exact_match`] unless told otherwise.
pub const EXACT_MATCH_BATCH: usize = 32;

/// Greedy generation (until EOS or `max_new_tokens`) for every example
/// with a reference answer, `batch` sequences at a time through one
/// continuously batched engine; `exact_match` compares trimmed texts.
pub fn exact_match(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    examples: &[(usize, Example)],
    max_new_tokens: usize,
    batch: usize,
) -> Result<ExactMatch> {
    let opts = GenerateOptions {
        max_tokens: max_new_tokens,
        sampling: SamplingParams::default(),
        stop: vec![],
        eos_ids: tokenizer.eos_ids().to_vec(),
        activations: Activations::F32,
        logprobs: None,
    };
    let mut asked = Vec::new();
    for (line, ex) in examples {
        if let Some((prompt, reference)) = prompt_and_reference(ex, tokenizer, template)? {
            asked.push((*line, prompt, reference));
        }
    }
    if asked.is_empty() {
        return Err(EvalError::Empty(
            "no example has a reference answer to generate (text-only data?)".into(),
        ));
    }
    let longest = asked.iter().map(|(_, p, _)| p.len()).max().unwrap_or(0);
    let config = EngineConfig {
        max_batch: batch.max(1),
        capacity: longest + max_new_tokens,
        ..EngineConfig::default()
    };
    let requests = asked
        .iter()
        .map(|(_, p, _)| opts.request(p.clone()))
        .collect();
    let generations = generate_all(model, tokenizer, config, requests)?;
    let samples: Vec<Sample> = asked
        .into_iter()
        .zip(generations)
        .map(|((line, _, reference), g)| Sample {
            line,
            exact: g.text.trim() == reference.trim(),
            reference,
            generated: g.text,
        })
        .collect();
    let hits = samples.iter().filter(|s| s.exact).count();
    Ok(ExactMatch {
        exact_match: hits as f64 / samples.len() as f64,
        examples: samples.len(),
        samples,
    })
}

/// Perplexity of general text.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct GeneralStats {
    /// Mean next-token loss.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens predicted.
    pub tokens: usize,
}

/// Summed negative log-likelihood of `ids[1..]` given logit rows for
/// `ids` (row `i` predicts `ids[i + 1]`; log-sum-exp in f64), and the
/// argmax of every row.
pub fn next_token_nll(rows: &[Vec<f32>], ids: &[u32]) -> (f64, Vec<u32>) {
    let mut nll = 0.0f64;
    let mut argmax = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        argmax.push(skillet_generate::argmax(row));
        if i + 1 < ids.len() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[ids[i + 1] as usize] as f64;
        }
    }
    (nll, argmax)
}

/// Perplexity of `text` (no BOS added), in windows of `window` tokens.
pub fn general_perplexity(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    text: &str,
    window: usize,
) -> Result<GeneralStats> {
    let ids = tokenizer.encode(text, false)?;
    if ids.len() < 2 {
        return Err(EvalError::Empty(
            "the general text has fewer than 2 tokens".into(),
        ));
    }
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in ids.chunks(window.max(2)) {
        if chunk.len() < 2 {
            continue;
        }
        let input = ForwardInput::new(
            candle_core::Tensor::new(chunk, &candle_core::Device::Cpu)?.unsqueeze(0)?,
        );
        let rows = model.forward(&input)?.squeeze(0)?.to_vec2::<f32>()?;
        sum += next_token_nll(&rows, chunk).0;
        n += chunk.len() - 1;
    }
    let loss = sum / n as f64;
    Ok(GeneralStats {
        loss,
        perplexity: loss.exp(),
        tokens: n,
    })
}
