//! Helpers shared by the kernels' tests: seeded random tensors, tolerant
//! comparison, and gradient checks against composed ops and finite
//! differences.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor, Var};

use crate::{QuantKind, QuantMatrix};

/// Deterministic uniform values in `[-scale, scale)` (SplitMix64).
pub fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Asserts `|a - b| <= tol · (1 + |b|)` elementwise.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

/// The largest `|x|` of `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// The largest `|a - b|`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// `op(x)` and the gradient `x` gets from an upstream gradient `dy`.
pub fn output_and_input_grad(
    op: impl Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    dy: &Tensor,
) -> (Tensor, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let y = op(v.as_tensor()).unwrap();
    let g = (&y * dy).unwrap().sum_all().unwrap().backward().unwrap();
    (y, g.get(&v).unwrap().clone())
}

/// Asserts that `op` and `reference` give `x` the same output and the
/// same input gradient (for the upstream `dy`), each within `rel` of the
/// reference's largest magnitude.
pub fn assert_same_product(
    op: impl Fn(&Tensor) -> Result<Tensor>,
    reference: impl Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    dy: &Tensor,
    rel: f32,
    what: &str,
) {
    let (y, gx) = output_and_input_grad(op, x, dy);
    let (want_y, want_gx) = output_and_input_grad(reference, x, dy);
    for (name, got, want) in [("output", &y, &want_y), ("input gradient", &gx, &want_gx)] {
        let (err, scale) = (max_abs_diff(got, want), max_abs(want));
        assert!(err <= rel * scale, "{what}: {name} off by {err} of {scale}");
    }
}

/// `Σ f(inputs) ∘ r` for a fixed random `r`: a scalar whose gradient
/// exercises every output element with a different weight.
pub fn weighted_sum(out: &Tensor, seed: u64) -> Result<Tensor> {
    let r = random(out.dims(), seed, 1.0);
    (out * r)?.sum_all()
}

/// Gradients of `weighted_sum(f(inputs))` with respect to each input.
pub fn grads(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = weighted_sum(&f(&ts).unwrap(), 99).unwrap();
    let g = loss.backward().unwrap();
    vars.iter()
        .map(|v| {
            g.get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
        })
        .collect()
}

/// Checks `grads` of the fused `f` against the composed `reference`
/// (values and gradients), then a few coordinates of each gradient
/// against central differences of `f` itself.
pub fn check_op(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    assert_close(
        &f(inputs).unwrap(),
        &reference(inputs).unwrap(),
        tol,
        "forward",
    );
    let gf = grads(inputs, f);
    let gr = grads(inputs, reference);
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        assert_close(a, b, tol, &format!("gradient of input {i}"));
    }
    let eps = 1e-2f32;
    for (i, input) in inputs.iter().enumerate() {
        let base = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = gf[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = base.len();
        for k in [0, n / 3, n / 2, n - 1] {
            let eval = |delta: f32| -> f64 {
                let mut v = base.clone();
                v[k] += delta;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_vec(v, input.dims(), &Device::Cpu).unwrap();
                let out = f(&args).unwrap();
                weighted_sum(&out, 99).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let err = (fd - g[k] as f64).abs();
            assert!(
                err <= 2e-2 * (1.0 + fd.abs()),
                "input {i} coordinate {k}: finite difference {fd} vs gradient {}",
                g[k]
            );
        }
    }
}

/// Asserts that `got` (one input row's outputs) is `x · Wᵀ` of the dense
/// `[outputs, cols]` weight within 1e-4 relative, summed in f64.
pub fn assert_dense_product(what: &str, got: &[f32], dense: &[f32], x: &[f32]) {
    let cols = x.len();
    for (o, g) in got.iter().enumerate() {
        let w = &dense[o * cols..(o + 1) * cols];
        let want: f64 = w.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64).sum();
        let tol = 1e-4 * (1.0 + want.abs());
        assert!((*g as f64 - want).abs() <= tol, "{what}: {g} vs {want}");
    }
}

/// A `[rows, cols]` matrix of each block kind (Q4_1, Q8_0, NF4 where the
/// matrix is a whole number of its blocks of 64, and Q8_16 read from Q6_K
/// blocks where rows are whole numbers of 256 weights), from deterministic
/// bytes.
pub fn quant_matrices(rows: usize, cols: usize) -> Vec<Arc<QuantMatrix>> {
    let blocks = rows * cols / 32;
    let byte = |i: usize| ((i * 2_654_435_761) >> 13) as u8;
    let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let mut q4 = Vec::new();
    let mut q8 = Vec::new();
    for b in 0..blocks {
        let d = 0.01 + (b % 7) as f32 * 0.003;
        q4.extend(half(d));
        q4.extend(half(-0.05 * (b % 3) as f32));
        q4.extend((0..16).map(|i| byte(b * 16 + i)));
        q8.extend(half(d / 8.0));
        q8.extend((0..32).map(|i| byte(b * 32 + i + 7)));
    }
    let mut out = vec![
        Arc::new(QuantMatrix::from_ggml(QuantKind::Q4_1, rows, cols, &q4).unwrap()),
        Arc::new(QuantMatrix::from_ggml(QuantKind::Q8_0, rows, cols, &q8).unwrap()),
    ];
    if (rows * cols).is_multiple_of(64) {
        let codes: Vec<u8> = (0..rows * cols).map(|i| byte(i + 3) & 15).collect();
        let absmax = (0..rows * cols / 64)
            .map(|b| 0.02 + (b % 5) as f32 * 0.01)
            .collect();
        out.push(Arc::new(
            QuantMatrix::from_nf4(rows, cols, &codes, absmax).unwrap(),
        ));
    }
    if cols.is_multiple_of(256) {
        // Codes and scales any bytes; `d` last (ggml's `block_q6_K`).
        let mut q6 = Vec::new();
        for b in 0..rows * cols / 256 {
            q6.extend((0..208).map(|i| byte(b * 208 + i + 11)));
            q6.extend(half(0.0004 + (b % 5) as f32 * 0.0001));
        }
        out.push(Arc::new(
            QuantMatrix::from_ggml_blocks(crate::GgmlBlocks::Q6K, rows, cols, &q6).unwrap(),
        ));
    }
    out
}
