//! Linear layers behind one trait, so LoRA, DoRA and quantized bases plug
//! into the single model implementation without copying it. A base layer
//! is frozen unless its weight is a variable (full fine-tuning).

use std::sync::{Arc, OnceLock};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use skillet_kernels::{
    Bf16Blocks, Bf16Weight, FrozenHead, FrozenLinear, FrozenWeight, GgmlBlocks, InputRounding,
    QuantMatrix, frozen_product, round_inputs,
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
    /// [`Linear::forward`] with the products taken in `precision` (layers
    /// without a bf16 path stay in f32).
    fn forward_in(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        let _ = precision;
        self.forward(x)
    }
    /// The layer as a frozen head with its products in `precision`, when
    /// it is exactly `x Wᵀ` with a frozen `W` (so callers may fuse it: the
    /// LM head in the loss): in bf16 a dense `W` packed on first use and
    /// kept; quantized blocks read as they are in either precision. `None`
    /// for a dense f32 head (callers fuse [`Linear::dense_weight`]).
    fn frozen_head(&self, precision: Precision) -> Result<Option<FrozenHead>> {
        let _ = precision;
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
    /// [`Linear::frozen`] for a frozen product over `rows` rows: `None`
    /// where [`Linear::forward_in`] takes another product for so few rows
    /// (quantized blocks read as they are, in f32). A fused op then takes
    /// the same product as the plain path, as activation checkpointing
    /// needs: its first forward tracks nothing and takes the plain path,
    /// its second the fused one.
    fn frozen_for(&self, rows: usize, precision: Precision) -> Result<Option<FrozenLinear>> {
        let _ = rows;
        self.frozen(precision)
    }
    /// The quantized blocks the layer multiplies by, when it is exactly
    /// `x Wᵀ` over them (no bias, nothing added), so that a caller may take
    /// several layers' incremental products in one pass
    /// ([`QuantMatrix::matmul_each`], the same numbers as
    /// [`Linear::forward_rowwise`]).
    fn quant_blocks(&self) -> Option<&Arc<QuantMatrix>> {
        None
    }
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// The bias added after the product, if any.
    fn bias(&self) -> Option<&Tensor> {
        None
    }
    /// The `[out, in]` weight in f32, dequantized where it is stored in
    /// blocks (a copy; for adapters that need the base weight itself,
    /// e.g. DoRA's row norms).
    fn weight_f32(&self) -> Result<Tensor>;
    /// The dense `[out, in]` weight when the layer is exactly `x Wᵀ` (no
    /// bias, no adapter), so callers may fuse it (LM head + cross-entropy).
    /// A trainable weight is returned as its variable and gets gradients.
    fn dense_weight(&self) -> Option<Tensor> {
        None
    }
}

/// The precision of the weights' products in a training forward (PyTorch
/// autocast's split: matrix products in bf16 with f32 accumulation; norms,
/// softmax, the loss and the master copy of every trained parameter in
/// f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Frozen weights' products in the decoder layers (forward and the
    /// input gradient) and in the fused LM-head loss, in bf16 with f32
    /// accumulation: on AMX tiles where the CPU has them, else with
    /// AVX512-BF16's dot products where it has those. A trained dense
    /// weight of a decoder layer (full fine-tuning) is rounded from its f32
    /// master copy in each product, its gradient `dyᵀ x` taken in bf16
    /// too; so is a trained LM head in the fused loss. Dense f32
    /// weights are rounded and Q4_1 / Q8_0 blocks (QLoRA) dequantized
    /// inside each product, with no copy kept (the fused head alone keeps
    /// a packed copy of a dense f32 head); weights held in bf16 are read
    /// as they are; other block formats stay f32. (Logits asked of the head
    /// directly, and an adapted head, stay f32.) Attention's products in a
    /// fresh batch run in bf16 too (`skillet_kernels::attention_rope`), its
    /// softmax in f32.
    Bf16,
}

