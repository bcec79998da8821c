//! GGUF container format: reading (memory-mapped, bounds-checked) and writing.
//!
//! Follows the GGUF specification used by llama.cpp (`docs/gguf.md` there):
//! a little-endian header, typed key/value metadata, a tensor table, then
//! aligned tensor data. This crate knows nothing about models; it hands out
//! metadata values and raw tensor bytes.
#![warn(missing_docs)]

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, TensorInfo};
pub use types::GgmlType;
pub use value::Value;
pub use writer::GgufWriter;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
