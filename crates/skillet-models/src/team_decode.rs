//! An incremental call (a decode step of one or a few sequences) run from
//! the first layer to the logits by one team of threads
//! (`skillet_kernels::team`): every member takes its share of each
//! quantized product, the lead alone the short stretches between them
//! (norms, RoPE, writing the cache, residual adds), and the members meet at
//! a barrier between phases. One hand-off per call instead of several per
//! layer, and plain buffers instead of a tensor per op.
//!
//! The numbers are the layer-by-layer path's, bit for bit: the same
//! kernels on the same rows in the same order (the team only decides which
//! thread computes which output rows). Taken where every layer is a Llama
//! block over Q4_1 / Q8_0 / NF4 blocks without bias, no adapter touches
//! the call and it brings few rows; anything else runs layer by layer.
//!
//! Notation: N new tokens, C model width, H query heads, K key/value
//! heads, D head width.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use skillet_kernels::team::{self, Aborted, Member};
use skillet_kernels::{
    CachedAttention, CachedSeq, Pieces, PreparedInput, QuantMatrix, RopeLayout, RopeTable,
    rms_norm_rows, rms_norm_rows_into, rope_rows, swiglu_rows,
};

use crate::cache::KvCache;
use crate::layers::{Attention, RmsNorm, Span};
use crate::{ModelError, Result};

/// The most new tokens a call may bring to run in a team: a decode step
/// of up to 16 sequences. Longer prompts keep the layer-by-layer path,
/// whose products balance many tasks over the threads.
pub(crate) const TEAM_ROWS: usize = 16;

/// A layer's parts as the team runs them.
pub(crate) struct DecodeLayer<'a> {
    pub input_norm: &'a RmsNorm,
    pub post_norm: &'a RmsNorm,
    pub attn: &'a Attention,
    pub qkv: [&'a QuantMatrix; 3],
    pub o: &'a QuantMatrix,
    pub gate_up: [&'a QuantMatrix; 2],
    pub down: &'a QuantMatrix,
}

/// What a call brings.
pub(crate) struct DecodeInput<'a> {
    pub layers: Vec<DecodeLayer<'a>>,
    /// The embedded new tokens, `[N, C]`.
    pub x: Vec<f32>,
    /// One table per RoPE of the model, N rows each.
    pub ropes: &'a [RopeTable],
    pub spans: &'a [Span],
    /// The rows whose logits are wanted.
    pub last: &'a [u32],
    pub norm: &'a RmsNorm,
    /// The LM head where it is quantized blocks (else the caller applies
    /// it to [`DecodeOutput::hidden`]).
    pub head: Option<&'a QuantMatrix>,
    /// Quantized products take inputs rounded to 8-bit integers.
    pub int8: bool,
}

/// What the call gives back.
pub(crate) struct DecodeOutput {
    /// The final norm of the `last` rows, `[last, C]`.
    pub hidden: Vec<f32>,
    /// Their logits (`[last, V]`) where the head ran in the team.
    pub logits: Option<Vec<f32>>,
}

/// Why a member stopped.
enum Stop {
    /// Another member failed first.
    Aborted,
    Failed(ModelError),
}

impl From<Aborted> for Stop {
    fn from(_: Aborted) -> Self {
        Stop::Aborted
    }
}

impl From<ModelError> for Stop {
    fn from(e: ModelError) -> Self {
        Stop::Failed(e)
    }
}

impl From<candle_core::Error> for Stop {
    fn from(e: candle_core::Error) -> Self {
        Stop::Failed(e.into())
    }
}

/// What the members share. A lock is only ever held between two barriers,
/// never across one.
struct Shared<'c> {
    /// The input of the current product pass.
    input: RwLock<Option<PreparedInput>>,
    /// Where the current pass's next piece starts (see
    /// [`QuantMatrix::claim`]).
    next: AtomicUsize,
    /// The current layer's rotated queries, `[N, H, D]`.
    q: RwLock<Vec<f32>>,
    cache: RwLock<&'c mut KvCache>,
    /// Each member's attention results.
    shares: Vec<Mutex<Vec<f32>>>,
    /// Each member's pieces of the current product pass.
    pieces: Vec<Mutex<Pieces>>,
}