impl Precision {
    /// `Bf16` where the CPU multiplies bf16 natively: on AMX tiles (about 3×
    /// the f32 GEMM's rate on an Intel Xeon) or with AVX512-BF16's dot
    /// products (2.1–2.9× on an AMD EPYC Zen 4); else `F32` (the bf16
    /// operands would then go through the f32 GEMM, no faster).
    pub fn fastest() -> Self {
        if skillet_kernels::bf16_accelerated() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// Whether a frozen dense base trained in this precision is best held
    /// in bf16 ([`crate::LoadOptions::frozen_bf16`]): in bf16 where the
    /// tiles read it as it is. (Without them its bf16 products go through
    /// the f32 GEMM, which would expand it for every product.)
    pub fn holds_base_in_bf16(self) -> bool {
        self == Precision::Bf16 && skillet_kernels::bf16_accelerated()
    }
}

/// How the inputs of a quantized weight's product are taken in an
/// incremental (serving) call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// In f32, exactly as the dequantized weight would multiply them.
    #[default]
    F32,
    /// Rounded as llama.cpp's CPU backend rounds them for the weight's
    /// type: to 8-bit integers per block of 32 for Q4_0, Q4_1, Q5_0 and
    /// Q8_0 weights
    /// ([`QuantMatrix::matmul_int8`]: integer products on AMX tiles where
    /// the CPU has them, about 1.5× `F32`'s throughput at 8 rows on a Xeon,
    /// else on AVX512-VNNI or AVX2 from a copy of the weight made for it,
    /// faster than `F32` from one row on an AMD Zen 4, and about 3.9× as
    /// fast decoding one sequence on the AVX2-only Zen 3 it was measured on;
    /// within about 1% per
    /// product); for other GGML types ([`InputRounding`]: per 32 for Q5_1,
    /// per 256 for the K-quants) the rounded inputs meet the
    /// dequantized weight in f32. Dense weights (f32, and f16 / bf16, held
    /// in f32) take them as they are.
    Int8,
}

impl Activations {
    /// The faster for batched decoding: `Int8` where the CPU runs it on AMX
    /// tiles, AVX512-VNNI or AVX2, else `F32`. (For a single sequence the
    /// two are about as fast on a Sapphire Rapids Xeon; on a Zen 4, int8 is
    /// faster from one row; on AVX2 it was measured on one Zen 3, for one
    /// sequence and for a prompt, both far faster.)
    pub fn for_batches() -> Self {
        if QuantMatrix::int8_accelerated() {
            Activations::Int8
        } else {
            Activations::F32
        }
    }
}

/// Up to this many rows (tokens), a weight in repacked blocks (Q4_0, Q4_1,
/// Q5_0, Q8_0, Q4_K, Q6_K) is used in its blocks; beyond, it is dequantized for
/// the f32 GEMM.
const FEW_ROWS: usize = 16;

/// Q4_0 / Q4_1 / Q5_0 / Q8_0 / Q4_K / Q6_K blocks of a `[rows, cols]`
/// matrix repacked for Skillet's kernels (Q4_0 and Q4_K as Q4_1, Q5_0 as
/// Q8_0, Q6_K as Q8_16, see [`GgmlBlocks`]); `None` for other types.
pub(crate) fn repack(q: &QTensor) -> Option<QuantMatrix> {
    let source = match q.dtype() {
        GgmlDType::Q4_0 => GgmlBlocks::Q4_0,
        GgmlDType::Q4_1 => GgmlBlocks::Q4_1,
        GgmlDType::Q5_0 => GgmlBlocks::Q5_0,
        GgmlDType::Q8_0 => GgmlBlocks::Q8_0,
        GgmlDType::Q4K => GgmlBlocks::Q4K,
        GgmlDType::Q6K => GgmlBlocks::Q6K,
        _ => return None,
    };
    let (rows, cols) = q.shape().dims2().ok()?;
    let bytes = q.data().ok()?;
    QuantMatrix::from_ggml_blocks(source, rows, cols, &bytes).ok()
}

/// How llama.cpp's CPU backend rounds the inputs of a product with a
/// weight stored as `dtype` (its `vec_dot_type`); `None` where it takes
/// them in f32.
fn input_rounding(dtype: GgmlDType) -> Option<InputRounding> {
    Some(match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_0 => {
            InputRounding::Q8_0
        }
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
            InputRounding::Q8K
        }
        _ => return None,
    })
}

/// How a [`BaseLinear`] holds its weight.
#[derive(Debug, Clone)]
enum Stored {
    /// Dense f32 values (a variable in full fine-tuning).
    Dense(Tensor),
    /// Dense values rounded to bf16 (frozen; every product in bf16).
    Bf16(Arc<Bf16Blocks>),
    /// Q4_0 / Q4_1 / Q5_0 / Q8_0 / Q4_K / Q6_K blocks repacked for
    /// Skillet's kernels (the GGML copy is not kept), or NF4 codes.
    Blocks(Arc<QuantMatrix>),
    /// Other GGML block types, through candle's quantized tensor.
    Ggml(Arc<QTensor>),
}

