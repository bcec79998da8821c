//! Linear layers behind one trait, so LoRA, DoRA and quantized bases plug
//! into the single model implementation without copying it. A base layer
//! is frozen unless its weight is a variable (full fine-tuning).

use std::sync::{Arc, OnceLock};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use skillet_kernels::{
    Bf16Weight, FrozenLinear, FrozenWeight, QuantKind, QuantMatrix, frozen_product,
};

use crate::{Result, Weight};

/// A layer `y = x W^T (+ b)` mapping `[..., in]` to `[..., out]`.
pub trait Linear: Send + Sync + std::fmt::Debug {
    /// Applies the layer to `x` of shape `[..., in_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// [`Linear::forward`] for an incremental (cached) call, where every
    /// row's result must not depend on the other rows of `x`: a sequence
    /// then gets the same numbers whatever shares its batch. `activations`
    /// says how a quantized weight meets them.
    fn forward_rowwise(&self, x: &Tensor, activations: Activations) -> Result<Tensor> {
        let _ = activations;
        self.forward(x)
    }
    /// [`Linear::forward`] with the products of a frozen weight taken in
    /// `precision` (a trainable weight, and layers without a bf16 path,
    /// stay in f32).
    fn forward_in(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        let _ = precision;
        self.forward(x)
    }
    /// The weight packed for bf16 products when the layer is exactly
    /// `x Wᵀ` with a frozen dense `W` (so callers may fuse it: the LM head
    /// in the loss); packed on first use and kept.
    fn bf16_weight(&self) -> Result<Option<Arc<Bf16Weight>>> {
        Ok(None)
    }
    /// The layer as a frozen product for the fused LoRA op in training,
    /// its products taken in `precision`; `None` where the layer is
    /// trainable or has no such form (then LoRA is composed around
    /// [`Linear::forward_in`]).
    fn frozen(&self, precision: Precision) -> Result<Option<FrozenLinear>> {
        let _ = precision;
        Ok(None)
    }
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// The dense `[out, in]` weight when the layer is exactly `x Wᵀ` (no
    /// bias, no adapter), so callers may fuse it (LM head + cross-entropy).
    /// A trainable weight is returned as its variable and gets gradients.
    fn dense_weight(&self) -> Option<Tensor> {
        None
    }
}

/// The precision of the frozen weights' products in a training forward
/// (PyTorch autocast's split: matrix products in bf16 with f32
/// accumulation; norms, softmax, the loss and every trained parameter in
/// f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Frozen weights' products in the decoder layers (forward and the
    /// input gradient) and in the fused LM-head loss, in bf16 with f32
    /// accumulation: on AMX tiles where the CPU has them. Dense weights
    /// are rounded and Q4_1 / Q8_0 blocks (QLoRA) dequantized inside each
    /// product, with no copy kept (the fused head alone keeps a packed
    /// copy); other block formats stay f32. (Logits asked of the head
    /// directly, and an adapted head, stay f32.)
    Bf16,
}

impl Precision {
    /// `Bf16` where the CPU multiplies bf16 natively on AMX tiles (there it
    /// is about 3× the f32 GEMM's rate), else `F32` (the bf16 operands
    /// would then go through the f32 GEMM, no faster).
    pub fn fastest() -> Self {
        if skillet_kernels::bf16_accelerated() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

/// How the inputs of a quantized weight's product are taken in an
/// incremental (serving) call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// In f32, exactly as the dequantized weight would multiply them.
    #[default]
    F32,
    /// Rounded to 8-bit integers per block of 32, as llama.cpp does
    /// ([`QuantMatrix::matmul_int8`]): faster for batches where the CPU
    /// has AMX (about 1.5× at 8 rows), within about 1% per product.
    Int8,
}

impl Activations {
    /// The faster for batched decoding: `Int8` where the CPU runs it on AMX
    /// tiles, else `F32`. (For a single sequence `F32` is faster even there:
    /// the int8 kernel's per-call preparation pays off from a few rows.)
    pub fn for_batches() -> Self {
        if QuantMatrix::int8_accelerated() {
            Activations::Int8
        } else {
            Activations::F32
        }
    }
}

/// Up to this many rows (tokens), a Q4_1 or Q8_0 weight is used in its
/// blocks; beyond, it is dequantized for the f32 GEMM.
const FEW_ROWS: usize = 16;

/// A frozen pretrained projection: dense f32 or quantized blocks.
#[derive(Debug, Clone)]
pub struct BaseLinear {
    weight: Weight,
    /// Q4_1 / Q8_0 blocks repacked for the few-row (decode) path.
    packed: Option<Arc<QuantMatrix>>,
    /// The weight packed for bf16 products when it serves as the fused LM
    /// head, made on first use and shared by clones.
    bf16: Arc<OnceLock<Arc<Bf16Weight>>>,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl BaseLinear {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        let shape = weight.shape();
        let packed = match &weight {
            Weight::Quantized(q) => {
                let kind = match q.dtype() {
                    GgmlDType::Q4_1 => Some(QuantKind::Q4_1),
                    GgmlDType::Q8_0 => Some(QuantKind::Q8_0),
                    _ => None,
                };
                kind.and_then(|k| {
                    let bytes = q.data().ok()?;
                    QuantMatrix::from_ggml(k, shape[0], shape[1], &bytes).ok()
                })
                .map(Arc::new)
            }
            Weight::Dense(_) => None,
        };
        Self {
            out_features: shape[0],
            in_features: shape[1],
            weight,
            packed,
            bf16: Arc::default(),
            bias,
        }
    }

