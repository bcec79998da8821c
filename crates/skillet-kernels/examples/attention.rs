//! Times the training attention (forward and backward of one layer, RoPE
//! inside) in f32 and with its products on bf16 tiles, on SmolLM2-135M's
//! head shapes (9 query heads over 3 key/value heads of width 64), one
//! sequence of each length.
//!
//!     cargo run --release -p skillet-kernels --example attention [f32|bf16] [tokens]
//!
//! (one precision alone, for a profiler; one length alone, timed 11 times).

mod common;

use candle_core::{Device, Tensor, Var};
use common::{median, values};
use skillet_kernels::{AttentionMask, RopeLayout, RopeTable, attention_rope, bf16_accelerated};

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const WIDTH: usize = 64;
const SCALE: f32 = 0.125;

fn var(shape: &[usize], seed: u64) -> Var {
    let t = Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap();
    Var::from_tensor(&t).unwrap()
}

fn table(t: usize) -> RopeTable {
    let half = WIDTH / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for pos in 0..t {
        for i in 0..half {
            let angle = pos as f32 * 10_000f32.powf(-(i as f32) / half as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    RopeTable::new(cos, sin, t, half).unwrap()
}

fn main() {
    println!(
        "per layer, {HEADS} heads over {KV_HEADS}, width {WIDTH}; median ms of forward + backward \
         (bf16 tiles here: {})",
        bf16_accelerated()
    );
    let only = std::env::args().nth(1);
    let runs_in = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let length: Option<usize> = std::env::args().nth(2).map(|t| t.parse().expect("tokens"));
    println!("tokens  f32  bf16");
    let lengths = length.map_or(vec![256usize, 512, 1024, 2048, 4096], |t| vec![t]);
    for t in lengths {
        let q = var(&[1, t, HEADS, WIDTH], 1);
        let k = var(&[1, t, KV_HEADS, WIDTH], 2);
        let v = var(&[1, t, KV_HEADS, WIDTH], 3);
        let dy = Tensor::from_vec(
            values(t * HEADS * WIDTH, 4),
            (1, t, HEADS, WIDTH),
            &Device::Cpu,
        )
        .unwrap();
        let mask = AttentionMask::causal(1, t, t).unwrap();
        let rope = table(t);
        let runs = if t >= 2048 && length.is_none() { 5 } else { 11 };
        let time = |bf16: bool| {
            if !runs_in(if bf16 { "bf16" } else { "f32" }) {
                return f64::NAN;
            }
            1e3 * median(runs, || {
                let y = attention_rope(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    &mask,
                    SCALE,
                    &rope,
                    RopeLayout::Half,
                    bf16,
                )
                .unwrap();
                let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(g.get(q.as_tensor()).is_some());
            })
        };
        println!("{t:6}  {:.2}  {:.2}", time(false), time(true));
    }
}
