//! Preference pairs to tokens: the prompt once, each completion after it.
//!
//! A conversational prompt is rendered with the chat template and its
//! generation prompt; a completion is what the template adds for the
//! assistant message after that, through its first end-of-turn token, the
//! span SFT trains on the same message. (TRL keeps the template's text after
//! the end-of-turn token too, a newline for ChatML.) A text prompt is
//! followed directly by the completion text and EOS, as Skillet's
//! `prompt`/`completion` SFT data and TRL's standard format.
//!
//! The prompt and the completions are tokenized apart, without special
//! tokens, so both sides share the prompt's tokens exactly and nothing adds
//! a second BOS. Truncation keeps the start: the prompt to
//! `max_prompt_len`, then each side to `max_seq_len`. A pair left with an
//! empty side is reported, not trained on.

use skillet_tokenizer::Message;

use crate::{
    DataError, DataIssue, Encoder, IssueCode, PairPrompt, PreferencePair, TokenizedExample,
};

/// Prompt, chosen and rejected tokens.
type Sides = (Vec<u32>, Vec<u32>, Vec<u32>);

/// A preference pair as tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    /// Line of the source file.
    pub line: usize,
    /// The shared prompt.
    pub prompt: Vec<u32>,
    /// The preferred completion.
    pub chosen: Vec<u32>,
    /// The rejected completion.
    pub rejected: Vec<u32>,
    /// The pair's margin (0 when it has none).
    pub margin: f64,
    /// Whether truncation dropped tokens of either side.
    pub truncated: bool,
}

impl TokenizedPair {
    /// One side as a sequence to score: the prompt untrained, the
    /// completion trained.
    pub fn side(&self, chosen: bool) -> TokenizedExample {
        let completion = if chosen { &self.chosen } else { &self.rejected };
        let ids = [self.prompt.as_slice(), completion].concat();
        let mut trainable = vec![false; self.prompt.len()];
        trainable.resize(ids.len(), true);
        TokenizedExample {
            line: self.line,
            full_len: ids.len(),
            ids,
            trainable,
        }
    }

    /// Completion tokens of the chosen and the rejected side.
    pub fn completion_lens(&self) -> (usize, usize) {
        (self.chosen.len(), self.rejected.len())
    }
}

