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
//! (QK-norms included) or Gemma 3 block over quantized blocks without
//! bias, no adapter touches the call and it brings few rows; anything else
//! runs layer by layer.
//!
//! Notation: N new tokens, C model width, H query heads, K key/value
//! heads, D head width.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use skillet_kernels::team::{self, Aborted, Member};
use skillet_kernels::{
    CachedAttention, CachedSeq, InputRounding, Pieces, PreparedInput, QuantMatrix, RopeLayout,
    RopeTable, geglu_rows, rms_norm_rows, rms_norm_rows_into, rope_rows, round_inputs, swiglu_rows,
};

use crate::cache::KvCache;
use crate::layers::{Attention, Mlp, RmsNorm, Span};
use crate::{Activation, ModelError, Result};

/// The most new tokens a call may bring to run in a team: a decode step
/// of up to 16 sequences. Longer prompts keep the layer-by-layer path,
/// whose products balance many tasks over the threads.
pub(crate) const TEAM_ROWS: usize = 16;

/// A layer's parts as the team runs them: `x += out_norm(attn(norm(x)))`,
/// then `x += out_norm(mlp(norm(x)))`, where only Gemma 3 has the norms
/// of the outputs. The attention's QK-norms are its own.
pub(crate) struct DecodeLayer<'a> {
    pub input_norm: &'a RmsNorm,
    pub attn: &'a Attention,
    pub qkv: [&'a QuantMatrix; 3],
    pub o: &'a QuantMatrix,
    pub attn_out_norm: Option<&'a RmsNorm>,
    pub mlp_norm: &'a RmsNorm,
    pub gate_up: [&'a QuantMatrix; 2],
    pub down: &'a QuantMatrix,
    pub act: Activation,
    pub mlp_out_norm: Option<&'a RmsNorm>,
}

/// How a pass's input is prepared, as the layer-by-layer path's products
/// take it for the pass's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputMode {
    F32,
    /// Rounded to 8-bit integers per 32 values: the weights' own integer
    /// products.
    Int8,
    /// Rounded per 256 values (llama.cpp's Q8_K), then multiplied in f32:
    /// the K-quants' int8 products.
    K8,
}

impl InputMode {
    /// The mode of `w`'s product, with integer inputs asked for or not.
    pub(crate) fn of(w: &QuantMatrix, int8: bool) -> Self {
        match (int8, w.native_int8(), w.read_from_k_quant()) {
            (true, true, _) => InputMode::Int8,
            (true, false, true) => InputMode::K8,
            // f32, or NF4, whose products always take f32 inputs.
            _ => InputMode::F32,
        }
    }

    /// The one mode of a pass's weights, or `None` where they differ (the
    /// call then runs layer by layer).
    pub(crate) fn of_pass(ws: &[&QuantMatrix], int8: bool) -> Option<Self> {
        let first = Self::of(ws.first()?, int8);
        ws.iter()
            .all(|w| Self::of(w, int8) == first)
            .then_some(first)
    }
}

