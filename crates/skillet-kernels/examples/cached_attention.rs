//! Times the serving attention (`cached_attention`: each query's terms in
//! a fixed order, keys cached in blocks) against the training kernel
//! (`attention`: tiles of 64 queries through GEMM), on SmolLM2-135M's head
//! shapes (9 query heads over 3 key/value heads of width 64), per layer:
//! a whole prompt prefilled at once, and a decode step of 32 sequences.
//!
//!     cargo run --release -p skillet-kernels --example cached_attention

mod common;

use candle_core::{Device, Tensor};
use common::{median, values};
use skillet_kernels::{
    AttentionMask, CachedSeq, attention, cached_attention, key_cache_len, write_keys,
};

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const WIDTH: usize = 64;
const SCALE: f32 = 0.125;

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

/// Key rows `[T, K·D]` as a blocked key cache.
fn key_cache(rows: &[f32]) -> Vec<f32> {
    let w = KV_HEADS * WIDTH;
    let mut c = vec![0f32; key_cache_len(rows.len() / w, w)];
    write_keys(&mut c, w, 0, rows);
    c
}

fn main() {
    println!("per layer, {HEADS} heads over {KV_HEADS}, width {WIDTH}; median ms");
    println!("prompt  training kernel  serving kernel");
    for t in [128usize, 512, 1024, 2048] {
        let q = tensor(&[1, t, HEADS, WIDTH], 1);
        let k = tensor(&[1, t, KV_HEADS, WIDTH], 2);
        let v = tensor(&[1, t, KV_HEADS, WIDTH], 3);
        let mask = AttentionMask::causal(1, t, t).unwrap();
        let kc = key_cache(&k.flatten_all().unwrap().to_vec1().unwrap());
        let vc: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        let q3 = q.squeeze(0).unwrap();
        let seq = CachedSeq {
            k: &kc,
            v: &vc,
            start: 0,
            len: t,
        };
        let runs = (8192 / t).clamp(5, 41);
        let tiled = median(runs, || {
            attention(&q, &k, &v, &mask, SCALE).unwrap();
        });
        let cached = median(runs, || {
            cached_attention(&q3, KV_HEADS, &[seq], None, SCALE).unwrap();
        });
        println!("{t:6}  {:15.2}  {:14.2}", tiled * 1e3, cached * 1e3);
    }
    let (n, keys) = (32, 300);
    let w = KV_HEADS * WIDTH;
    let ks: Vec<Vec<f32>> = (0..n)
        .map(|i| key_cache(&values(keys * w, 10 + i as u64)))
        .collect();
    let vs: Vec<Vec<f32>> = (0..n).map(|i| values(keys * w, 50 + i as u64)).collect();
    let q = tensor(&[n, HEADS, WIDTH], 5);
    let seqs: Vec<CachedSeq> = ks
        .iter()
        .zip(&vs)
        .map(|(k, v)| CachedSeq {
            k,
            v,
            start: keys - 1,
            len: 1,
        })
        .collect();
    let step = median(101, || {
        cached_attention(&q, KV_HEADS, &seqs, None, SCALE).unwrap();
    });
    println!(
        "decode step, {n} sequences of {keys} positions: serving kernel {:.3} ms",
        step * 1e3
    );
}
