//! Fused CPU kernels for training and inference, each a candle custom op
//! with a closed-form backward pass (candle-nn's fused `rms_norm`,
//! `softmax_last_dim` and `rope` have none, so gradients through them are
//! silently dropped; composed ops have gradients but keep many full-size
//! intermediates and are slow in backward).
//!
//! Every op works on f32 host memory: it borrows the inputs' storage,
//! calls the `gemm` crate (AVX-512 where the CPU has it, detected at run
//! time) for products, or MKL where it is present and measures faster for
//! a product's shape (`gemm_choice.rs`), and runtime-dispatched vector
//! loops for the rest, and returns a fresh tensor. Each op is tested against the composed candle
//! version (values and gradients) and against finite differences.

mod adamw;
mod attention;
mod awake;
mod bf16;
mod blas;
mod cache;
mod cached_attention;
mod frozen;
mod frozen_mlp;
mod gemm;
mod gemm_choice;
mod input_rounding;
mod linear;
mod linear_cross_entropy;
mod lora_linear;
mod lora_rows;
mod quantized;
mod reused;
mod rms_norm;
mod rope;
mod storage;
mod swiglu;
mod swiglu_down;
pub mod team;
mod thin;
#[cfg(target_arch = "x86_64")]
mod tiles;
mod vec;

#[cfg(test)]
mod testing;

pub use adamw::{AdamWStep, adamw_step};
pub use attention::{
    AttentionMask, QkvProjection, SHARED_SEGMENT, attention, attention_composed, attention_rope,
    attention_rope_rows, projected_attention,
};
pub use awake::keep_awake;
pub use bf16::{
    Bf16Blocks, Bf16Matrix, Bf16Weight, bf16_accelerated, frozen_matmul_bf16, matmul_bf16,
};
pub use cache::cache_dir;
pub use cached_attention::{
    CachedAttention, CachedSeq, KEY_BLOCK, cached_attention, key_cache_len, write_keys,
};
pub use frozen::{FrozenWeight, frozen_product, frozen_product_add, normed_frozen_product};
pub use frozen_mlp::{FrozenMlp, frozen_mlp_add};
pub use gemm_choice::{GemmReport, gemm_report};
pub use input_rounding::{InputRounding, round_inputs};
pub use linear::{frozen_matmul, linear, linear_bf16};
pub use linear_cross_entropy::{
    CrossEntropyStats, FrozenHead, LmHead, linear_cross_entropy, linear_cross_entropy_frozen,
    linear_token_nll,
};
pub use lora_linear::{FrozenLinear, lora_linear, lora_linear_add};
pub use lora_rows::{LoraFactors, lora_rows};
pub use quantized::{
    GgmlBlocks, MIN_PIECE_BYTES, NF4_BLOCK, NF4_LEVELS, Pieces, PreparedInput, QuantKind,
    QuantMatrix,
};
pub use rms_norm::{InputNorm, rms_norm, rms_norm_composed, rms_norm_rows, rms_norm_rows_into};
pub use rope::{RopeLayout, RopeTable, rope, rope_composed, rope_rows};
pub use swiglu::{geglu_rows, swiglu, swiglu_composed, swiglu_rows};
pub use swiglu_down::swiglu_down;