/// Runs the call on `threads` members (the caller among them).
pub(crate) fn decode(d: &DecodeInput, cache: &mut KvCache, threads: usize) -> Result<DecodeOutput> {
    for l in &d.layers {
        for w in l
            .qkv
            .iter()
            .chain([&l.o])
            .chain(&l.gate_up)
            .chain([&l.down])
        {
            w.ready(d.int8, d.x.len() / d.norm_width());
        }
    }
    if let Some(head) = d.head {
        head.ready(d.int8, d.last.len());
    }
    let norms = d
        .layers
        .iter()
        .map(|l| Ok((l.input_norm.values()?, l.post_norm.values()?)))
        .collect::<Result<Vec<_>>>()?;
    let final_norm = d.norm.values()?;
    let shared = Shared {
        input: RwLock::new(None),
        next: AtomicUsize::new(0),
        q: RwLock::new(Vec::new()),
        cache: RwLock::new(cache),
        shares: (0..threads.max(1))
            .map(|_| Mutex::new(Vec::new()))
            .collect(),
        pieces: (0..threads.max(1))
            .map(|_| Mutex::new(Pieces::default()))
            .collect(),
    };
    let results = team::run(threads, |m| member(m, &shared, d, &norms, &final_norm));
    let mut out = None;
    let mut error = None;
    for r in results {
        match r {
            Ok(Some(o)) => out = Some(o),
            Ok(None) | Err(Stop::Aborted) => {}
            Err(Stop::Failed(e)) => {
                error.get_or_insert(e);
            }
        }
    }
    match (error, out) {
        (Some(e), _) => Err(e),
        (None, Some(o)) => Ok(o),
        (None, None) => Err(ModelError::Input("the decode team stopped".into())),
    }
}

