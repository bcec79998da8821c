//! Packing: several examples in one sequence, each with its own positions
//! (starting at 0) and segment id, so attention never crosses examples.

use crate::TokenizedExample;

/// Examples laid end to end in one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Training targets.
    pub trainable: Vec<bool>,
    /// RoPE position of each token within its example.
    pub positions: Vec<u32>,
    /// Which example each token belongs to (0, 1, ... within the sequence).
    pub segments: Vec<u32>,
}

/// Packs `examples` in order, starting a new sequence when the next one
/// does not fit in `max_len` tokens.
pub fn pack(examples: &[&TokenizedExample], max_len: usize) -> Vec<PackedSequence> {
    let mut out: Vec<PackedSequence> = Vec::new();
    for ex in examples {
        let fits = out
            .last()
            .is_some_and(|s| s.ids.len() + ex.ids.len() <= max_len);
        if !fits {
            out.push(PackedSequence {
                ids: vec![],
                trainable: vec![],
                positions: vec![],
                segments: vec![],
            });
        }
        let seq = out.last_mut().expect("pushed above");
        let segment = seq.segments.last().map_or(0, |s| s + 1);
        seq.ids.extend(&ex.ids);
        seq.trainable.extend(&ex.trainable);
        seq.positions.extend(0..ex.ids.len() as u32);
        seq.segments
            .extend(std::iter::repeat_n(segment, ex.ids.len()));
    }
    out
}
