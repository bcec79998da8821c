//! Causal self-attention with grouped-query heads, fused: scores, mask,
//! softmax and the value product per tile of queries, with the softmax
//! statistics (`lse`, one float per query and head) kept for backward and
//! the probabilities recomputed there, as FlashAttention does (Dao et al.
//! 2022, arXiv 2205.14135; backward as in FlashAttention-2, arXiv
//! 2307.08691). A tile is up to 64 queries of all `G` query heads that
//! share one key/value head, against the keys they may see in blocks of
//! 256 (`flash`), so memory is `O(G·64·256)` per worker instead of the
//! `O(H·T·S)` probability tensor the composed version keeps for backward.
//!
//! Layouts follow the projections, so no transposes are needed: queries
//! `[B, T, H, D]`, keys and values `[B, S, K, D]`, output `[B, T, H, D]`;
//! query head `h` reads key/value head `h / G` (transformers' `repeat_kv`).
//! The mask is causal (queries are the last `T` of `S` positions), with
//! optional key padding, a sliding window, and packing segments (a query
//! sees only keys of its own segment). A query that may see no key gives 0.

mod flash;
mod mask;
mod projected;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, D, Layout, Result, Shape, Tensor, bail};

use crate::bf16::bf16_accelerated;
use crate::rope::{RopeLayout, RopeTable, rotate};
use crate::storage::{slice, tensor, with_f32};
use flash::Dims;
pub use mask::{AttentionMask, SHARED_SEGMENT};
pub use projected::{QkvProjection, projected_attention};

pub(crate) struct Attention {
    pub(crate) mask: AttentionMask,
    pub(crate) scale: f32,
    /// `[B, H, T]` log-sum-exp of each query's scaled scores (−∞ when it
    /// sees no key), written by forward for backward.
    pub(crate) lse: Arc<Mutex<Vec<f32>>>,
    /// RoPE applied to `q` and `k` inside the op (rotated copies made for
    /// the call and again in backward, never kept by the graph).
    pub(crate) rope: Option<(RopeTable, RopeLayout)>,
    /// Products on bf16 tiles (see [`attention_rope`]).
    pub(crate) bf16: bool,
    /// Inputs and output given as rows of heads of this width (`[B, T,
    /// heads · D]`, see [`attention_rope_rows`]), else `[B, T, heads, D]`.
    pub(crate) width: Option<usize>,
}

