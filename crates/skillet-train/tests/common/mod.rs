//! Helpers the fixture tests share: where the fixtures are, the relative
//! difference they are held to, and token ids from the fixtures' JSON.
#![allow(dead_code)] // each test uses its own part

use std::path::{Path, PathBuf};

use candle_core::Tensor;

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// `‖a − b‖ / ‖b‖`, or `‖a‖` where `b` is zero.
pub fn rel_diff_values(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    if den == 0.0 { num } else { num / den }
}

/// [`rel_diff_values`] of two tensors' elements.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    rel_diff_values(&flat(a), &flat(b))
}

/// A tensor's elements as f32.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Token ids from a JSON list.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `got` within 1e-4 relative of TRL's `want` (relative to at least 1e-3).
pub fn close(got: f64, want: f64, what: &str) {
    let tol = 1e-4 * want.abs().max(1e-3);
    assert!((got - want).abs() <= tol, "{what}: {got} vs TRL {want}");
}
