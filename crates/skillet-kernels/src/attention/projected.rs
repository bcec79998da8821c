//! The attention over its own input projections, in one op: the RMSNorm
//! of the residual stream `h`, the q, k and v projections (each a frozen
//! weight, or a frozen weight plus its LoRA update, as `lora_linear`),
//! RoPE, and the fused attention of [`super::Attention`].
//!
//! As separate ops (three projections, then `attention_rope_rows`), the
//! graph kept q, k and v in f32 for the attention's backward, each
//! projection normed `h` again in forward and in backward, and `h` took
//! three gradients, each a full-width add. Here `h` is normed once each
//! way, the rotated queries (already scaled) and keys and the values are
//! kept by the op itself — rounded to bf16 where the attention's products
//! run on the tiles, which read exactly those rounded values, so half the
//! bytes for the same numbers — and `h` gets one gradient:
//! `n'(h)(dq Wq + dk Wk + dv Wv + LoRA terms)`.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{Attention, AttentionMask};
use crate::FrozenWeight;
use crate::bf16::{RoundedRows, from_bf16, matmul_rounded, matmul_rounded_new, round_into};
use crate::bf16::{bf16_accelerated, transposed};
use crate::lora_linear::{FrozenLinear, update_grads};
use crate::lora_rows::LoraFactors;
use crate::rms_norm::InputNorm;
use crate::rope::{RopeLayout, RopeTable, rotate};
use crate::storage::{slice, tensor, with_f32_all};
use crate::thin;

/// One of the attention's input projections: its frozen part and, where
/// the module is adapted, its LoRA factors.
#[derive(Debug, Clone)]
pub struct QkvProjection {
    pub base: FrozenLinear,
    pub lora: Option<LoraFactors>,
}

/// A projection as the op holds it: the factors' rank and scale, their
/// values coming in the op's second input.
struct Projection {
    base: FrozenLinear,
    lora: Option<(usize, f32)>,
}

/// The attention's inputs as forward made them: the rotated, scaled
/// queries, the rotated keys and the values.
enum Kept {
    F32([Vec<f32>; 3]),
    /// Rounded to bf16, the values the attention's tile products read.
    Bf16([Vec<u16>; 3]),
}

/// What forward keeps for backward.
struct Saved {
    qkv: Kept,
    /// `x Aᵀ` of each adapted projection.
    downs: [Option<Vec<f32>>; 3],
    /// The attention's log-sum-exp per query and head.
    lse: Vec<f32>,
}

struct ProjectedAttention {
    norm: InputNorm,
    projections: [Projection; 3],
    /// The attention over queries scaled beforehand (its own scale 1), on
    /// rows of heads, no RoPE inside.
    attention: Attention,
    scale: f32,
    rope: (RopeTable, RopeLayout),
    saved: Mutex<Option<Saved>>,
}

/// Each adapted projection's `A` and `B` within the op's flat second input.
type Factors<'a> = [Option<(&'a [f32], &'a [f32])>; 3];

impl ProjectedAttention {
    /// `[B, T, C]` of the input's dims, each projection's `(out, in)`
    /// checked against `C` and the heads' width.
    fn shape(&self, dims: &[usize]) -> Result<([usize; 3], [usize; 3])> {
        let &[b, t, c] = dims else {
            bail!("projected attention: input {dims:?} is not [B, T, C]");
        };
        let d = self.attention.width.unwrap_or(0);
        let mut outs = [0; 3];
        for (o, p) in outs.iter_mut().zip(&self.projections) {
            let (out, inp) = p.base.weight.dims()?;
            if inp != c || d == 0 || out % d != 0 {
                bail!("projected attention: W [{out}, {inp}] for rows of {c}, heads of {d}");
            }
            *o = out;
        }
        if self.norm.width() != c || outs[1] != outs[2] {
            bail!(
                "projected attention: a norm of {} for rows of {c}, outputs {outs:?}",
                self.norm.width()
            );
        }
        Ok(([b, t, c], outs))
    }

    /// The attention's dimensions for inputs `[B, T, C]` and projection
    /// widths `outs`.
    fn dims(&self, [b, t, _]: [usize; 3], outs: [usize; 3]) -> Result<super::flash::Dims> {
        let q = Layout::contiguous((b, t, outs[0]));
        let kv = Layout::contiguous((b, t, outs[1]));
        self.attention.dims(&q, &kv, &kv)
    }