impl Attention {
    /// `[B, T, heads, D]` of an input's or output's shape.
    fn heads(&self, dims: &[usize]) -> Result<[usize; 4]> {
        match (dims, self.width) {
            (&[b, t, h, d], None) => Ok([b, t, h, d]),
            (&[b, t, n], Some(d)) if d > 0 && n % d == 0 => Ok([b, t, n / d, d]),
            _ => bail!(
                "attention: {dims:?} is not [B, T, heads, D] nor rows of heads of width {:?}",
                self.width
            ),
        }
    }

    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let [b, t, h, d] = self.heads(q.dims())?;
        let [kb, s, kh, kd] = self.heads(k.dims())?;
        if k.dims() != v.dims() || kb != b || kd != d || kh == 0 || h % kh != 0 {
            bail!(
                "attention: queries {:?}, keys {:?}, values {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let m = &self.mask;
        if (m.batch, m.queries, m.keys) != (b, t, s) {
            bail!(
                "attention: mask for {}×{}×{}, inputs {b}×{t}×{s}",
                m.batch,
                m.queries,
                m.keys
            );
        }
        Ok(Dims {
            b,
            t,
            s,
            h,
            k: kh,
            d,
            g: h / kh,
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql, kl, vl)?;
        let (q, k, v) = (
            slice(qs, ql, "attention")?,
            slice(ks, kl, "attention")?,
            slice(vs, vl, "attention")?,
        );
        let rotated = match &self.rope {
            Some((table, layout)) => Some((
                rotate(q, &self.heads(ql.dims())?, table, *layout, false)?,
                rotate(k, &self.heads(kl.dims())?, table, *layout, false)?,
            )),
            None => None,
        };
        let (q, k) = match &rotated {
            Some((q, k)) => (q.as_slice(), k.as_slice()),
            None => (q, k),
        };
        let (out, lse) = self.forward(&dims, [q, k, v]);
        if let Ok(mut saved) = self.lse.lock() {
            *saved = lse;
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().map(|l| l.clone()).unwrap_or_default();
        // With RoPE inside: the rotated inputs again here, and their
        // gradients rotated back at the end (a rotation keeps the shape).
        let (qh, kh) = (self.heads(q.dims())?, self.heads(k.dims())?);
        let (qr, kr) = match &self.rope {
            Some((table, layout)) => (
                Some(rotated(q, qh, table, *layout, false)?),
                Some(rotated(k, kh, table, *layout, false)?),
            ),
            None => (None, None),
        };
        let (q, k) = (qr.as_ref().unwrap_or(q), kr.as_ref().unwrap_or(k));
        let (ql, kl) = (q.layout().clone(), k.layout().clone());
        let dims = self.dims(&ql, &kl, v.layout())?;
        if lse.len() != dims.b * dims.h * dims.t {
            bail!("attention backward without its forward statistics");
        }
        let (dq, dk, dv) = with_f32([q, k, v, res, grad], self.name(), |inputs| {
            Ok(self.backward(&dims, inputs, &lse))
        })?;
        let (dq, dk) = (tensor(dq, q.shape())?, tensor(dk, k.shape())?);
        let (dq, dk) = match &self.rope {
            Some((table, layout)) => (
                rotated(&dq, qh, table, *layout, true)?,
                rotated(&dk, kh, table, *layout, true)?,
            ),
            None => (dq, dk),
        };
        Ok((Some(dq), Some(dk), Some(tensor(dv, v.shape())?)))
    }
}

/// `x` (of `heads`, `[B, T, heads, D]`) rotated by `table` (or back,
/// `inverse`).
fn rotated(
    x: &Tensor,
    heads: [usize; 4],
    table: &RopeTable,
    layout: RopeLayout,
    inverse: bool,
) -> Result<Tensor> {
    let y = with_f32([x], "attention", |[xs]| {
        rotate(xs, &heads, table, layout, inverse)
    })?;
    tensor(y, x.shape())
}

/// Attention of queries `q` (`[B, T, H, D]`) over keys `k` and values `v`
/// (`[B, S, K, D]`, `H` a multiple of `K`) under `mask`, scores scaled by
/// `scale`; fused, with gradients for all three. Returns `[B, T, H, D]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
) -> Result<Tensor> {
    apply([q, k, v], mask, scale, None, false, None)
}

/// [`attention`] of `q` and `k` rotated by `table` (`q` and `k` at the
/// same positions): the rotated copies are made inside the op, for the
/// call and again in backward, so the graph never keeps them.
///
/// With `bf16`, its five matrix products per tile (scores, output, and in
/// backward `dP`, `dQ`, `dK`, `dV`) run on bf16 tiles where the CPU has
/// them ([`bf16_accelerated`]): their operands (scaled queries, keys,
/// values, probabilities, `dO`, `dS`) rounded to bf16, sums in f32, the
/// mask, softmax and its statistics in f32, as PyTorch's fused attention
/// computes under bf16 autocast. Elsewhere it is the f32 op.
#[allow(clippy::too_many_arguments)]
pub fn attention_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
    table: &RopeTable,
    layout: RopeLayout,
    bf16: bool,
) -> Result<Tensor> {
    with_rope([q, k, v], None, mask, scale, (table, layout), bf16)
}

/// [`attention_rope`] on rows of heads of `width`: `q` `[B, T, H·width]`,
/// `k` and `v` `[B, S, K·width]`, the output `[B, T, H·width]`, as the
/// projections give and take them. Reshaping to `[B, T, heads, D]` and
/// back around the op would add four nodes to the graph, and backward
/// pays each one a zeroed gradient and an add the size of its tensor.
#[allow(clippy::too_many_arguments)]
pub fn attention_rope_rows(
    [q, k, v]: [&Tensor; 3],
    width: usize,
    mask: &AttentionMask,
    scale: f32,
    table: &RopeTable,
    layout: RopeLayout,
    bf16: bool,
) -> Result<Tensor> {
    with_rope([q, k, v], Some(width), mask, scale, (table, layout), bf16)
}

/// The op with RoPE inside, bf16 products where asked and accelerated.
fn with_rope(
    qkv: [&Tensor; 3],
    width: Option<usize>,
    mask: &AttentionMask,
    scale: f32,
    (table, layout): (&RopeTable, RopeLayout),
    bf16: bool,
) -> Result<Tensor> {
    let rope = Some((table.clone(), layout));
    apply(qkv, mask, scale, rope, bf16 && bf16_accelerated(), width)
}

fn apply(
    [q, k, v]: [&Tensor; 3],
    mask: &AttentionMask,
    scale: f32,
    rope: Option<(RopeTable, RopeLayout)>,
    bf16: bool,
    width: Option<usize>,
) -> Result<Tensor> {
    let op = Attention {
        mask: mask.clone(),
        scale,
        lse: Arc::new(Mutex::new(Vec::new())),
        rope,
        bf16,
        width,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same from composed candle ops with the full probability tensor
/// (the reference the fused op is tested against).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f32,
) -> Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    let (_, s, kh, _) = k.dims4()?;
    let g = h / kh;
    let q = q
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, kh, g * t, d))?;
    let k = k.transpose(1, 2)?.contiguous()?; // [B,K,S,D]
    let v = v.transpose(1, 2)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale as f64)?.reshape((b, kh, g, t, s))?;
    let scores = scores.broadcast_add(&mask.bias()?)?;
    let m = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&m)?.exp()?;
    let probs = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .reshape((b, kh, g * t, s))?;
    probs
        .matmul(&v)?
        .reshape((b, h, t, d))?
        .transpose(1, 2)?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_op, grads, max_abs, max_abs_diff, random};

    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        t: usize,
        s: usize,
        h: usize,
        k: usize,
        d: usize,
        mask: AttentionMask,
        seed: u64,
    ) {
        let q = random(&[b, t, h, d], seed, 1.0);
        let kk = random(&[b, s, k, d], seed + 1, 1.0);
        let v = random(&[b, s, k, d], seed + 2, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        check_op(
            &[q, kk, v],
            &|a| attention(&a[0], &a[1], &a[2], &mask, scale),
            &|a| attention_composed(&a[0], &a[1], &a[2], &mask, scale),
            5e-5,
        );
    }

    #[test]
    fn rope_inside_matches_rope_then_attention() {
        // Two sequences of 70 (two query tiles), GQA 6/2, packed segments
        // with positions restarting, in both RoPE layouts.
        let (b, t, h, k, d) = (2, 70, 6, 2, 8);
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for row in 0..b * t {
            let pos = (row % t) % 40; // a second packed example from 40
            for i in 0..half {
                let angle = pos as f32 * 10_000f32.powf(-(i as f32) / half as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = RopeTable::new(cos, sin, b * t, half).unwrap();
        let segments: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= 40)).collect();
        let mask = AttentionMask::causal(b, t, t)
            .unwrap()
            .with_segments(segments)
            .unwrap();
        let q = random(&[b, t, h, d], 11, 1.0);
        let kk = random(&[b, t, k, d], 12, 1.0);
        let v = random(&[b, t, k, d], 13, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
            check_op(
                &[q.clone(), kk.clone(), v.clone()],
                &|a| attention_rope(&a[0], &a[1], &a[2], &mask, scale, &table, layout, false),
                &|a| {
                    let q = crate::rope(&a[0], &table, layout)?;
                    let k = crate::rope(&a[1], &table, layout)?;
                    attention(&q, &k, &a[2], &mask, scale)
                },
                5e-5,
            );
        }
    }

    #[test]
    fn causal_gqa_matches_composed_across_tiles() {
        // 70 queries: two tiles, the second partial; 3 query heads per key head.
        check(
            2,
            70,
            70,
            6,
            2,
            8,
            AttentionMask::causal(2, 70, 70).unwrap(),
            1,
        );
        // Multi-head (G = 1) and a single query over a cache of 9 keys.
        check(
            1,
            5,
            5,
            2,
            2,
            16,
            AttentionMask::causal(1, 5, 5).unwrap(),
            2,
        );
        check(
            2,
            1,
            10,
            4,
            1,
            8,
            AttentionMask::causal(2, 1, 10).unwrap(),
            3,
        );
        // Three new queries after 4 cached keys.
        check(1, 3, 7, 2, 1, 4, AttentionMask::causal(1, 3, 7).unwrap(), 4);
    }

    #[test]
    fn window_padding_and_segments_match_composed() {
        let m = AttentionMask::causal(1, 80, 80)
            .unwrap()
            .with_window(Some(5));
        check(1, 80, 80, 2, 1, 8, m, 5);
        // Right padding: the last three keys are padding (their queries
        // still see the real keys before them).
        let mut km = vec![1u8; 2 * 12];
        km[9..12].fill(0);
        let m = AttentionMask::causal(2, 12, 12)
            .unwrap()
            .with_key_mask(km)
            .unwrap();
        check(2, 12, 12, 2, 1, 8, m, 6);
        // Three packed examples in one row, two in the other.
        let mut seg = vec![0u32; 5];
        seg.extend([1, 1, 1, 2, 2]);
        seg.extend([0, 0, 0, 0, 0, 0, 0, 1, 1, 1]);
        let m = AttentionMask::causal(2, 10, 10)
            .unwrap()
            .with_segments(seg)
            .unwrap();
        check(2, 10, 10, 4, 2, 8, m, 7);
        // A shared prefix of 3 keys continued by two segments: each sees
        // the prefix and itself, not the other.
        let mut seg = vec![SHARED_SEGMENT; 3];
        seg.extend([1, 1, 1, 2, 2, 2, 2]);
        let m = AttentionMask::causal(1, 10, 10)
            .unwrap()
            .with_segments(seg)
            .unwrap();
        let bias = m
            .bias()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sees =
            |i: usize| -> Vec<usize> { (0..10).filter(|&j| bias[i * 10 + j] == 0.0).collect() };
        assert_eq!(sees(2), vec![0, 1, 2]);
        assert_eq!(sees(5), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(sees(7), vec![0, 1, 2, 6, 7]);
        check(1, 10, 10, 4, 2, 8, m, 8);
    }

    #[test]
    fn a_query_that_sees_nothing_gives_zero_and_passes_no_gradient() {
        // Left padding: query 0 is padding and may see no key.
        let m = AttentionMask::causal(1, 4, 4)
            .unwrap()
            .with_key_mask(vec![0, 1, 1, 1])
            .unwrap();
        let q = random(&[1, 4, 2, 4], 1, 1.0);
        let k = random(&[1, 4, 1, 4], 2, 1.0);
        let v = random(&[1, 4, 1, 4], 3, 1.0);
        let out = attention(&q, &k, &v, &m, 0.5).unwrap();
        let first = out
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(first.to_scalar::<f32>().unwrap(), 0.0);
        let composed = attention_composed(&q, &k, &v, &m, 0.5).unwrap();
        assert_close(
            &out.narrow(1, 1, 3).unwrap(),
            &composed.narrow(1, 1, 3).unwrap(),
            1e-5,
            "real rows",
        );
        let g = grads(&[q, k, v], &|a| attention(&a[0], &a[1], &a[2], &m, 0.5));
        let dq0 = g[0]
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(dq0.to_scalar::<f32>().unwrap(), 0.0);
        let dk0 = g[1]
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(
            dk0.to_scalar::<f32>().unwrap(),
            0.0,
            "a padding key got a gradient"
        );
    }

    /// RoPE tables for `rows` positions restarting at `period`.
    fn table(rows: usize, period: usize, d: usize) -> RopeTable {
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for row in 0..rows {
            let pos = row % period;
            for i in 0..half {
                let angle = pos as f32 * 10_000f32.powf(-(i as f32) / half as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable::new(cos, sin, rows, half).unwrap()
    }

    #[test]
    fn rows_of_heads_give_the_four_dimensional_values_and_gradients() {
        // The op on [B, T, heads·D] rows is the same computation as on
        // [B, T, heads, D]: the same bits, forward and backward, both
        // precisions; and a width that does not divide the rows fails.
        let (b, t, h, k, d) = (2, 70, 6, 2, 8);
        let rope = table(b * t, t, d);
        let mask = AttentionMask::causal(b, t, t).unwrap();
        let inputs = [
            random(&[b, t, h, d], 41, 1.0),
            random(&[b, t, k, d], 42, 1.0),
            random(&[b, t, k, d], 43, 1.0),
        ];
        let rows: Vec<Tensor> = inputs.iter().map(|x| x.flatten_from(2).unwrap()).collect();
        for bf16 in [false, true] {
            let heads = |a: &[Tensor]| {
                attention_rope(
                    &a[0],
                    &a[1],
                    &a[2],
                    &mask,
                    0.3,
                    &rope,
                    RopeLayout::Half,
                    bf16,
                )
            };
            let flat = |a: &[Tensor]| {
                let y = attention_rope_rows(
                    [&a[0], &a[1], &a[2]],
                    d,
                    &mask,
                    0.3,
                    &rope,
                    RopeLayout::Half,
                    bf16,
                )?;
                assert_eq!(y.dims(), &[b, t, h * d]);
                y.reshape((b, t, h, d))
            };
            let mut want = vec![heads(&inputs).unwrap()];
            want.extend(grads(&inputs, &heads));
            let mut got = vec![flat(&rows).unwrap()];
            got.extend(grads(&rows, &flat));
            for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                let a = a.reshape(w.dims()).unwrap();
                assert_eq!(max_abs_diff(&a, w), 0.0, "output/gradient {i}, bf16 {bf16}");
            }
        }
        let odd = [&rows[0], &rows[1], &rows[2]];
        assert!(attention_rope_rows(odd, 5, &mask, 0.3, &rope, RopeLayout::Half, false).is_err());
    }

    #[test]
    fn bf16_products_stay_within_bf16_rounding_of_f32() {
        // 300 positions: five query tiles, two key blocks; GQA 6/2; a
        // second packed example from 290; width 40 (padded to 64 on the
        // tiles). Then a window of 70, so the queries' first keys are not
        // where the packed keys' blocks start.
        let (b, t, h, k, d) = (1, 300, 6, 2, 40);
        let segments: Vec<u32> = (0..t).map(|i| u32::from(i >= 290)).collect();
        let packed = AttentionMask::causal(b, t, t)
            .unwrap()
            .with_segments(segments)
            .unwrap();
        let window = AttentionMask::causal(b, t, t)
            .unwrap()
            .with_window(Some(70));
        for mask in [packed, window] {
            bf16_within_rounding(&mask, (b, t, h, k, d));
        }
    }

    fn bf16_within_rounding(
        mask: &AttentionMask,
        (b, t, h, k, d): (usize, usize, usize, usize, usize),
    ) {
        let rope = table(t, 290, d);
        let inputs = [
            random(&[b, t, h, d], 21, 1.0),
            random(&[b, t, k, d], 22, 1.0),
            random(&[b, t, k, d], 23, 1.0),
        ];
        let scale = 1.0 / (d as f32).sqrt();
        let run = |bf16: bool| {
            let f = |a: &[Tensor]| {
                attention_rope(
                    &a[0],
                    &a[1],
                    &a[2],
                    mask,
                    scale,
                    &rope,
                    RopeLayout::Half,
                    bf16,
                )
            };
            let mut out = vec![f(&inputs).unwrap()];
            out.extend(grads(&inputs, &f));
            out
        };
        let (low, exact) = (run(true), run(false));
        for (i, (a, b)) in low.iter().zip(&exact).enumerate() {
            assert_close(
                a,
                b,
                2e-2,
                &format!("output {i} (0: values, then gradients)"),
            );
            if bf16_accelerated() {
                assert!(
                    max_abs_diff(a, b) > 0.0,
                    "output {i}: the tiles did not run"
                );
            }
        }
    }

    #[test]
    fn backward_sums_do_not_depend_on_the_thread_count() {
        // Four heads' worth of runs at two lengths: the key and value
        // gradients are summed over tiles in a fixed order.
        for t in [70, 330] {
            let (b, h, k, d) = (2, 4, 2, 8);
            let mask = AttentionMask::causal(b, t, t).unwrap();
            let inputs = [
                random(&[b, t, h, d], 31, 1.0),
                random(&[b, t, k, d], 32, 1.0),
                random(&[b, t, k, d], 33, 1.0),
            ];
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| grads(&inputs, &|a| attention(&a[0], &a[1], &a[2], &mask, 0.3)))
            };
            let (one, three) = (on(1), on(3));
            for (a, b) in one.iter().zip(&three) {
                assert_eq!(max_abs_diff(a, b), 0.0, "{t} positions");
            }
        }
    }

    #[test]
    fn rows_whose_first_key_blocks_are_masked_match_composed() {
        // 600 positions: three blocks of 256 keys. A window of 100 masks
        // every block before a query's own; a second packed example from
        // 300 masks the first block for its queries; left padding of 300
        // keys leaves the first queries nothing, then one block unseen.
        let window = AttentionMask::causal(1, 600, 600)
            .unwrap()
            .with_window(Some(100));
        check(1, 600, 600, 4, 2, 8, window, 9);
        let segments: Vec<u32> = (0..600).map(|i| u32::from(i >= 300)).collect();
        let packed = AttentionMask::causal(1, 600, 600)
            .unwrap()
            .with_segments(segments)
            .unwrap();
        check(1, 600, 600, 4, 2, 8, packed, 10);
        let keys: Vec<u8> = (0..600).map(|i| u8::from(i >= 300)).collect();
        let padded = AttentionMask::causal(1, 600, 600)
            .unwrap()
            .with_key_mask(keys)
            .unwrap();
        let q = random(&[1, 600, 4, 8], 11, 1.0);
        let k = random(&[1, 600, 2, 8], 12, 1.0);
        let v = random(&[1, 600, 2, 8], 13, 1.0);
        let seen = |t: &Tensor| t.narrow(1, 300, 300).unwrap();
        let out = attention(&q, &k, &v, &padded, 0.3).unwrap();
        let composed = attention_composed(&q, &k, &v, &padded, 0.3).unwrap();
        assert_close(&seen(&out), &seen(&composed), 5e-5, "queries that see keys");
        assert_eq!(max_abs(&out.narrow(1, 0, 300).unwrap()), 0.0);
    }

    #[test]
    fn a_window_of_zero_is_no_window() {
        // Degenerate configs say 0 for "no window"; the backward split
        // must not hang on heads with no work either way.
        let m = AttentionMask::causal(1, 1, 1).unwrap().with_window(Some(0));
        check(1, 1, 1, 2, 1, 8, m, 14);
    }

    #[test]
    fn long_sequence_tiles_agree_with_composed() {
        check(
            1,
            300,
            300,
            3,
            1,
            16,
            AttentionMask::causal(1, 300, 300).unwrap(),
            8,
        );
    }
}
