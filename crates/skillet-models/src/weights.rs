//! Where weights come from: GGUF files (possibly quantized) and safetensors
//! (single or sharded), both addressed by Hugging Face tensor names so the
//! model code has one naming scheme.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use skillet_gguf::{GgmlType, GgufFile, TensorInfo};

use crate::names::{gguf_name, is_norm};
use crate::{Architecture, ModelConfig, ModelError, Result};

/// A weight as stored: a dense f32 tensor, or frozen quantized blocks that
/// are dequantized when a computation needs f32.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense f32 values.
    Dense(Tensor),
    /// GGML block-quantized values (never trained; the LoRA base of QLoRA).
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// Row-major shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quantized(q) => q.shape().dims().to_vec(),
        }
    }

    /// Dense f32 values (dequantizing when needed).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.clone(),
            Weight::Quantized(q) => q.dequantize(device)?,
        })
    }
}

/// A set of named tensors, addressed by Hugging Face names
/// (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// The file errors should name.
    fn path(&self) -> &Path;
    /// The tensor's name inside the file (differs from the HF name in GGUF).
    fn file_name(&self, hf_name: &str) -> String;
    /// Whether the tensor exists.
    fn contains(&self, hf_name: &str) -> bool;
    /// Loads a tensor; `keep_quantized` keeps GGML blocks as they are.
    fn load(&self, hf_name: &str, keep_quantized: bool) -> Result<Weight>;
    /// Storage type names and how many tensors use each (for `inspect`).
    fn storage_types(&self) -> BTreeMap<String, usize>;
    /// Called once a model has copied out what it needs: a mapped file
    /// drops the pages that were read from resident memory.
    fn release_pages(&self) {}

    /// Loads a required tensor and checks its shape.
    fn load_checked(&self, hf_name: &str, shape: &[usize], keep_quantized: bool) -> Result<Weight> {
        if !self.contains(hf_name) {
            return Err(ModelError::MissingTensor {
                path: self.path().to_path_buf(),
                tensor: self.file_name(hf_name),
            });
        }
        let w = self.load(hf_name, keep_quantized)?;
        if w.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                path: self.path().to_path_buf(),
                tensor: self.file_name(hf_name),
                expected: shape.to_vec(),
                actual: w.shape(),
            });
        }
        Ok(w)
    }
}

/// Weights of a GGUF file, presented as the Hugging Face checkpoint would
/// hold them.
pub struct GgufWeights {
    file: Arc<GgufFile>,
    arch: Architecture,
    /// llama.cpp stores Q/K rows permuted for its interleaved RoPE; we undo
    /// it so the model matches the Hugging Face layout exactly.
    unpermute: Option<(usize, usize, usize)>,
}

impl GgufWeights {
    /// Wraps an open file of the model `cfg` describes.
    pub fn new(file: Arc<GgufFile>, cfg: &ModelConfig) -> Self {
        let arch = cfg.architecture;
        let unpermute = arch.gguf_permutes_qk().then_some((
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        ));
        Self {
            file,
            arch,
            unpermute,
        }
    }

    fn heads_to_unpermute(&self, hf_name: &str) -> Option<(usize, usize)> {
        let (heads, kv_heads, head_dim) = self.unpermute?;
        if hf_name.contains(".self_attn.q_proj.") {
            Some((heads, head_dim))
        } else if hf_name.contains(".self_attn.k_proj.") {
            Some((kv_heads, head_dim))
        } else {
            None
        }
    }
}

impl WeightSource for GgufWeights {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn file_name(&self, hf_name: &str) -> String {
        gguf_name(self.arch, hf_name)
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.file.tensor(&self.file_name(hf_name)).is_some()
    }

    fn load(&self, hf_name: &str, keep_quantized: bool) -> Result<Weight> {
        let name = self.file_name(hf_name);
        let info = self
            .file
            .tensor(&name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path().to_path_buf(),
                tensor: name.clone(),
            })?;
        let bytes = self.file.tensor_bytes(info);
        let bytes = match self.heads_to_unpermute(hf_name) {
            Some((heads, head_dim)) => {
                std::borrow::Cow::Owned(unpermute_rows(bytes, info, heads, head_dim, self.path())?)
            }
            None => std::borrow::Cow::Borrowed(bytes),
        };
        let w = decode(&bytes, info, keep_quantized, self.path())?;
        drop(bytes);
        self.file.release_tensor_pages(info);
        // Gemma's GGUF norms hold `1 + w` (llama.cpp's converter adds the
        // one); the checkpoint's `w` is what every other source gives.
        if self.arch.norm_adds_one() && is_norm(hf_name) {
            return Ok(Weight::Dense((w.to_dense(&Device::Cpu)? - 1.0)?));
        }
        Ok(w)
    }

    fn release_pages(&self) {
        self.file.release_pages();
    }

    fn storage_types(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for t in self.file.tensors() {
            *out.entry(t.ggml_type.name().to_string()).or_insert(0) += 1;
        }
        out
    }
}

