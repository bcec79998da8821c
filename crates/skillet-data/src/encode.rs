//! Examples to token ids and a per-token "trained" mask.
//!
//! Conversations are rendered with the model's chat template (the same one
//! generation uses). The span of each trained assistant message is found by
//! rendering the conversation up to it (with the generation prompt) and
//! through it: the difference is the message as the template writes it.
//! Tokens starting inside that span are trained, up to and including the
//! first end-of-turn token, so the model learns to stop, even when the pad
//! token equals EOS. No token strings are searched for.

use skillet_tokenizer::{ChatTemplate, Message, Tokenizer};

use crate::{DataError, DataIssue, Example, IssueCode};

/// How examples become token sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Longest sequence; longer examples keep their first tokens.
    pub max_seq_len: usize,
    /// Train on every token (prompts too), not only on completions.
    pub train_on_prompt: bool,
    /// Append EOS to `text` and `prompt/completion` examples.
    pub add_eos: bool,
}

/// One example as tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Line of the source file.
    pub line: usize,
    /// Token ids (at most `max_seq_len`).
    pub ids: Vec<u32>,
    /// Whether each token is a training target.
    pub trainable: Vec<bool>,
    /// Length before truncation.
    pub full_len: usize,
}

impl TokenizedExample {
    /// Whether truncation dropped tokens.
    pub fn truncated(&self) -> bool {
        self.full_len > self.ids.len()
    }

    /// Targets the loss sees: trained tokens after the first position
    /// (position 0 has nothing before it to predict it from).
    pub fn target_count(&self) -> usize {
        self.trainable.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Encodes examples for one model.
pub struct Encoder<'a> {
    pub(crate) tokenizer: &'a Tokenizer,
    pub(crate) template: Option<&'a ChatTemplate>,
    pub(crate) options: EncodeOptions,
    /// Longest prompt of a preference pair (`None`: only `max_seq_len`).
    pub(crate) max_prompt_len: Option<usize>,
}

impl<'a> Encoder<'a> {
    /// An encoder with the model's tokenizer and chat template.
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        options: EncodeOptions,
    ) -> Self {
        Self {
            tokenizer,
            template,
            options,
            max_prompt_len: None,
        }
    }

    /// Cuts preference prompts to their first `max` tokens (TRL's
    /// `max_prompt_length` with `truncation_mode = "keep_start"`).
    pub fn with_max_prompt_len(mut self, max: Option<usize>) -> Self {
        self.max_prompt_len = max;
        self
    }

    /// Encodes every example; examples left with nothing to train on are
    /// reported together, with their lines.
    pub fn encode_all(
        &self,
        file: &std::path::Path,
        examples: &[(usize, Example)],
    ) -> Result<Vec<TokenizedExample>, DataError> {
        let mut out = Vec::with_capacity(examples.len());
        let mut issues = Vec::new();
        for (line, ex) in examples {
            let t = self.encode(*line, ex)?;
            if t.target_count() == 0 {
                let why = if t.truncated() {
                    format!(
                        "no trainable tokens left after truncation to {} tokens (the example has {})",
                        self.options.max_seq_len, t.full_len
                    )
                } else {
                    "the example has no trainable tokens (every assistant message has weight 0?)"
                        .to_string()
                };
                issues.push(DataIssue {
                    file: file.to_path_buf(),
                    line: *line,
                    code: IssueCode::NoTrainableTokens,
                    message: why,
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

    /// Encodes one example.
    pub fn encode(&self, line: usize, example: &Example) -> Result<TokenizedExample, DataError> {
        let (mut ids, mut trainable) = match example {
            Example::Chat(turns) => self.chat(turns)?,
            Example::Completion { prompt, completion } => {
                let p = self.tokenizer.encode(prompt, false)?;
                let c = self.tokenizer.encode(completion, false)?;
                let mut trainable = vec![self.options.train_on_prompt; p.len()];
                trainable.extend(std::iter::repeat_n(true, c.len()));
                let mut ids = [p, c].concat();
                self.push_eos(&mut ids, &mut trainable)?;
                (ids, trainable)
            }
            Example::Text(text) => {
                let mut ids = self.tokenizer.encode(text, false)?;
                let mut trainable = vec![true; ids.len()];
                self.push_eos(&mut ids, &mut trainable)?;
                (ids, trainable)
            }
        };
        let full_len = ids.len();
        ids.truncate(self.options.max_seq_len);
        trainable.truncate(self.options.max_seq_len);
        Ok(TokenizedExample {
            line,
            ids,
            trainable,
            full_len,
        })
    }

    pub(crate) fn push_eos(
        &self,
        ids: &mut Vec<u32>,
        trainable: &mut Vec<bool>,
    ) -> Result<(), DataError> {
        if !self.options.add_eos {
            return Ok(());
        }
        let eos = self.tokenizer.specials().eos.as_ref().ok_or_else(|| {
            DataError::Template("the tokenizer has no EOS token; set add_eos = false".into())
        })?;
        ids.push(eos.id);
        trainable.push(true);
        Ok(())
    }

    fn chat(&self, turns: &[crate::Turn]) -> Result<(Vec<u32>, Vec<bool>), DataError> {
        let template = self.template.ok_or_else(|| {
            DataError::Template(
                "conversation data needs a chat template, and the model has none".into(),
            )
        })?;
        let messages: Vec<Message> = turns
            .iter()
            .map(|t| Message::new(t.role.clone(), t.content.clone()))
            .collect();
        let full = template.render(&messages, false)?;
        let (ids, offsets) = self.tokenizer.encode_with_offsets(&full)?;
        if self.options.train_on_prompt {
            return Ok((ids.clone(), vec![true; ids.len()]));
        }
        let mut trainable = vec![false; ids.len()];
        let eos_ids = self.tokenizer.eos_ids();
        for (i, turn) in turns.iter().enumerate() {
            if turn.role != "assistant" || !turn.train {
                continue;
            }
            let before = template.render(&messages[..i], true)?;
            let through = template.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(DataError::Template(format!(
                    "the chat template does not render conversations incrementally (at message {i}), \
                     so assistant spans cannot be located; use train_on_prompt = true or another template"
                )));
            }
            let (start, end) = (before.len(), through.len());
            for (k, &(s, _)) in offsets.iter().enumerate() {
                if s >= start && s < end {
                    trainable[k] = true;
                    if eos_ids.contains(&ids[k]) {
                        break;
                    }
                }
            }
        }
        Ok((ids, trainable))
    }
}

/// The decoded sequence with trained runs wrapped in `[[` … `]]`: what the
/// loss covers, for people to check.
pub fn mark_trained(
    tokenizer: &Tokenizer,
    ids: &[u32],
    trainable: &[bool],
) -> Result<String, DataError> {
    let mut out = String::new();
    let mut k = 0;
    while k < ids.len() {
        let flag = trainable[k];
        let mut j = k;
        while j < ids.len() && trainable[j] == flag {
            j += 1;
        }
        let text = tokenizer.decode(&ids[k..j], false)?;
        if flag {
            out.push_str("[[");
            out.push_str(&text);
            out.push_str("]]");
        } else {
            out.push_str(&text);
        }
        k = j;
    }
    Ok(out)
}