    /// The stored weight.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl BaseLinear {
    /// The product through the repacked quantized blocks.
    fn blocks(
        &self,
        packed: &Arc<QuantMatrix>,
        x: &Tensor,
        activations: Activations,
    ) -> Result<Tensor> {
        let y = match activations {
            Activations::F32 => packed.matmul(x)?,
            Activations::Int8 => packed.matmul_int8(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The product with the dense (or dequantized) weight.
    fn dense(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(blocks) = &self.packed {
            // Dequantized for this call (and again in backward), not held
            // by the autograd graph in between.
            let y = frozen_product(x, &FrozenWeight::QuantF32(blocks.clone()))?;
            return Ok(match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        let weight = self.weight.to_dense(&Device::Cpu)?;
        // A frozen weight never enters the autograd graph (the op's
        // backward gives the input gradient only); a trainable one (full
        // fine-tuning) gets its gradient too.
        let y = if weight.track_op() {
            skillet_kernels::linear(x, &weight)?
        } else {
            skillet_kernels::frozen_matmul(x, &weight)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

impl BaseLinear {
    /// The weight packed for bf16 products (for the fused LM head), where
    /// it is frozen: a dense one, or the dequantized blocks.
    fn packed_bf16(&self) -> Result<Option<Arc<Bf16Weight>>> {
        if let Some(p) = self.bf16.get() {
            return Ok(Some(p.clone()));
        }
        let w = match &self.weight {
            Weight::Dense(w) if w.track_op() => return Ok(None),
            Weight::Dense(w) => w.clone(),
            Weight::Quantized(_) => self.weight.to_dense(&Device::Cpu)?,
        };
        let p = Arc::new(Bf16Weight::new(&w)?);
        Ok(Some(self.bf16.get_or_init(|| p).clone()))
    }

    /// The product in bf16 where the weight is frozen and dense or in
    /// Q4_1 / Q8_0 blocks, with no copy of the weight kept (the tile
    /// kernel rounds or dequantizes it block by block).
    fn bf16(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(frozen) = self.frozen(Precision::Bf16)? else {
            return Ok(None);
        };
        let y = frozen_product(x, &frozen.weight)?;
        Ok(Some(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
    }
}

impl Linear for BaseLinear {
    fn bf16_weight(&self) -> Result<Option<Arc<Bf16Weight>>> {
        if self.bias.is_some() {
            return Ok(None);
        }
        self.packed_bf16()
    }

    fn frozen(&self, precision: Precision) -> Result<Option<FrozenLinear>> {
        let weight = match (&self.weight, &self.packed, precision) {
            (Weight::Dense(w), _, _) if w.track_op() => return Ok(None),
            (Weight::Dense(w), _, Precision::F32) => FrozenWeight::Dense(w.clone()),
            (Weight::Dense(w), _, Precision::Bf16) => FrozenWeight::DenseBf16(w.clone()),
            (Weight::Quantized(_), Some(q), Precision::F32) => FrozenWeight::QuantF32(q.clone()),
            (Weight::Quantized(_), Some(q), Precision::Bf16) => FrozenWeight::QuantBf16(q.clone()),
            (Weight::Quantized(_), None, _) => return Ok(None),
        };
        Ok(Some(FrozenLinear {
            weight,
            bias: self.bias.clone(),
        }))
    }

    fn forward_in(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        if precision == Precision::Bf16
            && let Some(y) = self.bf16(x)?
        {
            return Ok(y);
        }
        self.forward(x)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.in_features.max(1);
        match &self.packed {
            // Decode: read the quantized blocks instead of dequantizing.
            Some(packed) if rows <= FEW_ROWS => self.blocks(packed, x, Activations::F32),
            _ => self.dense(x),
        }
    }

    fn forward_rowwise(&self, x: &Tensor, activations: Activations) -> Result<Tensor> {
        // The quantized blocks for every row, prompt chunks too: a row's
        // product then never depends on how many rows share the call (nor
        // on a reused prompt prefix), and short prompt chunks skip
        // dequantizing the whole matrix.
        match &self.packed {
            Some(packed) => self.blocks(packed, x, activations),
            None => self.dense(x),
        }
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn dense_weight(&self) -> Option<Tensor> {
        if self.bias.is_some() {
            return None;
        }
        self.weight.to_dense(&Device::Cpu).ok()
    }
}
