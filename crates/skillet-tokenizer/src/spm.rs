//! SentencePiece BPE vocabularies in GGUF (`tokenizer.ggml.model = llama`,
//! e.g. Gemma): `▁` for spaces, byte fallback (`<0x0A>`), and no merge
//! list — the merges follow from the vocabulary. A token made of two
//! tokens becomes the merge of its two halves, ranked by the merged
//! token's place in the file (earlier first; Gemma's file order is its
//! merge order, its scores are not), the splits of one token longest
//! left half first. This is how transformers rebuilds a GGUF Gemma
//! tokenizer, so ids agree with it.

use std::collections::HashMap;

use serde_json::{Value, json};

/// SentencePiece's space.
const SPACE: char = '\u{2581}';

/// Gemma's GGUF stores its tokens of several spaces as real spaces; the
/// model looks them up as `▁` runs.
pub(crate) fn respell(token: &str) -> String {
    if token.contains(' ') && token.trim().is_empty() {
        SPACE.to_string().repeat(token.chars().count())
    } else {
        token.to_string()
    }
}

/// The merges implied by `tokens` (in file order), best first.
pub(crate) fn merges<'a>(tokens: &[&'a str]) -> Vec<(&'a str, &'a str)> {
    // Where a token appears twice, its later id wins, as in a map.
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut out = Vec::new();
    for (i, &piece) in tokens.iter().enumerate() {
        if index.get(piece) != Some(&i) {
            continue;
        }
        // Split points from the right: the longest left half first.
        for (at, _) in piece
            .char_indices()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            let (left, right) = piece.split_at(at);
            if index.contains_key(left) && index.contains_key(right) {
                out.push((left, right));
            }
        }
    }
    out
}

/// The normalizer (spaces become `▁`, one prepended when the file asks)
/// and the decoder (back to spaces, bytes fused into text).
pub(crate) fn normalizer_and_decoder(add_space_prefix: bool) -> (Value, Value) {
    let replace =
        json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE.to_string()});
    let normalizer = match add_space_prefix {
        true => json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE.to_string()}, replace]}),
        false => replace,
    };
    let decoder = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPACE.to_string()}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]});
    (normalizer, decoder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_file_order_and_prefer_long_left_halves() {
        let tokens = ["a", "b", "c", "abc", "ab", "bc", "  "];
        let m = merges(&tokens);
        // "abc" (id 3) first, its split after "ab" before the one after "a".
        assert_eq!(m, [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]);
        assert_eq!(respell("  "), "▁▁");
        assert_eq!(respell(" \n"), "▁▁");
        assert_eq!(respell("a b"), "a b");
    }
}