    /// `flat` split into each adapted projection's `A` (`[r, C]`) and `B`
    /// (`[out, r]`), in the projections' order.
    fn factors<'a>(&self, flat: &'a [f32], c: usize, outs: [usize; 3]) -> Result<Factors<'a>> {
        let mut rest = flat;
        let mut factors = [None; 3];
        for ((f, p), out) in factors.iter_mut().zip(&self.projections).zip(outs) {
            if let Some((r, _)) = p.lora {
                if rest.len() < r * (c + out) {
                    bail!("projected attention: {} factor values too few", flat.len());
                }
                let (a, tail) = rest.split_at(r * c);
                let (b, tail) = tail.split_at(out * r);
                *f = Some((a, b));
                rest = tail;
            }
        }
        if !rest.is_empty() {
            bail!("projected attention: {} factor values too many", rest.len());
        }
        Ok(factors)
    }

    /// `x Wᵀ` of each projection's frozen weight, `x` (`rows × c`) rounded
    /// once for those whose products run on the tiles.
    fn products(&self, x: &[f32], rows: usize, c: usize) -> Result<[Vec<f32>; 3]> {
        let mut rounded: Option<RoundedRows> = None;
        let mut ys = Vec::with_capacity(3);
        for p in &self.projections {
            let w = &p.base.weight;
            let on_tiles = match w.on_tiles_here() {
                true => {
                    let xr = rounded.get_or_insert_with(|| RoundedRows::new_par(x, rows, c));
                    w.on_tiles(true, |b| matmul_rounded_new(xr, b))?
                }
                false => None,
            };
            ys.push(match on_tiles {
                Some(y) => y,
                None => w.forward(x)?,
            });
        }
        Ok(ys.try_into().expect("three projections"))
    }

    /// Rotates `q` and `k` (`[B, T, heads · D]`) by the op's RoPE, or back.
    fn rotated(&self, x: &[f32], [b, t]: [usize; 2], inverse: bool) -> Result<Vec<f32>> {
        let d = self.attention.width.unwrap_or(1);
        let heads = x.len() / (b * t * d).max(1);
        let (table, layout) = &self.rope;
        rotate(x, &[b, t, heads, d], table, *layout, inverse)
    }
}

/// `x` rounded to bf16 bits.
fn rounded(x: &[f32]) -> Vec<u16> {
    let mut r = vec![0u16; x.len()];
    r.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(dst, src)| round_into(src, dst));
    r
}

/// `x` (bf16 bits) widened to f32.
fn widened(x: &[u16]) -> Vec<f32> {
    x.par_iter().map(|&h| from_bf16(h)).collect()
}

/// `acc += dy W` (`acc` made where `None`) for rows `dy` of `W`'s outputs:
/// `dy` rounded once on the tiles, where the weight's products run there.
fn add_backward(w: &FrozenWeight, dy: &[f32], acc: &mut Option<Vec<f32>>) -> Result<()> {
    let (out, _) = w.dims()?;
    if w.on_tiles_here() {
        let dyr = RoundedRows::new_par(dy, dy.len() / out.max(1), out);
        let done = match acc {
            Some(acc) => w.on_tiles(false, |b| matmul_rounded(&dyr, b, acc, true))?,
            None => w
                .on_tiles(false, |b| matmul_rounded_new(&dyr, b))?
                .map(|y| *acc = Some(y)),
        };
        if done.is_some() {
            return Ok(());
        }
    }
    let y = w.backward(dy)?;
    match acc {
        Some(acc) => acc
            .par_iter_mut()
            .zip(y.par_iter())
            .for_each(|(a, b)| *a += b),
        None => *acc = Some(y),
    }
    Ok(())
}

