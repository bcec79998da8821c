//! Inputs rounded as llama.cpp's CPU backend rounds them before a product
//! with a weight of a given storage type (the type's `vec_dot_type`):
//! blocks of 32 to 8-bit integers times a scale held in f16 (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0 weights), or blocks of 256 to 8-bit integers times an
//! f32 scale (the K-quants). The rounded values, multiplied by the
//! dequantized weight in f32, give llama.cpp's products up to the order of
//! the float sums.

use crate::quantized::round_block;

/// Values per Q8_0 block.
const Q8_0_BLOCK: usize = 32;
/// Values per Q8_K block.
const Q8_K_BLOCK: usize = 256;

/// How inputs are rounded before a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRounding {
    /// Q8_0 / Q8_1: per 32 values, `d = max|x| / 127` stored in f16 and
    /// `q = round(x · 127/max|x|)` (ties to even).
    Q8_0,
    /// Q8_K: per 256 values, `s = −127 / x_max` (`x_max` the value of
    /// largest magnitude, sign kept), `q = min(127, round(s·x))`, `d = 1/s`.
    Q8K,
}

/// `x` (rows of `cols`) rounded as `how` says. `cols` must be a whole
/// number of blocks.
pub fn round_inputs(x: &[f32], cols: usize, how: InputRounding) -> Vec<f32> {
    let mut out = x.to_vec();
    match how {
        InputRounding::Q8_0 => {
            debug_assert_eq!(cols % Q8_0_BLOCK, 0);
            out.chunks_exact_mut(Q8_0_BLOCK).for_each(round_q8_0);
        }
        InputRounding::Q8K => {
            debug_assert_eq!(cols % Q8_K_BLOCK, 0);
            out.chunks_exact_mut(Q8_K_BLOCK).for_each(round_q8_k);
        }
    }
    out
}

/// The rounding of Skillet's own int8 products ([`round_block`]), its
/// values multiplied back by the f16 scale.
fn round_q8_0(block: &mut [f32]) {
    let (d, _, q) = round_block(block[..].try_into().expect("a block of 32"));
    for (v, q) in block.iter_mut().zip(q) {
        *v = q as f32 * d;
    }
}

fn round_q8_k(block: &mut [f32]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in block.iter() {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        block.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let iscale = -127.0 / max;
    let d = 1.0 / iscale;
    for v in block {
        *v = (iscale * *v).round_ties_even().min(127.0) * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn rounding_follows_each_scheme() {
        // Q8_0: the largest value lands on 127 steps of an f16 scale.
        let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 10.3) * 0.071).collect();
        let r = round_inputs(&x, 32, InputRounding::Q8_0);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0).to_f32();
        for (a, b) in x.iter().zip(&r) {
            let q = b / d;
            assert_eq!(q, q.round(), "{b} is a whole multiple of the scale");
            assert!((a - b).abs() <= d * 0.51 + amax * 2e-3);
        }
        assert_eq!(r[31] / d, 127.0);
        // Q8_K: the value of largest magnitude (negative here) maps to
        // exactly -127 steps of an f32 scale; a zero block stays zero.
        x = (0..512)
            .map(|i| {
                if i < 256 {
                    (i as f32 - 200.0) * 0.01
                } else {
                    0.0
                }
            })
            .collect();
        let r = round_inputs(&x, 512, InputRounding::Q8K);
        let d = 1.0 / (-127.0 / x[0]);
        assert_eq!(r[0], -127.0 * d);
        for (a, b) in x[..256].iter().zip(&r) {
            assert!((a - b).abs() <= d.abs() * 0.51);
        }
        assert!(r[256..].iter().all(|&v| v == 0.0));
    }
}
