//! Errors raised while reading or writing GGUF files.

use std::path::PathBuf;

/// Everything that can go wrong with a GGUF file; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, mapped or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{path}: not a GGUF file (magic bytes {found:?}, expected \"GGUF\")")]
    BadMagic {
        /// The file concerned.
        path: PathBuf,
        /// The bytes found instead, lossily shown.
        found: String,
    },
    /// A GGUF version this reader does not know.
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The file concerned.
        path: PathBuf,
        /// The version in the header.
        version: u32,
    },
    /// The file ends before a structure it announces.
    #[error(
        "{path}: truncated GGUF file: {what} needs bytes up to offset {needed}, file has {len}"
    )]
    Truncated {
        /// The file concerned.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// The offset that would have been needed.
        needed: u64,
        /// The file length.
        len: u64,
    },
    /// Malformed header content (bad UTF-8, unknown value type, absurd count).
    #[error("{path}: malformed GGUF: {message}")]
    Malformed {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor stored in a type this crate cannot size or decode.
    #[error("{path}: tensor '{tensor}' has unsupported GGML type {type_name} (id {type_id})")]
    UnsupportedType {
        /// The file concerned.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The numeric type id in the file.
        type_id: u32,
        /// llama.cpp's name for the type, or "unknown".
        type_name: &'static str,
    },
    /// A metadata key is missing or has the wrong type.
    #[error("{path}: metadata key '{key}': {message}")]
    Metadata {
        /// The file concerned.
        path: PathBuf,
        /// The key looked up.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}
