//! Tokenized examples to batches: right padding to the longest row, or
//! packed sequences with their positions and segments.

use skillet_data::{PackedSequence, TokenizedExample};

use crate::{IGNORE, TrainBatch};

fn labels(ids: &[u32], trainable: &[bool]) -> impl Iterator<Item = i64> {
    ids.iter()
        .zip(trainable)
        .map(|(&id, &t)| if t { id as i64 } else { IGNORE })
}

/// Pads `examples` on the right with `pad_id` to the longest one.
pub fn collate(examples: &[&TokenizedExample], pad_id: u32) -> TrainBatch {
    let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut b = TrainBatch {
        batch: examples.len(),
        seq,
        ids: vec![],
        key_mask: vec![],
        positions: None,
        segments: None,
        labels: vec![],
    };
    for e in examples {
        let pad = seq - e.ids.len();
        b.ids.extend(
            e.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        b.key_mask
            .extend(std::iter::repeat_n(1u8, e.ids.len()).chain(std::iter::repeat_n(0, pad)));
        b.labels
            .extend(labels(&e.ids, &e.trainable).chain(std::iter::repeat_n(IGNORE, pad)));
    }
    b
}

/// Batches packed sequences (padded on the right to the longest).
pub fn collate_packed(seqs: &[&PackedSequence], pad_id: u32) -> TrainBatch {
    let seq = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut b = TrainBatch {
        batch: seqs.len(),
        seq,
        ids: vec![],
        key_mask: vec![],
        positions: Some(vec![]),
        segments: Some(vec![]),
        labels: vec![],
    };
    for s in seqs {
        let pad = seq - s.ids.len();
        b.ids.extend(
            s.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        b.key_mask
            .extend(std::iter::repeat_n(1u8, s.ids.len()).chain(std::iter::repeat_n(0, pad)));
        b.labels
            .extend(labels(&s.ids, &s.trainable).chain(std::iter::repeat_n(IGNORE, pad)));
        let next_segment = s.segments.last().map_or(0, |x| x + 1);
        if let (Some(p), Some(g)) = (b.positions.as_mut(), b.segments.as_mut()) {
            p.extend(
                s.positions
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            g.extend(
                s.segments
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(next_segment, pad)),
            );
        }
    }
    b
}
