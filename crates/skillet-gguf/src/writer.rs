//! GGUF writer: metadata and raw tensor bytes in, a valid file out.
//!
//! Used for tests (tiny models in every storage type) and, later, for GGUF
//! export. Tensors are written in insertion order, each aligned.

use std::io::Write;
use std::path::Path;

use crate::{DEFAULT_ALIGNMENT, GgmlType, GgufError, MAGIC, Value};

/// Builds a GGUF (version 3) file in memory and writes it out.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata entry.
    pub fn metadata(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor. `shape` is row-major (outermost first), `data` holds
    /// exactly the bytes of `ggml_type` for that many elements.
    pub fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.to_string(), shape.to_vec(), ggml_type, data));
        self
    }

    /// Serializes to bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut rel = 0usize;
        for (name, shape, ty, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(rel as u64).to_le_bytes());
            rel = (rel + data.len()).div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(align) * align, 0);
        }
        out
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("gguf.partial");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&self.to_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let inner = items.first().map_or(Value::U8(0).type_id(), Value::type_id);
            out.extend_from_slice(&inner.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::U32(2))
            .metadata(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            )
            .metadata("x.f", Value::F32(1e-5));
        let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.tensor("t.f32", &[2, 3], GgmlType::F32, floats);
        w.tensor("t.q8", &[1, 32], GgmlType::Q8_0, vec![0u8; 34]);
        w
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        sample().write(&p).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_i64("llama.block_count").unwrap(), 2);
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            vec!["a", "b"]
        );
        assert!((f.get_f64("x.f").unwrap() - 1e-5).abs() < 1e-12);
        let t = f.tensor("t.f32").unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        let bytes = f.tensor_bytes(t);
        assert_eq!(f32::from_le_bytes(bytes[20..24].try_into().unwrap()), 5.0);
        assert_eq!(f.tensor("t.q8").unwrap().ggml_type, GgmlType::Q8_0);
        assert!(
            f.get_str("missing.key")
                .unwrap_err()
                .to_string()
                .contains("missing.key")
        );
    }

    #[test]
    fn released_pages_read_back_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let mut w = sample();
        // A tensor of several pages, beside the sample's small ones.
        let big: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
        w.tensor("t.big", &[big.len() / 4], GgmlType::F32, big.clone());
        w.write(&p).unwrap();
        let f = GgufFile::open(&p).unwrap();
        let before: Vec<Vec<u8>> = f
            .tensors()
            .iter()
            .map(|t| f.tensor_bytes(t).to_vec())
            .collect();
        for t in f.tensors() {
            f.release_tensor_pages(t);
        }
        f.release_pages();
        let after: Vec<Vec<u8>> = f
            .tensors()
            .iter()
            .map(|t| f.tensor_bytes(t).to_vec())
            .collect();
        assert_eq!(before, after);
        assert_eq!(f.tensor_bytes(f.tensor("t.big").unwrap()), &big[..]);
    }

    #[test]
    fn bad_magic_truncation_and_types_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = sample().to_bytes();

        let p = dir.path().join("magic.gguf");
        let mut bad = bytes.clone();
        bad[..4].copy_from_slice(b"GGML");
        std::fs::write(&p, &bad).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");

        // Cutting the file anywhere before the end of the last tensor's data
        // must give an error, never a panic. The file ends with 34 bytes of
        // Q8_0 data and 30 bytes of alignment padding, which may go missing.
        let data_end = bytes.len() - 30;
        for cut in [0, 3, 10, 30, 100, data_end - 20, data_end - 1] {
            let p = dir.path().join(format!("cut{cut}.gguf"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = GgufFile::open(&p).unwrap_err().to_string();
            assert!(
                e.contains("truncated") || e.contains("not a GGUF"),
                "cut {cut}: {e}"
            );
        }
        std::fs::write(dir.path().join("pad.gguf"), &bytes[..data_end]).unwrap();
        GgufFile::open(dir.path().join("pad.gguf")).unwrap();

        let mut w = sample();
        w.tensors[1].2 = GgmlType::Q8_0;
        let mut raw = w.to_bytes();
        // Patch the stored type id of "t.q8" (8) to IQ2_XXS (16).
        let pos = raw
            .windows(4 + 8)
            .position(|win| win[..4] == b"t.q8"[..])
            .unwrap();
        let type_pos = pos + 4 + 4 + 16;
        assert_eq!(raw[type_pos], 8);
        raw[type_pos] = 16;
        let p = dir.path().join("iq.gguf");
        std::fs::write(&p, &raw).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("'t.q8'") && e.contains("IQ2_XXS"), "{e}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = GgufFile::open("/nonexistent/x.gguf")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.gguf"), "{e}");
    }
}