/// Undoes llama.cpp's Q/K permutation. The converter wrote, per head,
/// `w.reshape(2, head_dim/2, in).swapaxes(0, 1)`, so HF row `c*half + i`
/// of a head is GGUF row `2*i + c`. Rows hold whole quantization blocks, so
/// this works on raw bytes of any storage type.
fn unpermute_rows(
    bytes: &[u8],
    info: &TensorInfo,
    heads: usize,
    head_dim: usize,
    path: &Path,
) -> Result<Vec<u8>> {
    let rows = info.shape[0];
    if rows != heads * head_dim || !head_dim.is_multiple_of(2) || !bytes.len().is_multiple_of(rows)
    {
        let mut expected = info.shape.clone();
        expected[0] = heads * head_dim;
        return Err(ModelError::ShapeMismatch {
            path: path.to_path_buf(),
            tensor: info.name.clone(),
            expected,
            actual: info.shape.clone(),
        });
    }
    let row_bytes = bytes.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        let (h, rem) = (r / head_dim, r % head_dim);
        let (c, i) = (rem / half, rem % half);
        let src = h * head_dim + 2 * i + c;
        out[r * row_bytes..(r + 1) * row_bytes]
            .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
    }
    Ok(out)
}

pub(crate) fn candle_type(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    }
}

fn decode(bytes: &[u8], info: &TensorInfo, keep_quantized: bool, path: &Path) -> Result<Weight> {
    let dev = Device::Cpu;
    let bad = |e: candle_core::Error| ModelError::BadTensor {
        path: path.to_path_buf(),
        tensor: info.name.clone(),
        message: e.to_string(),
    };
    let dense = |dtype: DType| -> Result<Weight> {
        let t = Tensor::from_raw_buffer(bytes, dtype, &info.shape, &dev).map_err(bad)?;
        Ok(Weight::Dense(t.to_dtype(DType::F32)?))
    };
    match info.ggml_type {
        GgmlType::F32 => dense(DType::F32),
        GgmlType::F16 => dense(DType::F16),
        GgmlType::BF16 => dense(DType::BF16),
        GgmlType::Q8_1 | GgmlType::Q8K => Err(ModelError::BadTensor {
            path: path.to_path_buf(),
            tensor: info.name.clone(),
            message: format!(
                "storage type {} is an intermediate type and cannot be dequantized",
                info.ggml_type
            ),
        }),
        q => {
            let qt =
                qtensor_from_ggml(candle_type(q), bytes, info.shape.clone(), &dev).map_err(bad)?;
            if keep_quantized {
                Ok(Weight::Quantized(Arc::new(qt)))
            } else {
                Ok(Weight::Dense(qt.dequantize(&dev).map_err(bad)?))
            }
        }
    }
}

/// Weights of a Hugging Face folder: `model.safetensors`, or shards listed
/// in `model.safetensors.index.json`; memory-mapped, converted to f32.
pub struct SafetensorsWeights {
    path: PathBuf,
    files: MmapedSafetensors,
    names: HashSet<String>,
    dtypes: BTreeMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens the weights of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let (path, shards) = if index.exists() {
            (index.clone(), shard_files(&index, dir)?)
        } else if single.exists() {
            (single.clone(), vec![single])
        } else {
            return Err(ModelError::Config {
                path: dir.to_path_buf(),
                message: "no model.safetensors or model.safetensors.index.json in the folder"
                    .into(),
            });
        };
        for s in &shards {
            if !s.exists() {
                return Err(ModelError::Io {
                    path: s.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                });
            }
        }
        // SAFETY: read-only mappings of files we do not modify.
        let files =
            unsafe { MmapedSafetensors::multi(&shards) }.map_err(|e| ModelError::Config {
                path: path.clone(),
                message: format!("cannot read safetensors: {e}"),
            })?;
        let mut names = HashSet::new();
        let mut dtypes = BTreeMap::new();
        for (name, view) in files.tensors() {
            *dtypes.entry(format!("{:?}", view.dtype())).or_insert(0) += 1;
            names.insert(name);
        }
        Ok(Self {
            path,
            files,
            names,
            dtypes,
        })
    }
}

fn shard_files(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: index.to_path_buf(),
        message: format!("invalid index: {e}"),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            path: index.to_path_buf(),
            message: "index has no 'weight_map' object".into(),
        })?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn file_name(&self, hf_name: &str) -> String {
        hf_name.to_string()
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.names.contains(hf_name)
    }

    fn load(&self, hf_name: &str, _keep_quantized: bool) -> Result<Weight> {
        let t = self
            .files
            .load(hf_name, &Device::Cpu)
            .map_err(|e| ModelError::BadTensor {
                path: self.path.clone(),
                tensor: hf_name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Weight::Dense(t.to_dtype(DType::F32)?))
    }

    fn storage_types(&self) -> BTreeMap<String, usize> {
        self.dtypes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of dim 4, one float column: HF rows 0..8.
        let (heads, hd) = (2usize, 4usize);
        let hf: Vec<f32> = (0..8).map(|v| v as f32).collect();
        // llama.cpp's permute: reshape(heads, 2, hd/2).swapaxes(1, 2).
        let mut gguf = [0f32; 8];
        for h in 0..heads {
            for c in 0..2 {
                for i in 0..hd / 2 {
                    gguf[h * hd + i * 2 + c] = hf[h * hd + c * (hd / 2) + i];
                }
            }
        }
        let bytes: Vec<u8> = gguf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let info = TensorInfo {
            name: "t".into(),
            shape: vec![8, 1],
            ggml_type: GgmlType::F32,
            offset: 0,
            size: 32,
        };
        let back = unpermute_rows(&bytes, &info, heads, hd, Path::new("x")).unwrap();
        let back: Vec<f32> = back
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, hf);
    }
}