impl CustomOp2 for ProjectedAttention {
    fn name(&self) -> &'static str {
        "projected-attention"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        fs: &CpuStorage,
        fl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = slice(hs, hl, self.name())?;
        let flat = slice(fs, fl, self.name())?;
        let (shape, outs) = self.shape(hl.dims())?;
        let dims = self.dims(shape, outs)?;
        let [b, t, c] = shape;
        let factors = self.factors(flat, c, outs)?;
        let rows = b * t;
        let x = self.norm.forward(h);
        let mut ys = self.products(&x, rows, c)?;
        let mut downs = [None, None, None];
        for (i, p) in self.projections.iter().enumerate() {
            let out = outs[i];
            if let (Some((r, s)), Some((a, bf))) = (p.lora, factors[i]) {
                let mut u = vec![0f32; rows * r];
                thin::times_t(&x, [rows, c, r], a, &mut u);
                thin::add_times(&mut ys[i], [rows, r, out], &u, &transposed(bf, out, r), s);
                downs[i] = Some(u);
            }
            if let Some(bias) = &p.base.bias {
                let bias = bias.flatten_all()?.to_vec1::<f32>()?;
                if bias.len() != out {
                    bail!(
                        "projected attention: bias of {} for {out} outputs",
                        bias.len()
                    );
                }
                ys[i]
                    .par_chunks_mut(out)
                    .for_each(|row| row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b));
            }
        }
        drop(x);
        let [q, k, v] = ys;
        let mut q = self.rotated(&q, [b, t], false)?;
        let k = self.rotated(&k, [b, t], false)?;
        // Scaled here as the attention scales its queries (before they
        // are rounded): kept scaled, the attention's own scale is 1.
        q.par_iter_mut().for_each(|v| *v *= self.scale);
        let (out, lse) = self.attention.forward(&dims, [&q, &k, &v]);
        let qkv = match self.attention.bf16 {
            true => Kept::Bf16([rounded(&q), rounded(&k), rounded(&v)]),
            false => Kept::F32([q, k, v]),
        };
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(Saved { qkv, downs, lse });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, outs[0]))))
    }

    /// Backward once per forward: the kept inputs are taken.
    fn bwd(
        &self,
        h: &Tensor,
        flat: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.lock().ok().and_then(|mut s| s.take()) else {
            bail!("projected attention: backward without a forward, or a second one");
        };
        let want_dh = h.track_op();
        let (shape, outs) = self.shape(h.dims())?;
        let (dh, dflat) = with_f32_all(&[h, flat, res, grad], self.name(), |t| {
            let [h, flat, out, dout] = [t[0], t[1], t[2], t[3]];
            let dims = self.dims(shape, outs)?;
            let [b, t, c] = shape;
            let rows = b * t;
            let factors = self.factors(flat, c, outs)?;
            let [q, k, v] = match saved.qkv {
                Kept::F32(qkv) => qkv,
                Kept::Bf16(qkv) => qkv.map(|x| widened(&x)),
            };
            let (mut dq, dk, dv) =
                self.attention
                    .backward(&dims, [&q, &k, &v, out, dout], &saved.lse);
            drop((q, k, v));
            dq.par_iter_mut().for_each(|v| *v *= self.scale);
            let dq = self.rotated(&dq, [b, t], true)?;
            let dk = self.rotated(&dk, [b, t], true)?;
            let x = self.norm.forward(h);
            let mut dx = None;
            let mut dflat = Vec::with_capacity(flat.len());
            for (i, dy) in [dq, dk, dv].iter().enumerate() {
                let p = &self.projections[i];
                let out = outs[i];
                if want_dh {
                    add_backward(&p.base.weight, dy, &mut dx)?;
                }
                let (Some((r, s)), Some((a, bf)), Some(u)) = (p.lora, factors[i], &saved.downs[i])
                else {
                    continue;
                };
                let dims = [rows, c, out, r];
                let (da, db) = update_grads(&x, u, dy, (a, bf), dims, s, dx.as_deref_mut());
                dflat.extend_from_slice(&da);
                dflat.extend_from_slice(&db);
            }
            let dh = dx.map(|dx| self.norm.backward(h, &dx));
            Ok((dh, dflat))
        })?;
        let dh = dh.map(|d| tensor(d, h.shape())).transpose()?;
        let dflat = match flat.track_op() {
            true => Some(tensor(dflat, flat.shape())?),
            false => None,
        };
        Ok((dh, dflat))
    }
}

