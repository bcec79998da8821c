//! LM head + cross-entropy in one op, in chunks of rows: the `[N, V]`
//! logits (200 MB at 4×256 tokens and a 49k vocabulary) are never stored.
//! Forward gives each row's `logsumexp(h Wᵀ / T) − (h Wᵀ / T)[label]`
//! (the negative log-probability of its label at temperature `T`), chunk
//! by chunk; backward takes a gradient per row, recomputes each chunk's
//! logits, turns them into `P = (softmax − onehot(label)) · g / T` in
//! place, and returns `dh = P W` and, for a trainable head, `dW = Pᵀ h`.
//! Over a frozen head, forward makes `dh` from its own logits instead (for
//! `g = 1`) and backward only scales its rows. The summed loss of SFT and
//! the per-token log-probabilities of DPO and GRPO are both this op. This
//! is the fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024,
//! arXiv 2410.10989), here on the CPU.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::bf16::{Bf16Weight, matmul_bf16, rounded_product_into, transposed};
use crate::frozen::FrozenWeight;
use crate::gemm::{Out, View, matmul};
use crate::storage::{slice, tensor, with_f32, zeros};
use crate::vec::{exp_shifted_sum, max, scale};

/// Rows per chunk: 256 × 49,152 logits is 50 MB.
const CHUNK: usize = 256;

/// What one forward pass saw besides the loss.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrossEntropyStats {
    /// Rows whose argmax logit is the label.
    pub correct: usize,
}

/// What both forms of the op share: the labels, `1 / T`, and what
/// forward leaves for the caller and for backward.
struct Rows {
    labels: Arc<Vec<u32>>,
    inv_t: f32,
    stats: Arc<Mutex<CrossEntropyStats>>,
    kept: KeptGrad,
}

impl Rows {
    /// Forward over `h` (`n × c`) through `head`: each row's negative
    /// log-probability, and `h`'s gradient kept where one is wanted.
    fn forward(&self, h: &[f32], head: Head, (n, c): (usize, usize), v: usize) -> Result<Vec<f32>> {
        if self.labels.len() != n {
            bail!(
                "linear cross-entropy: {n} rows, {} labels",
                self.labels.len()
            );
        }
        let mut dh = self.kept.buffer(n * c);
        let (nll, correct) = row_nll(h, head, (c, v), &self.labels, self.inv_t, dh.as_deref_mut())?;
        if let Ok(mut s) = self.stats.lock() {
            s.correct = correct;
        }
        self.kept.keep(dh);
        Ok(nll)
    }
}

/// `h`'s gradient for a gradient of 1 on every row, made by forward from
/// its own logits when `h` takes a gradient and the head does not
/// (backward then scales each row by its own), so each chunk's logits are
/// made once per step, not twice.
struct KeptGrad(Option<Mutex<Option<Vec<f32>>>>);

impl KeptGrad {
    fn new(wanted: bool) -> Self {
        Self(wanted.then(Mutex::default))
    }

    /// A zeroed `len`-value buffer for forward to fill, when wanted.
    fn buffer(&self, len: usize) -> Option<Vec<f32>> {
        self.0.as_ref().map(|_| zeros(len))
    }

    fn keep(&self, dh: Option<Vec<f32>>) {
        if let (Some(slot), Some(dh)) = (&self.0, dh)
            && let Ok(mut slot) = slot.lock()
        {
            *slot = Some(dh);
        }
    }

    /// The kept gradient, row `i` scaled by `g[i]` (once: a second
    /// backward of the same graph makes it again).
    fn take(&self, g: &[f32], c: usize) -> Option<Vec<f32>> {
        let mut dh = self.0.as_ref()?.lock().ok()?.take()?;
        dh.par_chunks_mut(c.max(1))
            .zip(g.par_iter())
            .for_each(|(row, &g)| scale(row, g));
        Some(dh)
    }
}

