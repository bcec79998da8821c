//! Times a frozen weight's bf16 products as training runs them, forward
//! (`x Wᵀ`) and backward (`dy W`), held in bf16 blocks (`Bf16Blocks`)
//! and in Q4_1 blocks (`QuantBf16`, QLoRA's base): what making the
//! kernel's blocks from 4-bit codes costs on top of the products, on
//! SmolLM2-135M's shapes for 1024 tokens and Llama 3.2 1B's for 256.
//!
//!     cargo run --release -p skillet-kernels --example frozen_blocks

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{median, values};
use skillet_kernels::{Bf16Blocks, FrozenWeight, QuantKind, QuantMatrix, bf16_accelerated};

/// Q4_1 blocks of a `[rows, cols]` matrix: random codes, one scale and
/// minimum for all (the values do not change the time).
fn q4_1(rows: usize, cols: usize) -> QuantMatrix {
    let codes = values(rows * cols / 2, 3);
    let mut bytes = Vec::with_capacity(rows * cols / 32 * 20);
    for (b, chunk) in codes.chunks(16).enumerate() {
        bytes.extend_from_slice(&0x2000u16.to_le_bytes()); // d ≈ 0.0078
        bytes.extend_from_slice(&0xa400u16.to_le_bytes()); // m ≈ -0.0156
        bytes.extend(chunk.iter().map(|v| ((v + 0.5) * 255.0) as u8 ^ b as u8));
    }
    QuantMatrix::from_ggml(QuantKind::Q4_1, rows, cols, &bytes).unwrap()
}

/// Median seconds of the forward product and of the backward one.
fn times(x: &[f32], dy: &[f32], w: &FrozenWeight) -> (f64, f64) {
    let fwd = median(9, || {
        w.forward(x).unwrap();
    });
    let bwd = median(9, || {
        w.backward(dy).unwrap();
    });
    (fwd, bwd)
}

fn main() {
    println!("bf16 products native here: {}", bf16_accelerated());
    println!(
        "shape (tokens × in → out)    bf16 fwd ms  bwd ms   Q4_1 fwd ms  bwd ms   Q4_1 / bf16"
    );
    let shapes = [
        ("SmolLM2 q/o 1024×576→576", 1024, 576, 576),
        ("SmolLM2 gate 1024×576→1536", 1024, 576, 1536),
        ("SmolLM2 down 1024×1536→576", 1024, 1536, 576),
        ("1B q/o 256×2048→2048", 256, 2048, 2048),
        ("1B gate 256×2048→8192", 256, 2048, 8192),
        ("1B down 256×8192→2048", 256, 8192, 2048),
        // The tied head of the loss, one chunk of rows.
        ("1B head 256×2048→128256", 256, 2048, 128256),
    ];
    for (name, t, inp, out) in shapes {
        let (x, dy) = (values(t * inp, 1), values(t * out, 2));
        let q = q4_1(out, inp);
        let dense = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        let blocks = FrozenWeight::Bf16(Arc::new(Bf16Blocks::new(&dense).unwrap()));
        let quant = FrozenWeight::QuantBf16(Arc::new(q));
        let (bf, bb) = times(&x, &dy, &blocks);
        let (qf, qb) = times(&x, &dy, &quant);
        println!(
            "{name:28} {:11.2} {:7.2} {:12.2} {:7.2} {:9.2}×",
            bf * 1e3,
            bb * 1e3,
            qf * 1e3,
            qb * 1e3,
            (qf + qb) / (bf + bb)
        );
    }
}