/// A frozen pretrained projection: dense f32 or quantized blocks.
#[derive(Debug, Clone)]
pub struct BaseLinear {
    weight: Stored,
    /// The weight packed for bf16 products when it serves as the fused LM
    /// head, made on first use and shared by clones (dense weights only).
    bf16: Arc<OnceLock<Arc<Bf16Weight>>>,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl BaseLinear {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        let shape = weight.shape();
        let weight = match weight {
            Weight::Dense(t) => Stored::Dense(t),
            Weight::Quantized(q) => match repack(&q) {
                Some(b) => Stored::Blocks(Arc::new(b)),
                None => Stored::Ggml(q),
            },
        };
        Self {
            out_features: shape[0],
            in_features: shape[1],
            weight,
            bf16: Arc::default(),
            bias,
        }
    }

    /// A frozen layer over a quantized matrix already made: Q4_1 / Q8_0
    /// blocks shared with another use of the same weight (a tied
    /// embedding), or a weight quantized to NF4 at load.
    pub fn from_blocks(blocks: Arc<QuantMatrix>, bias: Option<Tensor>) -> Self {
        Self {
            out_features: blocks.rows(),
            in_features: blocks.cols(),
            weight: Stored::Blocks(blocks),
            bf16: Arc::default(),
            bias,
        }
    }

    /// The layer with a dense frozen weight held in bf16 instead (half
    /// the bytes); every product of it is then in bf16 with f32
    /// accumulation, whatever precision a call asks for. Other weights
    /// (quantized blocks, a trainable variable) are kept as they are.
    pub fn in_bf16(self) -> Result<Self> {
        let weight = match self.weight {
            Stored::Dense(w) if !w.track_op() => Stored::Bf16(Arc::new(Bf16Blocks::new(&w)?)),
            other => other,
        };
        Ok(Self { weight, ..self })
    }

    /// The dense f32 weight (dequantized when stored in blocks).
    fn to_dense(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Stored::Dense(t) => t.clone(),
            Stored::Bf16(w) => Tensor::from_vec(
                w.to_f32(),
                (self.out_features, self.in_features),
                &Device::Cpu,
            )?,
            Stored::Blocks(q) => Tensor::from_vec(
                q.dequantize(),
                (self.out_features, self.in_features),
                &Device::Cpu,
            )?,
            Stored::Ggml(q) => q.dequantize(&Device::Cpu)?,
        })
    }

    fn with_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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
        self.with_bias(y)
    }

    /// The product with the dense (or dequantized) weight.
    fn dense(&self, x: &Tensor) -> Result<Tensor> {
        // Blocks are dequantized for this call (and again in backward),
        // not held by the autograd graph in between; bf16 rows multiply
        // as they are.
        let frozen = match &self.weight {
            Stored::Blocks(blocks) => Some(FrozenWeight::QuantF32(blocks.clone())),
            Stored::Bf16(w) => Some(FrozenWeight::Bf16(w.clone())),
            Stored::Dense(_) | Stored::Ggml(_) => None,
        };
        if let Some(frozen) = frozen {
            return self.with_bias(frozen_product(x, &frozen)?);
        }
        let weight = self.to_dense()?;
        // A frozen weight never enters the autograd graph (the op's
        // backward gives the input gradient only); a trainable one (full
        // fine-tuning) gets its gradient too.
        let y = if weight.track_op() {
            skillet_kernels::linear(x, &weight)?
        } else {
            skillet_kernels::frozen_matmul(x, &weight)?
        };
        self.with_bias(y)
    }
}

impl BaseLinear {
    /// The product in bf16 where the weight is frozen and dense or in
    /// Q4_1 / Q8_0 blocks, with no copy of the weight kept (the tile
    /// kernel rounds or dequantizes it block by block).
    fn bf16(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(frozen) = self.frozen(Precision::Bf16)? else {
            return Ok(None);
        };
        let y = frozen_product(x, &frozen.weight)?;
        Ok(Some(self.with_bias(y)?))
    }
}

impl Linear for BaseLinear {
    fn quant_blocks(&self) -> Option<&Arc<QuantMatrix>> {
        match &self.weight {
            Stored::Blocks(packed) if self.bias.is_none() => Some(packed),
            _ => None,
        }
    }