impl<'a> DecodeLayer<'a> {
    /// A layer with the norms before its attention and its MLP, and
    /// (Gemma 3) of their outputs, where all seven projections are
    /// quantized blocks without bias.
    pub(crate) fn new(
        [input_norm, mlp_norm]: [&'a RmsNorm; 2],
        attn: &'a Attention,
        mlp: &'a Mlp,
        out_norms: Option<[&'a RmsNorm; 2]>,
    ) -> Option<Self> {
        let (qkv, o) = attn.blocks()?;
        let (gate_up, down) = mlp.blocks()?;
        Some(Self {
            input_norm,
            attn,
            qkv,
            o,
            attn_out_norm: out_norms.map(|[a, _]| a),
            mlp_norm,
            gate_up,
            down,
            act: mlp.act,
            mlp_out_norm: out_norms.map(|[_, m]| m),
        })
    }

    /// The layer's passes of products, in order.
    pub(crate) fn passes(&self) -> [&[&QuantMatrix]; 4] {
        [
            &self.qkv[..],
            std::slice::from_ref(&self.o),
            &self.gate_up[..],
            std::slice::from_ref(&self.down),
        ]
    }
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
    /// Each layer's passes' input modes ([`DecodeLayer::passes`] order),
    /// as the layer-by-layer path's products take them for their weights.
    pub modes: Vec<[InputMode; 4]>,
    /// The head's, where it runs in the team.
    pub head_mode: InputMode,
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
    for (l, modes) in d.layers.iter().zip(&d.modes) {
        for (ws, &mode) in l.passes().into_iter().zip(modes) {
            for w in ws {
                w.ready(mode == InputMode::Int8, d.x.len() / d.norm_width());
            }
        }
    }
    if let Some(head) = d.head {
        head.ready(d.head_mode == InputMode::Int8, d.last.len());
    }
    let some = |n: Option<&RmsNorm>| n.map(Norm::of).transpose();
    let norms = d
        .layers
        .iter()
        .map(|l| {
            Ok(LayerNorms {
                input: Norm::of(l.input_norm)?,
                q: some(l.attn.q_norm.as_ref())?,
                k: some(l.attn.k_norm.as_ref())?,
                attn_out: some(l.attn_out_norm)?,
                mlp: Norm::of(l.mlp_norm)?,
                mlp_out: some(l.mlp_out_norm)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let final_norm = Norm::of(d.norm)?;
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
    let plan = Plan {
        norms: &norms,
        final_norm: &final_norm,
    };
    let results = team::run(threads, |m| member(m, &shared, d, &plan));
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

/// An RMSNorm's weight as the norm multiplies by it, and its epsilon.
struct Norm {
    w: Vec<f32>,
    eps: f64,
}

impl Norm {
    fn of(n: &RmsNorm) -> Result<Self> {
        Ok(Self {
            w: n.values()?,
            eps: n.eps,
        })
    }

    /// The norm of each row of `x` (rows as wide as the weight) into `y`.
    fn rows_into(&self, x: &[f32], y: &mut Vec<f32>) {
        rms_norm_rows_into(x, &self.w, self.eps, y);
    }

    fn rows(&self, x: &[f32]) -> Vec<f32> {
        rms_norm_rows(x, &self.w, self.eps)
    }
}

/// A layer's norms; the optional ones only where the layer has them.
struct LayerNorms {
    input: Norm,
    q: Option<Norm>,
    k: Option<Norm>,
    attn_out: Option<Norm>,
    mlp: Norm,
    mlp_out: Option<Norm>,
}

/// What every member reads of the call, made once before it.
struct Plan<'a> {
    norms: &'a [LayerNorms],
    final_norm: &'a Norm,
}

/// One member's run; the lead's gives the output.
fn member(
    m: &Member,
    s: &Shared,
    d: &DecodeInput,
    plan: &Plan,
) -> std::result::Result<Option<DecodeOutput>, Stop> {
    let lead = m.is_lead();
    let c = d.norm_width();
    let n = d.x.len() / c;
    let mut x = if lead { d.x.clone() } else { Vec::new() }; // [N,C]
    // The lead's buffers, kept from pass to pass: a pass's products, and a
    // norm's or the attention's output.
    let mut ys: Vec<Vec<f32>> = Vec::new();
    let mut out = Vec::new();
    for (li, (l, ln)) in d.layers.iter().zip(plan.norms).enumerate() {
        let a = l.attn;
        let (h, k, hd) = (a.heads, a.kv_heads, a.head_dim);
        let modes = d.modes[li];
        if lead {
            ln.input.rows_into(&x, &mut out);
            s.set_input(&out, c, modes[0]);
        }
        if s.pass(m, &l.qkv, &mut ys)? {
            let (q, kk, v) = (&ys[0], &ys[1], &ys[2]);
            let q = head_norm(q, ln.q.as_ref());
            let kk = head_norm(kk, ln.k.as_ref());
            let rope = &d.ropes[a.kind.rope];
            let q = rope_rows(&q, h, rope, RopeLayout::Half)?; // [N,H,D]
            let kk = rope_rows(&kk, k, rope, RopeLayout::Half)?; // [N,K,D]
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
            let attn = CachedAttention::new((n, h, hd), k, &seqs, a.kind.window, a.kind.scale)?;
            let q = s.q.read().expect("no member panicked holding it");
            let mut part = s.shares[m.index()]
                .lock()
                .expect("no member panicked holding it");
            part.clear();
            for t in (m.index()..attn.tasks()).step_by(m.members()) {
                part.extend(attn.run(t, &q));
            }
        }
        m.sync()?;
        if lead {
            let cache = s.cache.read().expect("no member panicked holding it");
            let seqs = cached_seqs(&cache, li, d.spans);
            let attn = CachedAttention::new((n, h, hd), k, &seqs, a.kind.window, a.kind.scale)?;
            out.clear();
            out.resize(n * h * hd, 0.0); // [N,H,D]
            for (i, share) in s.shares.iter().enumerate() {
                let share = share.lock().expect("no member panicked holding it");
                let mut at = 0;
                for t in (i..attn.tasks()).step_by(m.members()) {
                    let len = attn.task_len(t);
                    attn.place(t, &share[at..at + len], &mut out);
                    at += len;
                }
            }
            s.set_input(&out, h * hd, modes[1]);
        }
        if s.pass(m, &[l.o], &mut ys)? {
            add_normed(&mut x, &ys[0], ln.attn_out.as_ref());
            ln.mlp.rows_into(&x, &mut out);
            s.set_input(&out, c, modes[2]);
        }
        if s.pass(m, &l.gate_up, &mut ys)? {
            let act = match l.act {
                Activation::Silu => swiglu_rows(&ys[0], &ys[1]),
                Activation::GeluTanh => geglu_rows(&ys[0], &ys[1]),
            };
            s.set_input(&act, act.len() / n, modes[3]);
        }
        if s.pass(m, &[l.down], &mut ys)? {
            add_normed(&mut x, &ys[0], ln.mlp_out.as_ref());
        }
    }
    // The final norm of the rows whose logits are wanted, then the head.
    let hidden = if lead {
        let picked: Vec<f32> = d
            .last
            .iter()
            .flat_map(|&r| x[r as usize * c..(r as usize + 1) * c].iter().copied())
            .collect();
        let hidden = plan.final_norm.rows(&picked);
        if d.head.is_some() {
            s.set_input(&hidden, c, d.head_mode);
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
    fn set_input(&self, x: &[f32], cols: usize, mode: InputMode) {
        let rounded;
        let (x, int8) = match mode {
            InputMode::F32 => (x, false),
            InputMode::Int8 => (x, true),
            InputMode::K8 => {
                rounded = round_inputs(x, cols, InputRounding::Q8K);
                (&rounded[..], false)
            }
        };
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

/// A QK-norm of each head's row of D (before RoPE), where the attention
/// has one.
fn head_norm<'a>(rows: &'a [f32], norm: Option<&Norm>) -> Cow<'a, [f32]> {
    match norm {
        Some(norm) => Cow::Owned(norm.rows(rows)),
        None => Cow::Borrowed(rows),
    }
}

/// `x += norm(y)` where the sublayer's output has a norm (Gemma 3), else
/// `x += y`.
fn add_normed(x: &mut [f32], y: &[f32], norm: Option<&Norm>) {
    match norm {
        Some(norm) => add_in(x, &norm.rows(y)),
        None => add_in(x, y),
    }
}

#[cfg(test)]
mod tests {
    use skillet_gguf::GgmlType;

    use crate::export::write_gguf;
    use crate::layers::Span;
    use crate::{
        Activations, Architecture, CachedBatch, CachedChunk, CausalLm, LoadOptions, Model,
        ModelConfig, ModelSource, random_weights, tiny_config_for,
    };

    /// A random model of `cfg` in a GGUF file whose tensors are typed by
    /// `storage`, loaded in its blocks.
    fn quantized(cfg: &ModelConfig, storage: &dyn Fn(&str) -> GgmlType) -> Model {
        let w = random_weights(cfg, 7).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(cfg, &w, &path, storage, vec![]).unwrap();
        ModelSource::open(&path)
            .unwrap()
            .load_model(LoadOptions {
                keep_quantized: true,
                ..Default::default()
            })
            .unwrap()
    }

    /// The models the team runs: Llama, Qwen3 (QK-norms) and Gemma 3 (its
    /// norms of the sublayers' outputs, GeGLU, a sliding window) in Q8_0
    /// and Q4_1; and Llama and Gemma 3 256 wide with K-quant MLPs (Q4_K
    /// gate and up, Q6_K down), whose int8 passes round their inputs per
    /// 256, beside Q8_0 attention rounding per 32.
    fn models() -> Vec<(String, Model)> {
        let mut out = Vec::new();
        for arch in [
            Architecture::Llama,
            Architecture::Qwen3,
            Architecture::Gemma3,
        ] {
            for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
                let m = quantized(&tiny_config_for(arch, 97), &|_| ty);
                out.push((format!("{arch:?} {ty:?}"), m));
            }
        }
        let k_quants = |name: &str| {
            if name.contains("down") {
                GgmlType::Q6K
            } else if name.contains("gate") || name.contains("up") {
                GgmlType::Q4K
            } else {
                GgmlType::Q8_0
            }
        };
        for arch in [Architecture::Llama, Architecture::Gemma3] {
            let cfg = ModelConfig {
                hidden_size: 256,
                intermediate_size: 512,
                ..tiny_config_for(arch, 97)
            };
            out.push((format!("{arch:?} K-quants"), quantized(&cfg, &k_quants)));
        }
        out
    }

    #[test]
    fn the_team_runs_a_decode_step_to_the_layer_by_layer_bits() {
        let prompt = [5u32, 9, 13, 2, 77];
        for (ty, mut m) in models() {
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
                    .unwrap_or_else(|| panic!("{ty} runs in a team"));
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
                assert_eq!(team, layered, "{ty}, {activations:?}");
                assert_eq!(team_cache.len(0), layered_cache.len(0));
            }
        }
    }
}
