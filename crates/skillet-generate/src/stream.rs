//! Text out of a growing list of token ids, one token at a time: an
//! incremental detokenizer (each step decodes only a short window, so the
//! cost per token does not grow with the output) that never splits a
//! UTF-8 character, and stop strings, held back while they may still be
//! forming so nothing after a stop string is ever sent.
//!
//! The window follows the prefix/read offsets of Hugging Face's
//! text-generation-inference: decode the tokens since the last emitted
//! boundary with and without the new ones, and emit the difference once it
//! no longer ends in an incomplete character (U+FFFD).

use skillet_tokenizer::{Tokenizer, TokenizerError};

/// Incremental detokenizer plus stop-string filter for one sequence.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    stop: Vec<String>,
    /// Start of the decode window (tokens).
    prefix: usize,
    /// Tokens whose text is already in `text`.
    read: usize,
    /// All text so far (stop strings cut off).
    text: String,
    /// Bytes of `text` handed out.
    sent: usize,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stop`.
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Takes the sequence's ids after a new one was appended; returns the
    /// text that is now final (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
        if self.stopped || self.read >= ids.len() {
            return Ok(String::new());
        }
        let before = tokenizer.decode(&ids[self.prefix..self.read], true)?;
        let after = tokenizer.decode(&ids[self.prefix..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let piece = match after.strip_prefix(before.as_str()) {
                Some(p) => p,
                // A decoder that rewrites earlier text: take what is new.
                None => after.get(before.len()..).unwrap_or(""),
            };
            self.text.push_str(piece);
            self.prefix = self.read;
            self.read = ids.len();
        }
        Ok(self.release())
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text so far, stop string excluded.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The sequence ended: whatever its last tokens decode to joins the
    /// text (even an incomplete character, as a full decode would show
    /// it), stop strings are checked once more, and what was held back and
    /// is not a stop string is returned.
    pub fn finish(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
        if !self.stopped && self.read < ids.len() {
            let before = tokenizer.decode(&ids[self.prefix..self.read], true)?;
            let after = tokenizer.decode(&ids[self.prefix..], true)?;
            if let Some(rest) = after.get(before.len()..) {
                self.text.push_str(rest);
            }
            self.prefix = ids.len();
            self.read = ids.len();
        }
        let mut out = self.release();
        out.push_str(&self.flush());
        Ok(out)
    }

    /// Everything not yet sent.
    fn flush(&mut self) -> String {
        let rest = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        rest
    }

    /// Cuts at a stop string if one appeared; returns the text that can be
    /// sent without risk of being part of one.
    fn release(&mut self) -> String {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(pos) = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min()
        {
            self.text.truncate(pos.max(self.sent));
            self.stopped = true;
            return self.flush();
        }
        let safe = self.text.len() - pending_stop_prefix(&self.text, &self.stop);
        if safe <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        out
    }
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