/// The attention of `h`'s own q, k and v projections, each of heads of
/// width `d`, under `mask`, scores scaled by `scale`: `h` (`[B, T, C]`,
/// the residual stream) normed by `norm`, projected by `projections` (q,
/// k, v; at least one with LoRA factors), q and k rotated by `table`, and
/// the fused attention of [`super::attention_rope_rows`] (on bf16 tiles
/// where `bf16` and the CPU has them). Returns `[B, T, H · d]`; backward
/// gives `h` and each adapted projection's `A` and `B` their gradients.
#[allow(clippy::too_many_arguments)]
pub fn projected_attention(
    h: &Tensor,
    norm: &InputNorm,
    projections: &[QkvProjection; 3],
    d: usize,
    mask: &AttentionMask,
    scale: f32,
    (table, layout): (&RopeTable, RopeLayout),
    bf16: bool,
) -> Result<Tensor> {
    let mut flat = Vec::new();
    let mut held = Vec::with_capacity(3);
    for p in projections {
        let lora = match &p.lora {
            Some(f) => {
                let (out, inp) = p.base.weight.dims()?;
                let r = f.a.dim(0)?;
                if f.a.dims2()? != (r, inp) || f.b.dims2()? != (out, r) {
                    bail!(
                        "projected attention: A {:?}, B {:?} for W [{out}, {inp}]",
                        f.a.dims(),
                        f.b.dims()
                    );
                }
                flat.push(f.a.flatten_all()?);
                flat.push(f.b.flatten_all()?);
                Some((f.a.dim(0)?, f.scale))
            }
            None => None,
        };
        held.push(Projection {
            base: p.base.clone(),
            lora,
        });
    }
    if flat.is_empty() {
        bail!("projected attention: no projection is adapted");
    }
    // The factors as one input (the op has two): their gradients come
    // back through the concatenation to each.
    let flat = Tensor::cat(&flat, 0)?;
    let op = ProjectedAttention {
        norm: norm.clone(),
        projections: held.try_into().map_err(|_| {
            candle_core::Error::Msg("projected attention: three projections".into())
        })?,
        attention: Attention {
            mask: mask.clone(),
            scale: 1.0,
            lse: Default::default(),
            rope: None,
            bf16: bf16 && bf16_accelerated(),
            width: Some(d),
        },
        scale,
        rope: (table.clone(), layout),
        saved: Mutex::new(None),
    };
    h.contiguous()?.apply_op2(&flat, op)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::QuantMatrix;
    use crate::testing::{assert_close, check_op, grads, quant_matrices, random};
    use crate::{attention_rope_rows, lora_linear, normed_frozen_product};

    const B: usize = 2;
    const T: usize = 70;
    const C: usize = 64;
    const D: usize = 16;
    /// Query and key/value heads.
    const H: usize = 4;
    const K: usize = 2;
    const R: usize = 4;

    fn table() -> RopeTable {
        let half = D / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for row in 0..B * T {
            for i in 0..half {
                let angle = (row % T) as f32 * 10_000f32.powf(-(i as f32) / half as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable::new(cos, sin, B * T, half).unwrap()
    }

    fn norm() -> InputNorm {
        let w = random(&[C], 5, 0.5).to_vec1::<f32>().unwrap();
        InputNorm::new(w.iter().map(|v| 1.0 + v).collect(), 1e-5)
    }

    /// The op's inputs: `h`, then `A` and `B` of each adapted projection
    /// (those of `adapted`, in order).
    fn inputs(adapted: [bool; 3]) -> Vec<Tensor> {
        let mut v = vec![random(&[B, T, C], 1, 1.0)];
        for (i, out) in [H * D, K * D, K * D].into_iter().enumerate() {
            if adapted[i] {
                v.push(random(&[R, C], 10 + i as u64, 0.3));
                v.push(random(&[out, R], 20 + i as u64, 0.3));
            }
        }
        v
    }

    /// Projections over `weights`, adapted as `adapted`, the factors taken
    /// from `t` (after `h`).
    fn projections(
        weights: &[FrozenLinear; 3],
        adapted: [bool; 3],
        t: &[Tensor],
    ) -> [QkvProjection; 3] {
        let mut next = 1;
        std::array::from_fn(|i| {
            let lora = adapted[i].then(|| {
                next += 2;
                LoraFactors {
                    a: t[next - 2].clone(),
                    b: t[next - 1].clone(),
                    b_t: None,
                    scale: 1.5,
                }
            });
            QkvProjection {
                base: weights[i].clone(),
                lora,
            }
        })
    }

    /// The op (`fused`), or the separate ops the model ran before (each
    /// projection with the norm inside, then the attention on rows of
    /// heads), as one closure over the inputs.
    fn op(
        weights: &[FrozenLinear; 3],
        adapted: [bool; 3],
        bf16: bool,
        fused: bool,
    ) -> impl Fn(&[Tensor]) -> Result<Tensor> {
        let (norm, mask, rope) = (norm(), AttentionMask::causal(B, T, T).unwrap(), table());
        let weights = weights.clone();
        move |t: &[Tensor]| {
            let p = projections(&weights, adapted, t);
            if fused {
                let layout = (&rope, RopeLayout::Half);
                return projected_attention(&t[0], &norm, &p, D, &mask, 0.3, layout, bf16);
            }
            let ys = p
                .iter()
                .map(|p| match &p.lora {
                    Some(f) => lora_linear(&t[0], &p.base, f, Some(&norm)),
                    None => {
                        let y = normed_frozen_product(&t[0], &norm, &p.base.weight)?;
                        match &p.base.bias {
                            Some(bias) => y.broadcast_add(bias),
                            None => Ok(y),
                        }
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let rows = [&ys[0], &ys[1], &ys[2]];
            attention_rope_rows(rows, D, &mask, 0.3, &rope, RopeLayout::Half, bf16)
        }
    }

    /// Dense q, k, v weights of one kind; `q` with a bias where asked.
    fn dense(kind: fn(Tensor) -> FrozenWeight, bias: bool) -> [FrozenLinear; 3] {
        let outs = [H * D, K * D, K * D];
        std::array::from_fn(|i| FrozenLinear {
            weight: kind(random(&[outs[i], C], 30 + i as u64, 0.3)),
            bias: (bias && i == 0).then(|| random(&[outs[i]], 40, 0.5)),
        })
    }

    const ADAPTED: [[bool; 3]; 3] = [[true; 3], [true, false, true], [false, true, false]];

    #[test]
    fn equals_the_separate_ops_and_finite_differences_in_f32() {
        for bias in [false, true] {
            let weights = dense(FrozenWeight::Dense, bias);
            for adapted in ADAPTED {
                let f = op(&weights, adapted, false, true);
                let reference = op(&weights, adapted, false, false);
                check_op(&inputs(adapted), &f, &reference, 1e-5);
            }
        }
    }

    #[test]
    fn equals_the_separate_ops_on_bf16_weights_and_quantized_blocks() {
        // In bf16 the forward is the same computation; backward sums the
        // three projections' input gradients in another order.
        let mut all = vec![dense(FrozenWeight::DenseBf16, true)];
        let (q, k, v) = (
            quant_matrices(H * D, C),
            quant_matrices(K * D, C),
            quant_matrices(K * D, C),
        );
        for ((q, k), v) in q.into_iter().zip(k).zip(v) {
            for kind in [FrozenWeight::QuantBf16, FrozenWeight::QuantF32] {
                let w = |m: &Arc<QuantMatrix>| FrozenLinear {
                    weight: kind(m.clone()),
                    bias: None,
                };
                all.push([w(&q), w(&k), w(&v)]);
            }
        }
        for weights in &all {
            for adapted in ADAPTED {
                let x = inputs(adapted);
                let (f, reference) = (
                    op(weights, adapted, true, true),
                    op(weights, adapted, true, false),
                );
                assert_close(&f(&x).unwrap(), &reference(&x).unwrap(), 1e-6, "forward");
                let (gf, gr) = (grads(&x, &f), grads(&x, &reference));
                for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
                    assert_close(a, b, 1e-5, &format!("gradient of input {i}"));
                }
            }
        }
    }

    #[test]
    fn needs_an_adapted_projection_and_factors_of_its_shapes() {
        let weights = dense(FrozenWeight::Dense, false);
        let x = inputs([false; 3]);
        assert!(op(&weights, [false; 3], false, true)(&x).is_err());
        // Factors of other shapes than the projection's.
        let mut x = inputs([true, false, false]);
        x[2] = random(&[H * D + 1, R], 3, 0.3);
        assert!(op(&weights, [true, false, false], false, true)(&x).is_err());
        x[2] = random(&[R, H * D], 3, 0.3);
        assert!(op(&weights, [true, false, false], false, true)(&x).is_err());
    }
}