/// A frozen LM head as the fused loss reads it.
#[derive(Debug, Clone)]
pub enum FrozenHead {
    /// Packed once for bf16 products (a dense head: the fastest, at the
    /// cost of a bf16 copy of the head in both orientations).
    Packed(Arc<Bf16Weight>),
    /// Made into the products' operands as they run, no copy kept (a head
    /// in quantized blocks: each chunk's products dequantize it again).
    Weight(FrozenWeight),
}

impl FrozenHead {
    /// `(vocabulary, width)`.
    fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            FrozenHead::Packed(w) => (w.forward().n(), w.forward().k()),
            FrozenHead::Weight(w) => w.dims()?,
        })
    }

    fn head(&self) -> Head<'_> {
        match self {
            FrozenHead::Packed(w) => Head::Bf16(w),
            FrozenHead::Weight(w) => Head::Frozen(w),
        }
    }
}

/// The head's products: f32 `[V, C]` rows, the same rows rounded to bf16
/// in each product, a frozen head packed for bf16, or any frozen weight.
#[derive(Clone, Copy)]
enum Head<'a> {
    F32(&'a [f32]),
    DenseBf16(&'a [f32]),
    Bf16(&'a Bf16Weight),
    Frozen(&'a FrozenWeight),
}

impl Head<'_> {
    /// Logits of hidden rows `h` (`rows × c`) into `buf` (`rows × v`).
    fn logits(self, h: &[f32], c: usize, v: usize, buf: &mut [f32]) -> Result<()> {
        let rows = h.len() / c;
        match self {
            Head::F32(w) => matmul(
                rows,
                v,
                c,
                View::rows(h, c),
                View::rows(w, c).t(),
                Out::new(buf, v),
                true,
            ),
            Head::DenseBf16(w) => rounded_product_into(h, rows, w, (v, c), true, buf),
            Head::Bf16(w) => matmul_bf16(h, rows, w.forward(), buf),
            Head::Frozen(w) => w.product_into(h, true, buf)?,
        }
        Ok(())
    }

    /// `dh = P W` for `P` (`rows × v`) into `dh` (`rows × c`).
    fn input_grad(self, p: &[f32], c: usize, v: usize, dh: &mut [f32]) -> Result<()> {
        let rows = p.len() / v;
        match self {
            Head::F32(w) => matmul(
                rows,
                c,
                v,
                View::rows(p, v),
                View::rows(w, c),
                Out::new(dh, c),
                true,
            ),
            Head::DenseBf16(w) => rounded_product_into(p, rows, w, (v, c), false, dh),
            Head::Bf16(w) => matmul_bf16(p, rows, w.backward(), dh),
            Head::Frozen(w) => w.product_into(p, false, dh)?,
        }
        Ok(())
    }
}

/// Turns a row of logits (already divided by `T`) into
/// `(softmax − onehot(label)) · g` in place, given its maximum `m` and
/// `Σ exp(x − m)` already written over it.
fn into_grad(row: &mut [f32], label: usize, sum: f32, g: f32) {
    scale(row, g / sum);
    row[label] -= g;
}

/// Each row's negative log-probability of its label in `h` (`n × c`)
/// through `head` at temperature `1 / inv_t`, and how many rows the
/// argmax got right, a chunk of logits at a time; with `dh` (`n × c`),
/// also each row's gradient with respect to `h` (for a gradient of 1 on
/// every row), from the same logits, so backward need not make them again.
fn row_nll(
    h: &[f32],
    head: Head,
    (c, v): (usize, usize),
    labels: &[u32],
    inv_t: f32,
    mut dh: Option<&mut [f32]>,
) -> Result<(Vec<f32>, usize)> {
    let n = labels.len();
    let (mut buf, mut nll) = (zeros(CHUNK.min(n) * v), vec![0f32; n]);
    let mut correct = 0usize;
    let grad = dh.is_some();
    for from in (0..n).step_by(CHUNK) {
        let to = (from + CHUNK).min(n);
        let buf = &mut buf[..(to - from) * v];
        head.logits(&h[from * c..to * c], c, v, buf)?;
        correct += buf
            .par_chunks_mut(v)
            .zip(labels[from..to].par_iter())
            .zip(nll[from..to].par_iter_mut())
            .map(|((row, &label), out)| {
                let label = label as usize;
                if inv_t != 1.0 {
                    scale(row, inv_t);
                }
                let picked = row[label];
                let m = max(row);
                let hit =
                    usize::from(picked >= m && row.iter().position(|&x| x == m) == Some(label));
                let sum = exp_shifted_sum(row, m);
                *out = (m as f64 + (sum as f64).ln() - picked as f64) as f32;
                if grad {
                    into_grad(row, label, sum, inv_t);
                }
                hit
            })
            .sum::<usize>();
        if let Some(dh) = dh.as_deref_mut() {
            head.input_grad(buf, c, v, &mut dh[from * c..to * c])?;
        }
    }
    Ok((nll, correct))
}

/// `dh` (`n × c`) of the rows' negative log-probabilities, row `i` taking
/// the gradient `g[i]`, chunk by chunk (logits recomputed, turned into
/// `P` in place); `each_chunk` also gets every chunk's `P` and hidden rows
/// (for a trainable head's gradient).
fn hidden_grad(
    h: &[f32],
    head: Head,
    (c, v): (usize, usize),
    labels: &[u32],
    inv_t: f32,
    g: &[f32],
    mut each_chunk: impl FnMut(&[f32], &[f32]),
) -> Result<Vec<f32>> {
    let n = labels.len();
    let (mut dh, mut buf) = (zeros(n * c), zeros(CHUNK.min(n) * v));
    for from in (0..n).step_by(CHUNK) {
        let to = (from + CHUNK).min(n);
        let buf = &mut buf[..(to - from) * v];
        let hc = &h[from * c..to * c];
        head.logits(hc, c, v, buf)?;
        buf.par_chunks_mut(v)
            .zip(labels[from..to].par_iter())
            .zip(g[from..to].par_iter())
            .for_each(|((row, &label), &g)| {
                if inv_t != 1.0 {
                    scale(row, inv_t);
                }
                let m = max(row);
                let sum = exp_shifted_sum(row, m);
                into_grad(row, label as usize, sum, g * inv_t);
            });
        head.input_grad(buf, c, v, &mut dh[from * c..to * c])?;
        each_chunk(buf, hc);
    }
    Ok(dh)
}

/// The rows' gradients as host values.
fn row_grads(grad: &Tensor) -> Result<Vec<f32>> {
    grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The op over a head that may be trainable (a second argument), its
/// products in f32 or (`bf16`) over bf16-rounded operands.
struct LinearNll {
    rows: Rows,
    bf16: bool,
}

impl LinearNll {
    fn head<'a>(&self, w: &'a [f32]) -> Head<'a> {
        if self.bf16 {
            Head::DenseBf16(w)
        } else {
            Head::F32(w)
        }
    }
}

impl CustomOp2 for LinearNll {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = slice(hs, hl, self.name())?;
        let w = slice(ws, wl, self.name())?;
        let (n, c) = hl.shape().dims2()?;
        let (v, wc) = wl.shape().dims2()?;
        if wc != c {
            bail!("linear cross-entropy: hidden {n}×{c}, head {v}×{wc}");
        }
        let nll = self.rows.forward(h, self.head(w), (n, c), v)?;
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = row_grads(grad)?;
        let (n, c) = h.dims2()?;
        let v = w.dim(0)?;
        let want_dw = w.track_op();
        if !want_dw && let Some(dh) = self.rows.kept.take(&g, c) {
            return Ok((Some(tensor(dh, (n, c))?), None));
        }
        let rows = &self.rows;
        let (dh, dw) = with_f32([h, w], self.name(), |[h, w]| {
            // f32: dW accumulates `Pᵀ h` chunk by chunk. bf16: `hᵀ P`
            // (`[C, V]`: the small operand transposed, not `P`) is summed
            // over chunks and transposed once at the end.
            let mut acc = vec![0f32; if want_dw { v * c } else { 0 }];
            let (mut first, mut part) = (true, Vec::new());
            let dh = hidden_grad(
                h,
                self.head(w),
                (c, v),
                &rows.labels,
                rows.inv_t,
                &g,
                |p, hc| {
                    if !want_dw {
                        return;
                    }
                    let m = hc.len() / c;
                    if self.bf16 {
                        let ht = transposed(hc, m, c);
                        if std::mem::take(&mut first) {
                            rounded_product_into(&ht, c, p, (m, v), false, &mut acc);
                        } else {
                            // One buffer for every later chunk's share.
                            part.resize(c * v, 0.0);
                            rounded_product_into(&ht, c, p, (m, v), false, &mut part);
                            acc.par_iter_mut()
                                .zip(part.par_iter())
                                .for_each(|(a, b)| *a += b);
                        }
                    } else {
                        matmul(
                            v,
                            c,
                            m,
                            View::rows(p, v).t(),
                            View::rows(hc, c),
                            Out::new(&mut acc, c).accumulate(),
                            true,
                        );
                    }
                },
            )?;
            let dw = want_dw.then(|| {
                if self.bf16 {
                    transposed(&acc, c, v)
                } else {
                    acc
                }
            });
            Ok((dh, dw))
        })?;
        Ok((
            Some(tensor(dh, (n, c))?),
            dw.map(|d| tensor(d, (v, c))).transpose()?,
        ))
    }
}