    fn frozen_head(&self, precision: Precision) -> Result<Option<FrozenHead>> {
        if self.bias.is_some() {
            return Ok(None);
        }
        Ok(match (&self.weight, precision) {
            (Stored::Dense(w), _) if w.track_op() => None,
            (Stored::Dense(_), Precision::F32) => None,
            (Stored::Dense(w), Precision::Bf16) => {
                let p = match self.bf16.get() {
                    Some(p) => p.clone(),
                    None => {
                        let p = Arc::new(Bf16Weight::new(w)?);
                        self.bf16.get_or_init(|| p).clone()
                    }
                };
                Some(FrozenHead::Packed(p))
            }
            (Stored::Bf16(w), _) => Some(FrozenHead::Weight(FrozenWeight::Bf16(w.clone()))),
            (Stored::Blocks(q), Precision::Bf16) => {
                Some(FrozenHead::Weight(FrozenWeight::QuantBf16(q.clone())))
            }
            (Stored::Blocks(q), Precision::F32) => {
                Some(FrozenHead::Weight(FrozenWeight::QuantF32(q.clone())))
            }
            (Stored::Ggml(_), _) => None,
        })
    }

    fn frozen(&self, precision: Precision) -> Result<Option<FrozenLinear>> {
        let weight = match (&self.weight, precision) {
            (Stored::Dense(w), _) if w.track_op() => return Ok(None),
            (Stored::Dense(w), Precision::F32) => FrozenWeight::Dense(w.clone()),
            (Stored::Dense(w), Precision::Bf16) => FrozenWeight::DenseBf16(w.clone()),
            (Stored::Bf16(w), _) => FrozenWeight::Bf16(w.clone()),
            (Stored::Blocks(q), Precision::F32) => FrozenWeight::QuantF32(q.clone()),
            (Stored::Blocks(q), Precision::Bf16) => FrozenWeight::QuantBf16(q.clone()),
            (Stored::Ggml(_), _) => return Ok(None),
        };
        Ok(Some(FrozenLinear {
            weight,
            bias: self.bias.clone(),
        }))
    }

    fn frozen_for(&self, rows: usize, precision: Precision) -> Result<Option<FrozenLinear>> {
        let blocks = matches!(self.weight, Stored::Blocks(_));
        if blocks && precision == Precision::F32 && rows <= FEW_ROWS {
            return Ok(None);
        }
        self.frozen(precision)
    }

    fn forward_in(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        if precision == Precision::Bf16 {
            if let Some(y) = self.bf16(x)? {
                return Ok(y);
            }
            // A trained dense weight (full fine-tuning): its f32 master
            // copy rounded on each call, every product in bf16.
            if let Stored::Dense(w) = &self.weight
                && w.track_op()
            {
                return self.with_bias(skillet_kernels::linear_bf16(x, w)?);
            }
        }
        self.forward(x)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.in_features.max(1);
        match &self.weight {
            // Decode: read the quantized blocks instead of dequantizing.
            Stored::Blocks(packed) if rows <= FEW_ROWS => self.blocks(packed, x, Activations::F32),
            _ => self.dense(x),
        }
    }

