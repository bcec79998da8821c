//! Tokenized examples to batches: right padding to the longest row, or
//! packed sequences with their positions and segments.

use skillet_data::{PackedSequence, TokenizedExample};

use crate::{IGNORE, TrainBatch};

fn labels(ids: &[u32], trainable: &[bool]) -> impl Iterator<Item = i64> {
    ids.iter()
        .zip(trainable)
        .map(|(&id, &t)| if t { id as i64 } else { IGNORE })
}

/// Rows of (ids, trainable flags), padded on the right with `pad_id` to
/// the longest; padding is masked and ignored by the loss.
fn padded(rows: &[(&[u32], &[bool])], pad_id: u32) -> TrainBatch {
    let seq = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let mut b = TrainBatch {
        batch: rows.len(),
        seq,
        ids: vec![],
        key_mask: vec![],
        positions: None,
        segments: None,
        labels: vec![],
    };
    for &(ids, trainable) in rows {
        let pad = seq - ids.len();
        b.ids
            .extend(ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        b.key_mask
            .extend(std::iter::repeat_n(1u8, ids.len()).chain(std::iter::repeat_n(0, pad)));
        b.labels
            .extend(labels(ids, trainable).chain(std::iter::repeat_n(IGNORE, pad)));
    }
    b
}

/// Pads `examples` on the right with `pad_id` to the longest one.
pub fn collate(examples: &[&TokenizedExample], pad_id: u32) -> TrainBatch {
    let rows: Vec<_> = examples
        .iter()
        .map(|e| (e.ids.as_slice(), e.trainable.as_slice()))
        .collect();
    padded(&rows, pad_id)
}

/// Batches packed sequences (padded on the right to the longest), with
/// each token's position and segment.
pub fn collate_packed(seqs: &[&PackedSequence], pad_id: u32) -> TrainBatch {
    let rows: Vec<_> = seqs
        .iter()
        .map(|s| (s.ids.as_slice(), s.trainable.as_slice()))
        .collect();
    let mut b = padded(&rows, pad_id);
    let (mut positions, mut segments) = (vec![], vec![]);
    for s in seqs {
        let pad = b.seq - s.ids.len();
        // Padding gets a segment of its own, so no real token attends to it.
        let next_segment = s.segments.last().map_or(0, |x| x + 1);
        positions.extend(
            s.positions
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
        segments.extend(
            s.segments
                .iter()
                .copied()
                .chain(std::iter::repeat_n(next_segment, pad)),
        );
    }
    b.positions = Some(positions);
    b.segments = Some(segments);
    b
}