impl Encoder<'_> {
    /// Encodes every pair; pairs that truncation leaves with an empty side
    /// are reported together, with their lines.
    pub fn encode_pairs(
        &self,
        file: &std::path::Path,
        pairs: &[(usize, PreferencePair)],
    ) -> Result<Vec<TokenizedPair>, DataError> {
        let mut out = Vec::with_capacity(pairs.len());
        let mut issues = Vec::new();
        for (line, pair) in pairs {
            let (t, full) = self.encode_pair(*line, pair)?;
            if t.chosen.is_empty() || t.rejected.is_empty() {
                issues.push(DataIssue {
                    file: file.to_path_buf(),
                    line: *line,
                    code: IssueCode::NoTrainableTokens,
                    message: format!(
                        "a completion is cut away entirely: the prompt has {} tokens and max_seq_len is {} \
                         (chosen {} and rejected {} tokens before truncation)",
                        full.0, self.options.max_seq_len, full.1, full.2
                    ),
                });
            } else {
                out.push(t);
            }
        }
        if issues.is_empty() {
            Ok(out)
        } else {
            Err(DataError::Invalid(issues))
        }
    }

    /// Encodes one pair, with its prompt, chosen and rejected lengths
    /// before truncation.
    pub fn encode_pair(
        &self,
        line: usize,
        pair: &PreferencePair,
    ) -> Result<(TokenizedPair, (usize, usize, usize)), DataError> {
        let (mut prompt, mut chosen, mut rejected) = match &pair.prompt {
            PairPrompt::Text(text) => {
                let prompt = self.tokenizer.encode(text, false)?;
                let side = |c: &str| -> Result<Vec<u32>, DataError> {
                    let mut ids = self.tokenizer.encode(c, false)?;
                    let mut flags = vec![true; ids.len()];
                    self.push_eos(&mut ids, &mut flags)?;
                    Ok(ids)
                };
                (prompt, side(&pair.chosen)?, side(&pair.rejected)?)
            }
            PairPrompt::Chat(turns) => self.chat_pair(turns, &pair.chosen, &pair.rejected)?,
        };
        let full = (prompt.len(), chosen.len(), rejected.len());
        if let Some(max) = self.max_prompt_len {
            prompt.truncate(max);
        }
        let room = self.options.max_seq_len.saturating_sub(prompt.len());
        prompt.truncate(self.options.max_seq_len);
        chosen.truncate(room);
        rejected.truncate(room);
        let truncated = (prompt.len(), chosen.len(), rejected.len()) != full;
        Ok((
            TokenizedPair {
                line,
                prompt,
                chosen,
                rejected,
                margin: pair.margin.unwrap_or(0.0),
                truncated,
            },
            full,
        ))
    }

    /// A prompt as the policy continues it: a conversation rendered with
    /// the chat template and its generation prompt, or text as it is.
    pub fn encode_prompt(&self, prompt: &PairPrompt) -> Result<Vec<u32>, DataError> {
        match prompt {
            PairPrompt::Text(text) => Ok(self.tokenizer.encode(text, false)?),
            PairPrompt::Chat(turns) => {
                let template = self.template.ok_or_else(|| {
                    DataError::Template(
                        "conversational prompts need a chat template, and the model has none"
                            .into(),
                    )
                })?;
                let messages: Vec<Message> = turns
                    .iter()
                    .map(|t| Message::new(t.role.clone(), t.content.clone()))
                    .collect();
                Ok(self
                    .tokenizer
                    .encode(&template.render(&messages, true)?, false)?)
            }
        }
    }

    /// One prompt and completion as a reward model scores them: the
    /// tokens of one side of a pair (prompt, then the completion through
    /// its end-of-turn token), cut as pairs are.
    pub fn encode_scored(
        &self,
        prompt: &PairPrompt,
        completion: &str,
    ) -> Result<Vec<u32>, DataError> {
        let pair = PreferencePair {
            prompt: prompt.clone(),
            chosen: completion.to_string(),
            rejected: completion.to_string(),
            margin: None,
        };
        Ok(self.encode_pair(0, &pair)?.0.side(true).ids)
    }

    fn chat_pair(
        &self,
        turns: &[crate::Turn],
        chosen: &str,
        rejected: &str,
    ) -> Result<Sides, DataError> {
        let template = self.template.ok_or_else(|| {
            DataError::Template(
                "conversational preference data needs a chat template, and the model has none"
                    .into(),
            )
        })?;
        let mut messages: Vec<Message> = turns
            .iter()
            .map(|t| Message::new(t.role.clone(), t.content.clone()))
            .collect();
        let prompt_text = template.render(&messages, true)?;
        let prompt = self.tokenizer.encode(&prompt_text, false)?;
        let mut side = |content: &str| -> Result<Vec<u32>, DataError> {
            messages.push(Message::new("assistant".to_string(), content.to_string()));
            let through = template.render(&messages, false);
            messages.pop();
            let through = through?;
            let Some(completion) = through.strip_prefix(prompt_text.as_str()) else {
                return Err(DataError::Template(
                    "the chat template does not render the prompt as the start of the conversation, \
                     so the completion cannot be located"
                        .into(),
                ));
            };
            let mut ids = self.tokenizer.encode(completion, false)?;
            let eos = self.tokenizer.eos_ids();
            if let Some(end) = ids.iter().position(|id| eos.contains(id)) {
                ids.truncate(end + 1);
            }
            Ok(ids)
        };
        let chosen = side(chosen)?;
        let rejected = side(rejected)?;
        Ok((prompt, chosen, rejected))
    }
}
