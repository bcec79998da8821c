//! Additive attention bias: causal order, key padding and sliding window in
//! one `[batch, 1, 1, t, s]` tensor (0 where allowed, a large negative
//! number where not; finite so a fully masked padding row gives no NaN).

use candle_core::{Device, Tensor};

use crate::Result;

/// Value added to scores of masked keys.
pub const MASKED: f32 = -1e30;

/// Bias for `t` new queries at sequence indices `offset..offset + t` over
/// `s = offset + t` keys whose padding mask is `key_mask` (`[batch, s]`).
/// With `segments` (`[batch, t]`, no cache), a query sees only keys of its
/// own segment: packed examples stay independent.
pub fn attention_bias(
    batch: usize,
    t: usize,
    offset: usize,
    key_mask: &[u8],
    segments: Option<&[u32]>,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let s = offset + t;
    debug_assert_eq!(key_mask.len(), batch * s);
    let mut bias = vec![MASKED; batch * t * s];
    for b in 0..batch {
        let keys = &key_mask[b * s..(b + 1) * s];
        for i in 0..t {
            let q = offset + i;
            let lo = sliding_window.map_or(0, |w| (q + 1).saturating_sub(w));
            let row = &mut bias[(b * t + i) * s..(b * t + i + 1) * s];
            let seg = segments.map(|s| &s[b * t..(b + 1) * t]);
            for j in lo..=q {
                let same_segment = seg.is_none_or(|s| s[j] == s[i]);
                if keys[j] != 0 && same_segment {
                    row[j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (batch, 1, 1, t, s), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_padding_and_window() {
        let m = attention_bias(1, 3, 0, &[1, 1, 1], None, None, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            v,
            vec![0.0, MASKED, MASKED, 0.0, 0.0, MASKED, 0.0, 0.0, 0.0]
        );
        // Left padding: key 0 is padding.
        let m = attention_bias(1, 2, 1, &[0, 1, 1], None, None, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![MASKED, 0.0, MASKED, MASKED, 0.0, 0.0]);
        // Window of 2: the third query no longer sees key 0.
        let m = attention_bias(1, 3, 0, &[1, 1, 1], None, Some(2), &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&v[6..], &[MASKED, 0.0, 0.0]);
        // Two packed segments: the third token starts a new one.
        let m = attention_bias(1, 3, 0, &[1, 1, 1], Some(&[0, 0, 1]), None, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&v[6..], &[MASKED, MASKED, 0.0]);
    }
}
