//! NF4 quantization against bitsandbytes' own on CPU (fixture made by
//! `fixtures/nf4/make.py`): codes, absmax and dequantized weights equal
//! bit for bit, plain and double quantized.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use skillet_models::{Nf4, double_quantize, dynamic_code};

fn fixture() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/nf4/weights.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f32s(t: &HashMap<String, Tensor>, name: &str) -> Vec<f32> {
    t[name]
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bytes(t: &HashMap<String, Tensor>, name: &str) -> Vec<u8> {
    t[name].flatten_all().unwrap().to_vec1().unwrap()
}

/// Asserts `a` and `b` hold the same bits (`-0.0` and `0.0` differ, as
/// they do in memory), naming the first difference.
fn same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let differ = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!(
            "{what}: {differ} values differ; first at {i}: {} vs {}",
            a[i], b[i]
        );
    }
}

#[test]
fn the_dynamic_code_is_bitsandbytes() {
    let t = fixture();
    same_bits("dynamic code", dynamic_code(), &f32s(&t, "dynamic_code"));
}

#[test]
fn plain_nf4_equals_bitsandbytes_bit_for_bit() {
    let t = fixture();
    let w = f32s(&t, "weight");
    let q = Nf4::quantize(&w, 320, false).unwrap();
    assert_eq!(q.codes, bytes(&t, "plain.codes"));
    same_bits("absmax", &q.absmax, &f32s(&t, "plain.absmax"));
    let m = q.into_matrix(160, 320).unwrap();
    same_bits("weights", &m.dequantize(), &f32s(&t, "plain.dequantized"));
}

#[test]
fn double_quantized_nf4_equals_bitsandbytes_bit_for_bit() {
    let t = fixture();
    let w = f32s(&t, "weight");
    let plain = Nf4::quantize(&w, 320, false).unwrap();
    // The absmax values' double quantization, around bitsandbytes' offset
    // (torch's float mean), is bitsandbytes' exactly.
    let offset = f32s(&t, "double.offset")[0];
    let dq = double_quantize(&plain.absmax, offset);
    assert_eq!(dq.codes, bytes(&t, "double.absmax_codes"));
    same_bits("absmax2", &dq.absmax, &f32s(&t, "double.absmax2"));
    same_bits("absmax", &dq.dequantize(), &f32s(&t, "double.absmax"));
    // Skillet's own offset is the correctly rounded mean, torch's a float
    // sum whose last bit depends on its vector width and threads; on this
    // fixture they agree, and the whole path gives bitsandbytes' weights.
    let ours = plain.absmax.iter().map(|&a| a as f64).sum::<f64>() / plain.absmax.len() as f64;
    assert_eq!(ours as f32, offset);
    let q = Nf4::quantize(&w, 320, true).unwrap();
    assert_eq!(q.codes, bytes(&t, "double.codes"));
    let m = q.into_matrix(160, 320).unwrap();
    same_bits("weights", &m.dequantize(), &f32s(&t, "double.dequantized"));
}
