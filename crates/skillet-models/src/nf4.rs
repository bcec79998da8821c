//! Quantizing a dense weight to NF4 the way bitsandbytes does on CPU
//! (`bitsandbytes.functional.quantize_4bit(w, blocksize=64,
//! quant_type="nf4", compress_statistics=…)`, as transformers'
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`
//! calls it), so a QLoRA run over a Hugging Face base sees the weights a
//! PEFT + bitsandbytes run sees.
//!
//! - Each block of 64 consecutive weights keeps its absmax `a`; a weight
//!   `w` becomes the level nearest to `clamp(w · (1/a), -1, 1)`, ties to
//!   the lower level (a search over the midpoints of neighbouring levels).
//! - Double quantization (`bnb_4bit_use_double_quant`) stores the absmax
//!   values themselves in 8 bits: their mean `c` is subtracted, and each
//!   block of 256 of them is scaled by its own absmax and rounded to
//!   bitsandbytes' signed 8-bit dynamic code through its 65536-entry
//!   lookup table. The weights then dequantize with `code[q]·a₂ + c`.
//!
//! Skillet keeps the resulting absmax in f32 (4.5 bits per weight in all;
//! bitsandbytes' packed double quantization holds about 4.13), so double
//! quantization changes the numbers exactly as it does for bitsandbytes
//! but not Skillet's memory. The one value that can differ is `c`: Skillet
//! takes the correctly rounded mean, bitsandbytes torch's float sum, whose
//! last bit depends on torch's vector width and thread count.

use skillet_kernels::{NF4_BLOCK, NF4_LEVELS, QuantMatrix};

use crate::{ModelError, Result};

/// Absmax values per block of the double quantization.
pub const DOUBLE_QUANT_BLOCK: usize = 256;

/// A weight's NF4 codes (one per weight, row-major) and the absmax of each
/// 64 weights, as the product will scale them (after any double
/// quantization's round trip).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    /// One code `0..16` per weight.
    pub codes: Vec<u8>,
    /// One per 64 weights.
    pub absmax: Vec<f32>,
}

impl Nf4 {
    /// Quantizes `values`, a row-major `[rows, cols]` weight, in blocks of
    /// 64 consecutive values (a block may span two rows, as in
    /// bitsandbytes); `cols` must be a multiple of 32 and the matrix a
    /// whole number of blocks. With `double_quant`, the absmax values go
    /// through bitsandbytes' 8-bit double quantization.
    pub fn quantize(values: &[f32], cols: usize, double_quant: bool) -> Result<Self> {
        if cols == 0
            || !cols.is_multiple_of(32)
            || !values.len().is_multiple_of(cols)
            || !values.len().is_multiple_of(NF4_BLOCK)
        {
            return Err(ModelError::Input(format!(
                "NF4 needs rows of a multiple of 32 values and a multiple of {NF4_BLOCK} in all; \
                 got {} values in rows of {cols}",
                values.len()
            )));
        }
        let mut nf4 = quantize_4bit(values);
        if double_quant {
            let offset = mean(&nf4.absmax);
            nf4.absmax = double_quantize(&nf4.absmax, offset).dequantize();
        }
        Ok(nf4)
    }

    /// The `[rows, cols]` matrix for Skillet's kernels.
    pub fn into_matrix(self, rows: usize, cols: usize) -> Result<QuantMatrix> {
        Ok(QuantMatrix::from_nf4(rows, cols, &self.codes, self.absmax)?)
    }
}

/// bitsandbytes' 4-bit step: absmax per 64, then the nearest level.
fn quantize_4bit(values: &[f32]) -> Nf4 {
    let mid: Vec<f32> = NF4_LEVELS.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect();
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len() / NF4_BLOCK);
    for block in values.chunks(NF4_BLOCK) {
        let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        // A zero block divides by the smallest normal-ish value instead,
        // giving code 7 (0.0) throughout, as bitsandbytes does.
        let inv = 1.0 / a.max(1e-38);
        codes.extend(block.iter().map(|&v| {
            let x = (v * inv).clamp(-1.0, 1.0);
            mid.iter().take_while(|&&m| m < x).count() as u8
        }));
    }
    Nf4 { codes, absmax }
}

/// The mean of `v`, correctly rounded to f32.
fn mean(v: &[f32]) -> f32 {
    (v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64) as f32
}

/// The absmax values stored in 8 bits: `code[q]·a₂ + offset` gives them back.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per absmax value.
    pub codes: Vec<u8>,
    /// The absmax of each 256 centred values.
    pub absmax: Vec<f32>,
    /// The mean subtracted first.
    pub offset: f32,
}

impl DoubleQuant {
    /// The absmax values as bitsandbytes dequantizes them (two roundings:
    /// the product, then the offset's sum).
    pub fn dequantize(&self) -> Vec<f32> {
        let code = dynamic_code();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| code[q as usize] * self.absmax[i / DOUBLE_QUANT_BLOCK] + self.offset)
            .collect()
    }
}

/// Double quantization of `absmax` around `offset` (bitsandbytes passes
/// the values' mean).
pub fn double_quantize(absmax: &[f32], offset: f32) -> DoubleQuant {
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let lut = lookup_table();
    let mut codes = Vec::with_capacity(centred.len());
    let mut scales = Vec::with_capacity(centred.len().div_ceil(DOUBLE_QUANT_BLOCK));
    for block in centred.chunks(DOUBLE_QUANT_BLOCK) {
        let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(a);
        if a == 0.0 {
            codes.extend(std::iter::repeat_n(0, block.len()));
            continue;
        }
        let inv = 1.0 / a;
        codes.extend(block.iter().map(|&v| lut[lookup_index(v * inv)]));
    }
    DoubleQuant {
        codes,
        absmax: scales,
        offset,
    }
}

/// Entries of the 8-bit quantizer's lookup table over [-1, 1].
const LUT_SIZE: usize = 65536;

/// A value in [-1, 1] as its lookup-table index (rounded half up, the
/// last step one fused multiply-add as bitsandbytes' build computes it).
fn lookup_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5).mul_add((LUT_SIZE - 1) as f32, 0.5) as usize
}

/// For each of 65536 evenly spaced points of [-1, 1], the index of the
/// nearest dynamic-code value (by the midpoints between neighbours, ties
/// to the lower): bitsandbytes' CPU 8-bit quantizer rounds through it.
fn lookup_table() -> &'static [u8; LUT_SIZE] {
    static LUT: std::sync::OnceLock<Box<[u8; LUT_SIZE]>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_code();
        let mid: Vec<f32> = code.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut at = 0;
        for (i, slot) in lut.iter_mut().enumerate() {
            let v = -1.0 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
            while at < mid.len() && mid[at] < v {
                at += 1;
            }
            *slot = at as u8;
        }
        lut
    })
}

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map()`: for
/// exponents 10⁻⁶ … 10⁰, 2ⁱ fractions between 0.1 and 1, both signs, plus
/// 0 and 1), sorted. The fractions are the midpoints of torch's f32
/// `linspace(0.1, 1, 2ⁱ + 1)`, whose points are `start + step·i` in the
/// first half and `end − step·(n − 1 − i)` in the second, each one fused
/// multiply-add.
pub fn dynamic_code() -> &'static [f32; 256] {
    static CODE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        let mut data = Vec::with_capacity(256);
        for i in 0..7usize {
            let n = (1usize << i) + 1;
            let (start, end) = (0.1f32, 1.0f32);
            let step = (end - start) / (n - 1) as f32;
            let points: Vec<f32> = (0..n)
                .map(|k| {
                    if k < n / 2 {
                        step.mul_add(k as f32, start)
                    } else {
                        (-step).mul_add((n - 1 - k) as f32, end)
                    }
                })
                .collect();
            // Python's `10 ** (i - 6)`, cast to f32 as torch casts a scalar.
            let scale = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i] as f32;
            for p in points.windows(2) {
                let mean = (p[0] + p[1]) / 2.0;
                data.push(scale * mean);
                data.push(-scale * mean);
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(f32::total_cmp);
        data.try_into().expect("256 values")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_code_is_sorted_signed_and_spans_minus_one_to_one() {
        let code = dynamic_code();
        assert!(code.windows(2).all(|p| p[0] <= p[1]));
        assert_eq!(code[255], 1.0);
        assert!(code.contains(&0.0));
        // 127 negative values, 127 positive fractions plus 0 and 1.
        assert_eq!(code.iter().filter(|v| **v < 0.0).count(), 127);
        assert!((code[0] + 0.993).abs() < 1e-3, "{}", code[0]);
    }

    #[test]
    fn levels_are_picked_by_nearest_with_ties_down() {
        // One block: its absmax is 1, so the values are their own scaled
        // values; a value on a midpoint takes the lower level.
        let mid = (NF4_LEVELS[8] + NF4_LEVELS[9]) / 2.0;
        let mut w = vec![0f32; 64];
        w[0] = 1.0;
        w[1] = -1.0;
        w[2] = mid;
        w[3] = NF4_LEVELS[12] + 1e-4;
        w[4] = 0.01;
        let q = Nf4::quantize(&w, 64, false).unwrap();
        assert_eq!(q.absmax, vec![1.0]);
        assert_eq!(&q.codes[..5], &[15, 0, 8, 12, 7]);
        // A zero block is all zeros.
        let z = Nf4::quantize(&[0.0; 64], 64, true).unwrap();
        assert!(z.codes.iter().all(|&c| c == 7));
        assert!(Nf4::quantize(&[0.0; 96], 96, false).is_err());
        assert!(Nf4::quantize(&[0.0; 96], 48, false).is_err());
        assert!(Nf4::quantize(&[0.0; 192], 96, false).is_ok());
    }

    #[test]
    fn double_quantization_gives_the_absmax_back_closely() {
        let absmax: Vec<f32> = (0..700).map(|i| 0.01 + (i % 37) as f32 * 1e-3).collect();
        let dq = double_quantize(&absmax, mean(&absmax));
        assert_eq!(dq.absmax.len(), 3);
        for (a, b) in absmax.iter().zip(dq.dequantize()) {
            // The dynamic code's steps near the block's absmax are ~1%.
            assert!((a - b).abs() < 2e-2 * 0.036, "{a} vs {b}");
        }
    }
}
