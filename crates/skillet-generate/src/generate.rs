//! The decode loop: prefill the prompt into a KV cache, then one token at a
//! time until EOS, a stop string, the token budget or the context ends.

use std::time::Instant;

use candle_core::{Device, Tensor};
use skillet_models::{CausalLm, ForwardInput, ModelError};
use skillet_tokenizer::{Tokenizer, TokenizerError};

use crate::{Sampler, SamplingParams};

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
    /// Seconds spent on the prompt (prefill).
    pub prefill_seconds: f64,
    /// Seconds spent producing tokens after the first.
    pub decode_seconds: f64,
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

fn last_logits(logits: &Tensor) -> Result<Vec<f32>, GenerateError> {
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop
/// string: text that may still become a stop string and must be held back.
fn pending_stop_prefix(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// Generates from `prompt` (token ids), calling `on_text` with each new
/// piece of text as soon as it is final.
pub fn generate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
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
    let budget = opts.max_tokens.min(ctx - prompt.len());
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut cache = model.new_cache(1);
    let mut history = prompt.to_vec();
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut emitted = 0;
    let mut finish = FinishReason::Length;

    let start = Instant::now();
    let input = ForwardInput::new(Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?);
    let mut logits = last_logits(&model.forward(&input, Some(&mut cache))?)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();

    while ids.len() < budget {
        let next = sampler.sample(&logits, &history);
        ids.push(next);
        history.push(next);
        if opts.eos_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        let full = tokenizer.decode(&ids, true)?;
        if let Some(pos) = opts.stop.iter().filter_map(|s| full.find(s.as_str())).min() {
            text = full[..pos].to_string();
            finish = FinishReason::Stop;
            break;
        }
        text = full;
        // Hold back an incomplete UTF-8 sequence and a possible stop prefix.
        if !text.ends_with('\u{FFFD}') {
            let safe = text.len() - pending_stop_prefix(&text, &opts.stop);
            if safe > emitted && text.is_char_boundary(safe) {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
        }
        if ids.len() >= budget {
            break;
        }
        let input = ForwardInput::new(Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?);
        let out = model.forward(&input, Some(&mut cache))?;
        logits = out.squeeze(0)?.squeeze(0)?.to_vec1::<f32>()?;
    }
    if text.len() > emitted {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        text,
        ids,
        prompt_tokens: prompt.len(),
        finish_reason: finish,
        prefill_seconds,
        decode_seconds: decode_start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::pending_stop_prefix;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(pending_stop_prefix("hello\nUs", &stops), 3);
        assert_eq!(pending_stop_prefix("hello", &stops), 0);
        assert_eq!(pending_stop_prefix("hello\n", &stops), 1);
    }
}