    fn forward_rowwise(&self, x: &Tensor, activations: Activations) -> Result<Tensor> {
        // The quantized blocks for every row, prompt chunks too: a row's
        // product then never depends on how many rows share the call (nor
        // on a reused prompt prefix), and short prompt chunks skip
        // dequantizing the whole matrix.
        match &self.weight {
            Stored::Blocks(packed) => self.blocks(packed, x, activations),
            Stored::Ggml(q) if activations == Activations::Int8 => {
                match input_rounding(q.dtype()) {
                    Some(how) => {
                        let cols = self.in_features;
                        let flat = x.flatten_all()?.to_vec1::<f32>()?;
                        let rounded = Tensor::from_vec(
                            round_inputs(&flat, cols, how),
                            x.shape(),
                            x.device(),
                        )?;
                        self.dense(&rounded)
                    }
                    None => self.dense(x),
                }
            }
            _ => self.dense(x),
        }
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn weight_f32(&self) -> Result<Tensor> {
        Ok(self.to_dense()?.detach())
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
        self.to_dense().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skillet_kernels::QuantKind;

    #[test]
    fn few_rows_over_f32_blocks_take_no_fused_frozen_product() {
        // A [32, 64] Q8_0 matrix: a scale of 1.0 (f16) and 32 bytes per block.
        let block: Vec<u8> = [0x00, 0x3c].into_iter().chain(1..=32u8).collect();
        let bytes = block.repeat(32 * 64 / 32);
        let q = QuantMatrix::from_ggml(QuantKind::Q8_0, 32, 64, &bytes).unwrap();
        let lin = BaseLinear::from_blocks(Arc::new(q), None);
        // Where `forward_in` reads the blocks as they are, no fused op may
        // take a dequantized product instead.
        assert!(lin.frozen_for(FEW_ROWS, Precision::F32).unwrap().is_none());
        assert!(
            lin.frozen_for(FEW_ROWS + 1, Precision::F32)
                .unwrap()
                .is_some()
        );
        assert!(lin.frozen_for(1, Precision::Bf16).unwrap().is_some());
    }

    /// `blocks` pseudo-random blocks of `size` bytes, each starting with
    /// `halves` small f16 values (scales, minimums).
    fn ggml_bytes(size: usize, halves: usize, blocks: usize) -> Vec<u8> {
        (0..blocks)
            .flat_map(|b| {
                // f16 bits: 2⁻⁸ with a few mantissas.
                let h = move |k: usize| (0x1C00 + ((b + 3 * k) % 9) as u16 * 0x33).to_le_bytes();
                let rest =
                    (2 * halves..size).map(move |i| ((b * 131 + i * 71 + i * i) % 256) as u8);
                (0..halves).flat_map(h).chain(rest)
            })
            .collect()
    }

    #[test]
    fn q4_0_q5_0_q4_k_and_q6_k_blocks_are_repacked_to_ggmls_values_and_products() {
        let (rows, cols) = (40, 512);
        let x: Vec<f32> = (0..5 * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let x = Tensor::from_vec(x, (5, cols), &Device::Cpu).unwrap();
        let mut held = Vec::new();
        for (dtype, size, halves, per_block, rounding) in [
            (GgmlDType::Q4_0, 18, 1, 32, InputRounding::Q8_0),
            (GgmlDType::Q5_0, 22, 1, 32, InputRounding::Q8_0),
            (GgmlDType::Q4K, 144, 2, 256, InputRounding::Q8K),
            (GgmlDType::Q6K, 210, 1, 256, InputRounding::Q8K),
        ] {
            let mut bytes = ggml_bytes(size, halves, rows * cols / per_block);
            if dtype == GgmlDType::Q6K {
                // Q6_K's f16 scale comes last.
                bytes.chunks_exact_mut(size).for_each(|b| b.rotate_left(2));
            }
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                &bytes,
                vec![rows, cols],
                &Device::Cpu,
            )
            .unwrap();
            // candle's dequantizer (ggml's, ported) is the reference: the
            // repacked blocks hold the very same values.
            let reference = q.dequantize(&Device::Cpu).unwrap();
            let packed = repack(&q).expect("repacked");
            assert_eq!(
                packed.dequantize(),
                reference.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{dtype:?}"
            );
            held.push(Arc::new(packed));
            let lin = BaseLinear::new(Weight::Quantized(Arc::new(q)), None);
            assert!(
                lin.quant_blocks().is_some(),
                "{dtype:?} is read in its blocks"
            );
            let dense = x.matmul(&reference.t().unwrap()).unwrap();
            let close = |y: &Tensor, want: &Tensor, tol: f32, what: &str| {
                let err = (y - want).unwrap().abs().unwrap().max_all().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap();
                let (err, scale) = (
                    err.to_scalar::<f32>().unwrap(),
                    scale.to_scalar::<f32>().unwrap(),
                );
                assert!(err <= tol * scale, "{dtype:?} {what}: {err} vs {scale}");
            };
            close(&lin.forward(&x).unwrap(), &dense, 1e-5, "f32 blocks");
            // int8 inputs: llama.cpp's rounding for the type (per 32
            // values, Q8_0; per 256 for Q4_K, Q8_K), what the rounded
            // inputs give in f32.
            let rounded = round_inputs(
                &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                cols,
                rounding,
            );
            let rounded = Tensor::from_vec(rounded, (5, cols), &Device::Cpu).unwrap();
            let want = rounded.matmul(&reference.t().unwrap()).unwrap();
            let y = lin.forward_rowwise(&x, Activations::Int8).unwrap();
            close(&y, &want, 1e-4, "int8 inputs");
        }
        // One pass over weights that round their inputs differently gives
        // each weight's own product.
        let each = QuantMatrix::matmul_each(&held, &x, true).unwrap();
        for (w, y) in held.iter().zip(each) {
            let own = w.matmul_int8(&x).unwrap();
            let (y, own) = (y.flatten_all().unwrap(), own.flatten_all().unwrap());
            assert_eq!(y.to_vec1::<f32>().unwrap(), own.to_vec1::<f32>().unwrap());
        }
    }
}