/// One member's run; the lead's gives the output.
fn member(
    m: &Member,
    s: &Shared,
    d: &DecodeInput,
    norms: &[(Vec<f32>, Vec<f32>)],
    final_norm: &[f32],
) -> std::result::Result<Option<DecodeOutput>, Stop> {
    let lead = m.is_lead();
    let c = d.norm_width();
    let n = d.x.len() / c;
    let mut x = if lead { d.x.clone() } else { Vec::new() }; // [N,C]
    // The lead's buffers, kept from pass to pass: a pass's products, and a
    // norm's or the attention's output.
    let mut ys: Vec<Vec<f32>> = Vec::new();
    let mut out = Vec::new();
    for (li, (l, (w_in, w_post))) in d.layers.iter().zip(norms).enumerate() {
        let a = l.attn;
        let (h, k, hd) = (a.heads, a.kv_heads, a.head_dim);
        if lead {
            rms_norm_rows_into(&x, w_in, l.input_norm.eps, &mut out);
            s.set_input(&out, c, d.int8);
        }
        if s.pass(m, &l.qkv, &mut ys)? {
            let (q, kk, v) = (&ys[0], &ys[1], &ys[2]);
            let rope = &d.ropes[a.kind.rope];
            let q = rope_rows(q, h, rope, RopeLayout::Half)?; // [N,H,D]
            let kk = rope_rows(kk, k, rope, RopeLayout::Half)?; // [N,K,D]
            let mut cache = s.cache.write().expect("no member panicked holding it");
            let mut row = 0;
            for sp in d.spans {
                let r = row * k * hd..(row + sp.len) * k * hd;
                cache.write(li, sp.slot, sp.start, &kk[r.clone()], &v[r]);
                row += sp.len;
            }
            *s.q.write().expect("no member panicked holding it") = q;
        }
        m.sync()?;
        // Attention: tasks dealt to the members in turn.
        {
            let cache = s.cache.read().expect("no member panicked holding it");
            let seqs = cached_seqs(&cache, li, d.spans);
            let plan = CachedAttention::new((n, h, hd), k, &seqs, a.kind.window, a.kind.scale)?;
            let q = s.q.read().expect("no member panicked holding it");
            let mut part = s.shares[m.index()]
                .lock()
                .expect("no member panicked holding it");
            part.clear();
            for t in (m.index()..plan.tasks()).step_by(m.members()) {
                part.extend(plan.run(t, &q));
            }
        }
        m.sync()?;
        if lead {
            let cache = s.cache.read().expect("no member panicked holding it");
            let seqs = cached_seqs(&cache, li, d.spans);
            let plan = CachedAttention::new((n, h, hd), k, &seqs, a.kind.window, a.kind.scale)?;
            out.clear();
            out.resize(n * h * hd, 0.0); // [N,H,D]
            for (i, share) in s.shares.iter().enumerate() {
                let share = share.lock().expect("no member panicked holding it");
                let mut at = 0;
                for t in (i..plan.tasks()).step_by(m.members()) {
                    let len = plan.task_len(t);
                    plan.place(t, &share[at..at + len], &mut out);
                    at += len;
                }
            }
            s.set_input(&out, h * hd, d.int8);
        }
        if s.pass(m, &[l.o], &mut ys)? {
            add_in(&mut x, &ys[0]);
            rms_norm_rows_into(&x, w_post, l.post_norm.eps, &mut out);
            s.set_input(&out, c, d.int8);
        }
        if s.pass(m, &l.gate_up, &mut ys)? {
            let act = swiglu_rows(&ys[0], &ys[1]);
            s.set_input(&act, act.len() / n, d.int8);
        }
        if s.pass(m, &[l.down], &mut ys)? {
            add_in(&mut x, &ys[0]);
        }
    }
    // The final norm of the rows whose logits are wanted, then the head.
    let hidden = if lead {
        let picked: Vec<f32> = d
            .last
            .iter()
            .flat_map(|&r| x[r as usize * c..(r as usize + 1) * c].iter().copied())
            .collect();
        let hidden = rms_norm_rows(&picked, final_norm, d.norm.eps);
        if d.head.is_some() {
            s.set_input(&hidden, c, d.int8);
        }
        hidden
    } else {
        Vec::new()
    };
    let logits = match d.head {
        Some(head) => match s.pass(m, &[head], &mut ys)? {
            true => ys.pop(),
            false => None,
        },
        None => None,
    };
    Ok(lead.then_some(DecodeOutput { hidden, logits }))
}

impl Shared<'_> {
    /// Sets the next pass's input (the lead, between barriers, after
    /// every member has finished the pass before), in the last one's room.
    fn set_input(&self, x: &[f32], cols: usize, int8: bool) {
        let mut input = self.input.write().expect("no member panicked holding it");
        match input.as_mut() {
            Some(input) => input.refill(x, cols, int8),
            None => *input = Some(PreparedInput::new(x, cols, int8)),
        }
        self.next.store(0, Ordering::Relaxed);
    }

    /// One pass of products over the input the lead set: every member
    /// takes pieces until none are left, and the lead gets the products
    /// in `ys` (one per weight) and `true`.
    fn pass(
        &self,
        m: &Member,
        ws: &[&QuantMatrix],
        ys: &mut Vec<Vec<f32>>,
    ) -> std::result::Result<bool, Stop> {
        m.sync()?;
        {
            let input = self.input.read().expect("no member panicked holding it");
            let input = input.as_ref().expect("the lead set the input");
            let mut pieces = self.pieces[m.index()]
                .lock()
                .expect("no member panicked holding it");
            QuantMatrix::claim(ws, input, &self.next, m.members(), &mut pieces)?;
        }
        m.sync()?;
        if !m.is_lead() {
            return Ok(false);
        }
        let input = self.input.read().expect("no member panicked holding it");
        let input = input.as_ref().expect("the lead set the input");
        let pieces: Vec<_> = self
            .pieces
            .iter()
            .map(|s| s.lock().expect("no member panicked holding it"))
            .collect();
        let views: Vec<&Pieces> = pieces.iter().map(|g| &**g).collect();
        QuantMatrix::gather(ws, input, &views, ys);
        Ok(true)
    }
}

