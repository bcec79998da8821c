//! Memory-mapped GGUF reader with bounds checks on every structure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{DEFAULT_ALIGNMENT, GgmlType, GgufError, MAGIC, Value};

/// Upper bound on counts read from a header, so a corrupt file cannot make us
/// allocate terabytes before we notice it is truncated.
const MAX_COUNT: u64 = 1 << 28;

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Name as stored (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape in row-major order (outermost first), i.e. GGML's `ne` reversed:
    /// a linear layer's weight is `[out_features, in_features]`.
    pub shape: Vec<usize>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Length of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open GGUF file: header, metadata, tensor table and the mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`: magic, version, metadata, tensor table,
    /// tensor types and that every tensor's bytes lie inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only; a file changed underneath us while
        // mapped can give wrong bytes but not memory unsafety in our code,
        // which only reads through bounds-checked slices.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut cur = Cursor {
            path: &path,
            data: &mmap,
            pos: 0,
        };

        let magic = cur.bytes(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: String::from_utf8_lossy(magic).into_owned(),
            });
        }
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = cur.count("tensor count")?;
        let n_kv = cur.count("metadata count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = cur.string("metadata key")?;
            let ty = cur.u32("metadata value type")?;
            let value = cur.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }

        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = cur.string("tensor name")?;
            let n_dims = cur.u32("tensor dims")?;
            if n_dims > 8 {
                return Err(cur.malformed(format!("tensor '{name}' claims {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64("tensor dimension")?);
            }
            let type_id = cur.u32("tensor type")?;
            let offset = cur.u64("tensor offset")?;
            raw.push((name, dims, type_id, offset));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
                _ => return Err(cur.malformed(format!("general.alignment = {}", v.describe()))),
            },
        };
        let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = BTreeMap::new();
        for (name, dims, type_id, rel) in raw {
            let ggml_type =
                GgmlType::from_id(type_id).map_err(|type_name| GgufError::UnsupportedType {
                    path: path.clone(),
                    tensor: name.clone(),
                    type_id,
                    type_name,
                })?;
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let size = elements.and_then(|e| ggml_type.bytes_for(e)).ok_or_else(|| {
                GgufError::Malformed {
                    path: path.clone(),
                    message: format!(
                        "tensor '{name}' of shape {dims:?} is not a whole number of {ggml_type} blocks"
                    ),
                }
            })?;
            let offset = data_start.saturating_add(rel);
            let end = offset.saturating_add(size);
            if end > file_len {
                return Err(GgufError::Truncated {
                    path: path.clone(),
                    what: format!("tensor '{name}'"),
                    needed: end,
                    len: file_len,
                });
            }
            let shape = dims.iter().rev().map(|&d| d as usize).collect();
            by_name.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                shape,
                ggml_type,
                offset,
                size,
            });
        }

        Ok(Self {
            path,
            mmap,
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    /// Hands the pages of the mapped file that were read back to the
    /// kernel, so they stop counting in this process's resident memory
    /// once their tensors have been copied out (a later read maps them in
    /// again from the file). Best effort: an error leaves them mapped.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and never written, so a page
        // dropped here reads back with the same bytes from the file; no
        // slice into it changes value.
        let _ = unsafe {
            self.mmap
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// [`GgufFile::release_pages`] for the pages holding one tensor's
    /// bytes (rounded out to whole pages: a neighbour's bytes on a shared
    /// page read back from the file), so a loader that copies tensors out
    /// one by one never holds the whole mapped file at once.
    pub fn release_tensor_pages(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let start = info.offset as usize / PAGE * PAGE;
            let end = ((info.offset + info.size) as usize)
                .next_multiple_of(PAGE)
                .min(self.mmap.len());
            if end > start {
                // SAFETY: as in `release_pages`: the mapping is read-only.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.required(key)?
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "a string"))
    }

    /// A required integer value (any integer width).
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.required(key)?
            .as_i64()
            .ok_or_else(|| self.wrong_type(key, "an integer"))
    }

    /// A required numeric value.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.required(key)?
            .as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number"))
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self
            .required(key)?
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings"))
            })
            .collect()
    }

    /// A required array of integers.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let arr = self
            .required(key)?
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array"))?;
        arr.iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| self.wrong_type(key, "an array of integers"))
            })
            .collect()
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor's table entry by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset as usize..(info.offset + info.size) as usize]
    }

    fn required(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            message: "missing".into(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &str) -> GgufError {
        let found = self
            .metadata
            .get(key)
            .map(Value::describe)
            .unwrap_or_default();
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            message: format!("expected {expected}, found {found}"),
        }
    }
}

struct Cursor<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                needed: self.pos as u64 + n as u64,
                len: self.data.len() as u64,
            })?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn count(&mut self, what: &str) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        if n > MAX_COUNT {
            return Err(self.malformed(format!("{what} {n} is implausibly large")));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(what)? as usize;
        let b = self.bytes(len, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| self.malformed(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        let what = format!("value of '{key}'");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => Value::Bool(self.array::<1>(&what)?[0] != 0),
            8 => Value::String(self.string(&what)?),
            9 if depth < 4 => {
                let inner = self.u32(&what)?;
                let n = self.count(&what)?;
                let mut out = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    out.push(self.value(inner, key, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(self.malformed(format!("'{key}' has unknown value type {other}"))),
        })
    }

    fn malformed(&self, message: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            message,
        }
    }
}
