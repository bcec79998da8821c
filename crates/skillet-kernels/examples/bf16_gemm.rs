//! Times bf16 products (`matmul_bf16`: operands rounded to bf16, f32
//! accumulation; AMX tiles where the CPU has them) against the f32 GEMM
//! that `linear` runs, on a square 2048³ product and on SmolLM2-135M's
//! projection shapes for 1024 tokens (forward `x Wᵀ` and backward `dy W`).
//!
//!     cargo run --release -p skillet-kernels --example bf16_gemm

mod common;

use candle_core::{Device, Tensor};
use common::{median, values};
use skillet_kernels::{Bf16Matrix, bf16_accelerated, frozen_matmul, matmul_bf16};

fn main() {
    println!("bf16 on AMX tiles: {}", bf16_accelerated());
    println!("shape (m × k × n)        f32 GFLOP/s   bf16 GFLOP/s   ratio");
    let shapes = [
        ("2048³", 2048, 2048, 2048, false),
        ("q/o x·Wᵀ 1024×576×576", 1024, 576, 576, true),
        ("gate/up x·Wᵀ 1024×576×1536", 1024, 576, 1536, true),
        ("down x·Wᵀ 1024×1536×576", 1024, 1536, 576, true),
        ("gate/up dy·W 1024×1536×576", 1024, 1536, 576, false),
        // Llama 3.2 1B's shapes for 512 tokens: wider rows of the left
        // operand (4 and 16 KiB in bf16).
        ("1B q/o x·Wᵀ 512×2048×2048", 512, 2048, 2048, true),
        ("1B gate/up x·Wᵀ 512×2048×8192", 512, 2048, 8192, true),
        ("1B down x·Wᵀ 512×8192×2048", 512, 8192, 2048, true),
        ("1B gate/up dy·W 512×8192×2048", 512, 8192, 2048, false),
    ];
    for (name, m, k, n, transposed) in shapes {
        let a = values(m * k, 1);
        // The weight as `linear` holds it: `[n, k]` for x·Wᵀ, `[k, n]` for dy·W.
        let (rows, cols) = if transposed { (n, k) } else { (k, n) };
        let w = values(rows * cols, 2);
        let flops = 2.0 * (m * k * n) as f64;
        let at = Tensor::from_vec(a.clone(), (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        // f32: x·Wᵀ through `frozen_matmul`; dy·W as x·(Wᵀ)ᵀ with W transposed up front.
        let wf = if transposed {
            wt
        } else {
            wt.t().unwrap().contiguous().unwrap()
        };
        let f32_s = median(5, || {
            frozen_matmul(&at, &wf).unwrap();
        });
        let b = Bf16Matrix::pack(&w, rows, cols, transposed);
        let mut out = vec![0f32; m * n];
        let bf_s = median(5, || matmul_bf16(&a, m, &b, &mut out));
        println!(
            "{name:27} {:10.0} {:14.0} {:7.2}×",
            flops / f32_s / 1e9,
            flops / bf_s / 1e9,
            f32_s / bf_s
        );
    }
}
