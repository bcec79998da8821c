//! Times one decode step's quantized products for a single sequence, on
//! SmolLM2-135M's shapes as its Q4_1 GGUF stores them (30 layers of seven
//! Q4_1 matrices, a Q8_0 output head: 96 MB of GGML blocks, held as 111.5
//! MB with f32 scales), with f32 inputs and with inputs rounded to int8.
//! Prints the milliseconds per token and the bytes held read per second;
//! then single Q4_1 products (576 columns) of 16 to 49152 output rows, the
//! best of 300 calls each, to tell a kernel's own rate from the time
//! between calls (run with `RAYON_NUM_THREADS=1` for one core's rate).
//! Last, the rate of reading a 512 MiB array on every thread.
//!
//!     cargo run --release -p skillet-kernels --example quantized_decode

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{median, values};
use half::f16;
use skillet_kernels::{QuantKind, QuantMatrix};

const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const LAYERS: usize = 30;
const VOCAB: usize = 49152;

/// GGML blocks of a `[rows, cols]` matrix with random codes and scales
/// of a trained model's size.
fn blocks(kind: QuantKind, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
    let n = rows * cols / 32;
    let v = values(n * 34, seed);
    let mut bytes = Vec::new();
    for b in 0..n {
        let r = &v[b * 34..(b + 1) * 34];
        bytes.extend_from_slice(&f16::from_f32(0.01 + 0.01 * r[0]).to_le_bytes());
        match kind {
            QuantKind::Q4_1 => {
                bytes.extend_from_slice(&f16::from_f32(-0.08 * r[1].abs()).to_le_bytes());
                bytes.extend(r[2..18].iter().map(|x| ((x + 0.5) * 255.0) as u8));
            }
            _ => bytes.extend(r[2..34].iter().map(|x| (x * 250.0) as i8 as u8)),
        }
    }
    QuantMatrix::from_ggml(kind, rows, cols, &bytes).expect("blocks")
}

fn main() {
    per_token();
    single_products();
    read_rate();
}

/// The machine's rate for reading a 512 MiB array on every thread (sixteen
/// lanes of sums per thread), the best of 5: what decoding could reach.
fn read_rate() {
    use rayon::prelude::*;
    let a = vec![1f32; 128 << 20];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let total: f32 = a
            .par_chunks(1 << 20)
            .map(|c| {
                let lanes = c.chunks_exact(16).fold([0f32; 16], |mut acc, v| {
                    for i in 0..16 {
                        acc[i] += v[i];
                    }
                    acc
                });
                lanes.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "\nreading 512 MiB on {} threads: {:.1} GB/s",
        rayon::current_num_threads(),
        (a.len() * 4) as f64 / best / 1e9
    );
}

/// The products of one token, whole model, medians of 9.
fn per_token() {
    let mut layers = Vec::new();
    for l in 0..LAYERS as u64 {
        let shapes = [
            (HIDDEN, HIDDEN),
            (KV, HIDDEN),
            (KV, HIDDEN),
            (HIDDEN, HIDDEN),
            (FFN, HIDDEN),
            (FFN, HIDDEN),
            (HIDDEN, FFN),
        ];
        let ms: Vec<Arc<QuantMatrix>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| Arc::new(blocks(QuantKind::Q4_1, r, c, 10 * l + i as u64)))
            .collect();
        layers.push(ms);
    }
    let head = Arc::new(blocks(QuantKind::Q8_0, VOCAB, HIDDEN, 7));
    let bytes: usize = layers.iter().flatten().map(|m| m.bytes()).sum::<usize>() + head.bytes();
    let x576 = Tensor::from_vec(values(HIDDEN, 1), (1, HIDDEN), &Device::Cpu).unwrap();
    let x1536 = Tensor::from_vec(values(FFN, 2), (1, FFN), &Device::Cpu).unwrap();
    println!(
        "SmolLM2-135M's products for one token ({:.1} MB held), {} threads",
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!("inputs  ms/token  GB/s   (Q4_1 layers ms, Q8_0 head ms)");
    for int8 in [false, true] {
        let product = |m: &Arc<QuantMatrix>, x: &Tensor| {
            if int8 {
                m.matmul_int8(x).unwrap()
            } else {
                m.matmul(x).unwrap()
            }
        };
        let layers_s = median(9, || {
            for ms in &layers {
                for (i, m) in ms.iter().enumerate() {
                    let x = if i == 6 { &x1536 } else { &x576 };
                    std::hint::black_box(product(m, x));
                }
            }
        });
        let head_s = median(9, || {
            std::hint::black_box(product(&head, &x576));
        });
        let s = layers_s + head_s;
        println!(
            "{:6}  {:8.2}  {:5.1}  ({:.2}, {:.2})",
            if int8 { "int8" } else { "f32" },
            1e3 * s,
            bytes as f64 / s / 1e9,
            1e3 * layers_s,
            1e3 * head_s
        );
    }
}

/// One Q4_1 product of each size, the best of 300 calls.
fn single_products() {
    println!("\none Q4_1 product, best of 300 calls");
    let x = Tensor::from_vec(values(HIDDEN, 1), (1, HIDDEN), &Device::Cpu).unwrap();
    for rows in [16usize, 576, 1536, 49152] {
        let m = Arc::new(blocks(QuantKind::Q4_1, rows, HIDDEN, 3));
        // The weight's own bytes (the int8 kernel's copy, where one is made,
        // is about as large).
        let held = m.bytes();
        for int8 in [false, true] {
            let mut s = f64::MAX;
            for _ in 0..300 {
                let t = std::time::Instant::now();
                std::hint::black_box(
                    if int8 {
                        m.matmul_int8(&x)
                    } else {
                        m.matmul(&x)
                    }
                    .unwrap(),
                );
                s = s.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{rows:5} × 576  {:6}  {:8.1} µs  {:5.1} GB/s",
                if int8 { "int8" } else { "f32" },
                s * 1e6,
                held as f64 / s / 1e9
            );
        }
    }
}