impl DecodeInput<'_> {
    fn norm_width(&self) -> usize {
        self.norm.weight.elem_count()
    }
}

/// The caches of `spans` in `layer`.
fn cached_seqs<'a>(cache: &'a KvCache, layer: usize, spans: &[Span]) -> Vec<CachedSeq<'a>> {
    spans
        .iter()
        .map(|sp| {
            let (k, v) = cache.layer(layer, sp.slot);
            CachedSeq {
                k,
                v,
                start: sp.start,
                len: sp.len,
            }
        })
        .collect()
}

/// `x += y`, as the layer-by-layer path's residual adds.
fn add_in(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

#[cfg(test)]
mod tests {
    use skillet_gguf::GgmlType;

    use crate::export::write_gguf;
    use crate::layers::Span;
    use crate::{
        Activations, CachedBatch, CachedChunk, CausalLm, LoadOptions, Model, ModelSource,
        random_weights, tiny_config,
    };

    fn quantized(ty: GgmlType) -> Model {
        let cfg = tiny_config(97);
        let w = random_weights(&cfg, 7).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&cfg, &w, &path, &|_| ty, vec![]).unwrap();
        ModelSource::open(&path)
            .unwrap()
            .load_model(LoadOptions {
                keep_quantized: true,
                ..Default::default()
            })
            .unwrap()
    }

    #[test]
    fn the_team_runs_a_decode_step_to_the_layer_by_layer_bits() {
        let prompt = [5u32, 9, 13, 2, 77];
        for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
            let mut m = quantized(ty);
            for activations in [Activations::F32, Activations::Int8] {
                // The prompt layer by layer, into both caches.
                m.set_team_decode(false);
                let mut team_cache = m.new_cache(1, 16);
                let mut layered_cache = m.new_cache(1, 16);
                for cache in [&mut team_cache, &mut layered_cache] {
                    let batch = CachedBatch {
                        chunks: vec![CachedChunk {
                            slot: 0,
                            tokens: prompt.to_vec(),
                            adapter: None,
                        }],
                        adapters: vec![],
                        activations,
                    };
                    m.forward_cached(&batch, cache).unwrap();
                }
                // One new token: by the team (called directly, so it is
                // known to run), and layer by layer.
                let start = team_cache.reserve(0, 1).unwrap();
                let spans = [Span {
                    slot: 0,
                    start,
                    len: 1,
                }];
                m.set_team_decode(true);
                let team = m
                    .team_call(
                        &[41],
                        &[start as u32],
                        &spans,
                        &[0],
                        &mut team_cache,
                        activations,
                    )
                    .unwrap()
                    .expect("the tiny quantized Llama runs in a team");
                m.set_team_decode(false);
                let layered = m
                    .forward_cached(
                        &CachedBatch {
                            chunks: vec![CachedChunk {
                                slot: 0,
                                tokens: vec![41],
                                adapter: None,
                            }],
                            adapters: vec![],
                            activations,
                        },
                        &mut layered_cache,
                    )
                    .unwrap();
                let (team, layered): (Vec<f32>, Vec<f32>) = (
                    team.flatten_all().unwrap().to_vec1().unwrap(),
                    layered.flatten_all().unwrap().to_vec1().unwrap(),
                );
                assert_eq!(team, layered, "{ty:?}, {activations:?}");
                assert_eq!(team_cache.len(0), layered_cache.len(0));
            }
        }
    }
}