/// The op over a frozen head.
struct LinearNllFrozen {
    head: FrozenHead,
    rows: Rows,
}

impl CustomOp1 for LinearNllFrozen {
    fn name(&self) -> &'static str {
        "linear-cross-entropy-frozen"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = slice(hs, hl, self.name())?;
        let (n, c) = hl.shape().dims2()?;
        let (v, wc) = self.head.dims()?;
        if wc != c {
            bail!("linear cross-entropy: hidden {n}×{c}, head {v}×{wc}");
        }
        let nll = self.rows.forward(h, self.head.head(), (n, c), v)?;
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = row_grads(grad)?;
        let (n, c) = h.dims2()?;
        let (v, _) = self.head.dims()?;
        let rows = &self.rows;
        let dh = match rows.kept.take(&g, c) {
            Some(dh) => dh,
            None => with_f32([h], self.name(), |[h]| {
                hidden_grad(
                    h,
                    self.head.head(),
                    (c, v),
                    &rows.labels,
                    rows.inv_t,
                    &g,
                    |_, _| {},
                )
            })?,
        };
        Ok(Some(tensor(dh, (n, c))?))
    }
}

/// An LM head as the fused op takes it.
#[derive(Clone, Copy)]
pub enum LmHead<'a> {
    /// A dense `[V, C]` head, trainable or not (it gets a gradient when
    /// it is a variable).
    Weight(&'a Tensor),
    /// [`LmHead::Weight`] with every product (logits, `h`'s gradient and
    /// the head's) over bf16-rounded operands with f32 accumulation, the
    /// f32 rows rounded as each product reads them (a trained head in
    /// mixed precision: its master copy stays f32).
    WeightBf16(&'a Tensor),
    /// A frozen head: only `h` gets a gradient.
    Frozen(&'a FrozenHead),
}

/// Each row's negative log-probability of its label under
/// `softmax(h Wᵀ / temperature)` (`[N]`, f32), without storing the
/// logits; also how many rows the argmax got right. `h` gets a gradient,
/// and so does a trainable head; each row may take its own gradient
/// (a per-token weight, as DPO's and GRPO's losses give). With a bf16 head
/// (packed, or a frozen weight in bf16) the logits and `h`'s gradient are
/// bf16 products with f32 accumulation; the softmax stays in f32. Over a
/// frozen head, when `h` takes a gradient, forward makes it too from the
/// same logits (two products of the head per step instead of three), and
/// backward scales its rows.
pub fn linear_token_nll(
    h: &Tensor,
    head: LmHead,
    labels: &[u32],
    temperature: f64,
) -> Result<(Tensor, usize)> {
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("temperature {temperature} is not a positive number");
    }
    let v = match head {
        LmHead::Weight(w) | LmHead::WeightBf16(w) => w.dim(0)?,
        LmHead::Frozen(f) => f.dims()?.0,
    };
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= v) {
        bail!("label {bad} is outside the vocabulary ({v})");
    }
    let stats = Arc::new(Mutex::new(CrossEntropyStats::default()));
    let rows = |kept| Rows {
        labels: Arc::new(labels.to_vec()),
        inv_t: (1.0 / temperature) as f32,
        stats: stats.clone(),
        kept: KeptGrad::new(kept),
    };
    let h = h.contiguous()?;
    let nll = match head {
        LmHead::Weight(w) | LmHead::WeightBf16(w) => {
            let op = LinearNll {
                rows: rows(h.track_op() && !w.track_op()),
                bf16: matches!(head, LmHead::WeightBf16(_)),
            };
            h.apply_op2(&w.contiguous()?, op)?
        }
        LmHead::Frozen(f) => h.apply_op1(LinearNllFrozen {
            head: f.clone(),
            rows: rows(h.track_op()),
        })?,
    };
    let correct = stats.lock().map(|s| s.correct).unwrap_or(0);
    Ok((nll, correct))
}

/// Sum over rows of `h` (`[N, C]`) of the cross-entropy of `h Wᵀ` (`W`:
/// `[V, C]`) against `labels`, without storing the logits; also how many
/// rows the argmax got right. `h` gets a gradient, and so does `W` when it
/// is trainable.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, labels: &[u32]) -> Result<(Tensor, usize)> {
    let (nll, correct) = linear_token_nll(h, LmHead::Weight(w), labels, 1.0)?;
    Ok((nll.sum_all()?, correct))
}

/// [`linear_cross_entropy`] for a frozen head (see [`linear_token_nll`]).
pub fn linear_cross_entropy_frozen(
    h: &Tensor,
    head: &FrozenHead,
    labels: &[u32],
) -> Result<(Tensor, usize)> {
    let (nll, correct) = linear_token_nll(h, LmHead::Frozen(head), labels, 1.0)?;
    Ok((nll.sum_all()?, correct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tensor;
    use crate::testing::{assert_close, grads, max_abs, max_abs_diff, quant_matrices, random};
    use candle_core::{D, Device};

    fn composed(h: &Tensor, w: &Tensor, labels: &[u32]) -> Tensor {
        composed_rows(h, w, labels, 1.0).sum_all().unwrap()
    }

    #[test]
    fn matches_composed_with_and_without_head_gradient() {
        // 300 rows: two chunks, the second partial.
        let (n, c, v) = (300, 12, 37);
        let h = random(&[n, c], 1, 1.0);
        let w = random(&[v, c], 2, 1.0);
        let labels: Vec<u32> = (0..n).map(|i| ((i * 7) % v) as u32).collect();
        let (fused, correct) = linear_cross_entropy(&h, &w, &labels).unwrap();
        assert_close(&fused, &composed(&h, &w, &labels), 1e-5, "loss");
        let logits = h.matmul(&w.t().unwrap()).unwrap();
        let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(
            correct,
            argmax.iter().zip(&labels).filter(|(a, b)| a == b).count()
        );
        let f = |a: &[Tensor]| linear_cross_entropy(&a[0], &a[1], &labels)?.0.unsqueeze(0);
        let r = |a: &[Tensor]| composed(&a[0], &a[1], &labels).unsqueeze(0);
        let gf = grads(&[h.clone(), w.clone()], &f);
        let gr = grads(&[h.clone(), w.clone()], &r);
        assert_close(&gf[0], &gr[0], 1e-4, "dh");
        assert_close(&gf[1], &gr[1], 1e-4, "dW");
        // A frozen head: the hidden gradient alone, the same values.
        let hv = candle_core::Var::from_tensor(&h).unwrap();
        let (loss, _) = linear_cross_entropy(hv.as_tensor(), &w, &labels).unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(&w).is_none());
        let dh = g.get(hv.as_tensor()).unwrap();
        let scale = random(&[1], 99, 1.0).to_vec1::<f32>().unwrap()[0];
        assert_close(&(dh * scale as f64).unwrap(), &gf[0], 1e-4, "frozen dh");
    }

    #[test]
    fn a_bf16_head_gives_the_f32_loss_and_gradient_to_bf16_precision() {
        let (n, c, v) = (300, 40, 70);
        let h = random(&[n, c], 3, 1.0);
        let w = random(&[v, c], 4, 1.0);
        let labels: Vec<u32> = (0..n).map(|i| ((i * 11) % v) as u32).collect();
        let packed = FrozenHead::Packed(Arc::new(Bf16Weight::new(&w).unwrap()));
        let hv = candle_core::Var::from_tensor(&h).unwrap();
        let (loss, _) = linear_cross_entropy_frozen(hv.as_tensor(), &packed, &labels).unwrap();
        let (want, _) = linear_cross_entropy(&h, &w, &labels).unwrap();
        let (l, lw) = (
            loss.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap(),
        );
        assert!(l != lw && ((l - lw) / lw).abs() < 1e-2, "loss {l} vs {lw}");
        let dh = loss.backward().unwrap();
        let dh = dh.get(hv.as_tensor()).unwrap();
        let hw = candle_core::Var::from_tensor(&h).unwrap();
        let (want, _) = linear_cross_entropy(hw.as_tensor(), &w, &labels).unwrap();
        let want_dh = want.backward().unwrap();
        let want_dh = want_dh.get(hw.as_tensor()).unwrap();
        let err = (dh - want_dh).unwrap().abs().unwrap().max_all().unwrap();
        let size = want_dh.abs().unwrap().max_all().unwrap();
        let rel = (err / size).unwrap().to_scalar::<f32>().unwrap();
        assert!(rel < 2e-2, "dh relative error {rel}");
        assert!(linear_cross_entropy_frozen(&h, &packed, &[v as u32]).is_err());
    }

    #[test]
    fn a_trained_bf16_head_multiplies_rounded_operands() {
        use candle_core::{DType, Var};
        // Two chunks, the second partial; both the head and `h` trained.
        let (n, c, v) = (CHUNK + 44, 40, 70);
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let h = Var::from_tensor(&random(&[n, c], 6, 1.0)).unwrap();
        let w = Var::from_tensor(&random(&[v, c], 7, 1.0)).unwrap();
        let labels: Vec<u32> = (0..n).map(|i| ((i * 13) % v) as u32).collect();
        let (loss, correct) = linear_token_nll(
            h.as_tensor(),
            LmHead::WeightBf16(w.as_tensor()),
            &labels,
            1.0,
        )
        .unwrap();
        let loss = loss.sum_all().unwrap();
        let g = loss.backward().unwrap();
        // The reference over the rounded operands: logits, then
        // `P = softmax − onehot` rounded in turn for both gradients.
        let (rh, rw) = (round(h.as_tensor()), round(w.as_tensor()));
        let want = composed(&rh, &rw, &labels);
        let logits = rh.matmul(&rw.t().unwrap()).unwrap();
        let max = logits.max_keepdim(D::Minus1).unwrap();
        let e = logits.broadcast_sub(&max).unwrap().exp().unwrap();
        let soft = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let p = round(&(soft - one_hot(&labels, v)).unwrap());
        let want_dh = p.matmul(&rw).unwrap();
        let want_dw = p.t().unwrap().matmul(&rh).unwrap();
        assert_close(&loss, &want, 1e-5, "loss");
        // `P` from softmaxes a few ulps apart may round to neighbouring
        // bf16 values (2^-8 apart) here and there.
        assert_close(g.get(h.as_tensor()).unwrap(), &want_dh, 1e-4, "dh");
        assert_close(g.get(w.as_tensor()).unwrap(), &want_dw, 1e-4, "dW");
        let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(
            correct,
            argmax.iter().zip(&labels).filter(|(a, b)| a == b).count()
        );
        // And the f32 head gives other numbers (bf16 is in force).
        let (f32_loss, _) = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &labels).unwrap();
        assert!(max_abs_diff(&f32_loss, &loss) > 1e-4);
    }

    /// `[N, V]` rows with a 1 at each label.
    fn one_hot(labels: &[u32], v: usize) -> Tensor {
        let mut data = vec![0f32; labels.len() * v];
        for (i, &l) in labels.iter().enumerate() {
            data[i * v + l as usize] = 1.0;
        }
        Tensor::from_vec(data, (labels.len(), v), &Device::Cpu).unwrap()
    }

    /// The loss and `h`'s gradient through `head`.
    fn loss_and_grad(h: &Tensor, head: &FrozenHead, labels: &[u32]) -> (f32, Tensor) {
        let hv = candle_core::Var::from_tensor(h).unwrap();
        let (loss, _) = linear_cross_entropy_frozen(hv.as_tensor(), head, labels).unwrap();
        let g = loss.backward().unwrap();
        let dh = g.get(hv.as_tensor()).unwrap().clone();
        (loss.to_scalar::<f32>().unwrap(), dh)
    }

    #[test]
    fn a_head_made_on_the_fly_gives_the_packed_head_results() {
        // More rows than one chunk; a head in quantized blocks (made into
        // operands per product) against its dequantized values packed, and
        // a dense head either way.
        let (n, c) = (CHUNK + 44, 64);
        let h = random(&[n, c], 5, 1.0);
        for q in quant_matrices(96, c) {
            let v = q.rows();
            let labels: Vec<u32> = (0..n).map(|i| ((i * 7) % v) as u32).collect();
            let dense = tensor(q.dequantize(), (v, c)).unwrap();
            let packed = FrozenHead::Packed(Arc::new(Bf16Weight::new(&dense).unwrap()));
            let (want, want_dh) = loss_and_grad(&h, &packed, &labels);
            for head in [
                FrozenWeight::QuantBf16(q.clone()),
                FrozenWeight::DenseBf16(dense.clone()),
            ] {
                let (loss, dh) = loss_and_grad(&h, &FrozenHead::Weight(head), &labels);
                assert!((loss - want).abs() <= 1e-5 * want.abs(), "{loss} vs {want}");
                assert!(max_abs_diff(&dh, &want_dh) <= 1e-6 * max_abs(&want_dh).max(1.0));
            }
            // In f32 the blocks give the dense f32 head's loss.
            let (f32_loss, _) = linear_cross_entropy(&h, &dense, &labels).unwrap();
            let (loss, _) =
                loss_and_grad(&h, &FrozenHead::Weight(FrozenWeight::QuantF32(q)), &labels);
            let f32_loss = f32_loss.to_scalar::<f32>().unwrap();
            assert!((loss - f32_loss).abs() <= 1e-5 * f32_loss.abs());
        }
    }

    #[test]
    fn the_gradient_made_in_forward_equals_the_one_made_in_backward() {
        // Forward keeps `h`'s gradient for a loss gradient of 1 and backward
        // scales it; a second backward of the same graph finds none kept
        // and makes it from the logits again. Both, for a loss gradient
        // other than 1, equal the dense op's (made in backward).
        let (n, c, v) = (CHUNK + 44, 24, 53);
        let h = random(&[n, c], 7, 1.0);
        let w = random(&[v, c], 8, 1.0);
        let labels: Vec<u32> = (0..n).map(|i| ((i * 5) % v) as u32).collect();
        let head = FrozenHead::Weight(FrozenWeight::Dense(w.clone()));
        let hv = candle_core::Var::from_tensor(&h).unwrap();
        let (loss, _) = linear_cross_entropy_frozen(hv.as_tensor(), &head, &labels).unwrap();
        let scaled = (loss * 0.37).unwrap();
        let first = scaled
            .backward()
            .unwrap()
            .get(hv.as_tensor())
            .unwrap()
            .clone();
        let again = scaled
            .backward()
            .unwrap()
            .get(hv.as_tensor())
            .unwrap()
            .clone();
        let hw = candle_core::Var::from_tensor(&h).unwrap();
        let (want, _) = linear_cross_entropy(hw.as_tensor(), &w, &labels).unwrap();
        let want = (want * 0.37).unwrap().backward().unwrap();
        let want = want.get(hw.as_tensor()).unwrap();
        assert_close(&first, want, 1e-5, "kept from forward");
        assert_close(&again, want, 1e-5, "made in backward");
    }

    /// Each row's `−log softmax(h Wᵀ / t)[label]`, composed.
    fn composed_rows(h: &Tensor, w: &Tensor, labels: &[u32], t: f64) -> Tensor {
        let logits = (h.matmul(&w.t().unwrap()).unwrap() / t).unwrap();
        let lse = logits
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let l = Tensor::new(labels, &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let picked = logits.gather(&l, D::Minus1).unwrap();
        (lse - picked).unwrap().squeeze(1).unwrap()
    }

    #[test]
    fn per_row_values_and_gradients_at_a_temperature_match_composed() {
        // Two chunks; every row takes its own gradient (the weighted sum in
        // `grads`), with the head trainable and frozen, at T = 0.7 and 1.
        let (n, c, v) = (CHUNK + 20, 16, 41);
        let h = random(&[n, c], 11, 1.0);
        let w = random(&[v, c], 12, 1.0);
        let labels: Vec<u32> = (0..n).map(|i| ((i * 13) % v) as u32).collect();
        for t in [0.7, 1.0] {
            let (rows, _) = linear_token_nll(&h, LmHead::Weight(&w), &labels, t).unwrap();
            assert_close(&rows, &composed_rows(&h, &w, &labels, t), 1e-5, "rows");
            let f =
                |a: &[Tensor]| Ok(linear_token_nll(&a[0], LmHead::Weight(&a[1]), &labels, t)?.0);
            let r = |a: &[Tensor]| Ok(composed_rows(&a[0], &a[1], &labels, t));
            let gf = grads(&[h.clone(), w.clone()], &f);
            let gr = grads(&[h.clone(), w.clone()], &r);
            assert_close(&gf[0], &gr[0], 1e-4, "dh");
            assert_close(&gf[1], &gr[1], 1e-4, "dW");
            // Frozen: the gradient forward keeps, scaled row by row, and
            // a dense head taken as a frozen weight.
            let frozen = FrozenHead::Weight(FrozenWeight::Dense(w.clone()));
            let f =
                |a: &[Tensor]| Ok(linear_token_nll(&a[0], LmHead::Frozen(&frozen), &labels, t)?.0);
            let g = grads(std::slice::from_ref(&h), &f);
            assert_close(&g[0], &gr[0], 1e-4, "frozen dh");
            let f = |a: &[Tensor]| Ok(linear_token_nll(&a[0], LmHead::Weight(&w), &labels, t)?.0);
            let g = grads(std::slice::from_ref(&h), &f);
            assert_close(&g[0], &gr[0], 1e-4, "kept dh");
        }
        assert!(linear_token_nll(&h, LmHead::Weight(&w), &labels, 0.0).is_err());
    }

    #[test]
    fn rejects_a_label_outside_the_vocabulary() {
        let h = random(&[2, 3], 1, 1.0);
        let w = random(&[4, 3], 2, 1.0);
        assert!(linear_cross_entropy(&h, &w, &[1, 4]).is_err());
    }
}
