//! Which GGML storage type each tensor gets in a GGUF export of a given
//! file type, following the choices of llama.cpp's `llama-quantize`
//! (`llama_tensor_get_type` in `llama-quant.cpp`): the output head (or the
//! tied embedding that serves as it) in Q6_K, Q4_K_M's extra bits on half
//! of the value and down projections, and a wider fallback where a row is
//! not a whole number of blocks. Norms and biases stay F32 (the writer's
//! rule for every 1-D tensor).

use skillet_gguf::GgmlType;

use crate::ModelConfig;

/// A GGUF file type Skillet exports (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// Every matrix in f32.
    F32,
    /// Every matrix in f16.
    F16,
    /// Every matrix in bf16.
    Bf16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit blocks of 32 with one scale; the head in Q6_K.
    Q4_0,
    /// 4-bit K-quant super-blocks, with Q6_K on the head and on half of
    /// the `v_proj` and `down_proj` layers (llama.cpp's "medium" mix).
    Q4KM,
    /// 6-bit K-quant super-blocks.
    Q6K,
}

impl FileType {
    /// Every type, in the order `--help` lists them.
    pub const ALL: [FileType; 7] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4KM,
        Self::Q6K,
    ];

    /// The name on the command line (llama.cpp's spelling, lower case).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4KM => "q4_k_m",
            Self::Q6K => "q6_k",
        }
    }

    /// The type named `name` (case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` number.
    pub fn ftype(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q6K => 18,
            Self::Bf16 => 32,
        }
    }

    /// The storage type of matrix `hf_name` (`[rows, cols]`) of a model
    /// with config `cfg`.
    pub fn storage(self, cfg: &ModelConfig, hf_name: &str, cols: usize) -> GgmlType {
        let head = hf_name == "lm_head.weight"
            || (cfg.tie_word_embeddings && hf_name == "model.embed_tokens.weight");
        let wanted = match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::BF16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 | Self::Q4KM | Self::Q6K if head => GgmlType::Q6K,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q6K => GgmlType::Q6K,
            Self::Q4KM => {
                let layer = crate::layer_of(hf_name);
                let more = (hf_name.ends_with("self_attn.v_proj.weight")
                    || hf_name.ends_with("mlp.down_proj.weight"))
                    && layer.is_some_and(|i| use_more_bits(i, cfg.num_hidden_layers));
                if more { GgmlType::Q6K } else { GgmlType::Q4K }
            }
        };
        fallback(wanted, cols)
    }
}

/// llama.cpp's pick of the layers that get more bits: the first and last
/// eighth, and every third layer between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    match layer.checked_sub(eighth) {
        None => true,
        Some(past) => layer >= 7 * layers / 8 || past % 3 == 2,
    }
}

/// The type llama.cpp falls back to where a row of `cols` is not a whole
/// number of `ty`'s blocks (K-quants pack 256 values per block: the
/// 576-wide rows of SmolLM2-135M, the 640-wide ones of Gemma 3 270M).
fn fallback(ty: GgmlType, cols: usize) -> GgmlType {
    if cols.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let wider = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q6K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    if cols.is_multiple_of(wider.block_size()) {
        wider
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_config;

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for t in FileType::ALL {
            assert_eq!(FileType::parse(t.name()), Some(t));
        }
        assert_eq!(FileType::parse("Q4_K_M"), Some(FileType::Q4KM));
        assert_eq!(FileType::parse("q3_k_s"), None);
    }

    #[test]
    fn q4_k_m_mixes_like_llama_quantize() {
        let mut cfg = tiny_config(64);
        cfg.num_hidden_layers = 16;
        cfg.tie_word_embeddings = true;
        let t = FileType::Q4KM;
        // Layers 0, 1 (first eighth), 4, 7, 10, 13 (every third), 14, 15.
        let more: Vec<usize> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
        let q = |name: &str, cols| t.storage(&cfg, name, cols);
        assert_eq!(
            q("model.layers.4.self_attn.v_proj.weight", 256),
            GgmlType::Q6K
        );
        assert_eq!(
            q("model.layers.5.self_attn.v_proj.weight", 256),
            GgmlType::Q4K
        );
        assert_eq!(
            q("model.layers.13.mlp.down_proj.weight", 512),
            GgmlType::Q6K
        );
        assert_eq!(q("model.layers.13.mlp.up_proj.weight", 512), GgmlType::Q4K);
        assert_eq!(q("model.embed_tokens.weight", 256), GgmlType::Q6K);
        // Rows that are not whole super-blocks fall back as llama.cpp does.
        assert_eq!(q("model.layers.5.mlp.up_proj.weight", 576), GgmlType::Q5_0);
        assert_eq!(q("model.embed_tokens.weight", 576), GgmlType::Q8_0);
        cfg.tie_word_embeddings = false;
        let q = |name: &str, cols| t.storage(&cfg, name, cols);
        assert_eq!(q("model.embed_tokens.weight", 256), GgmlType::Q4K);
        assert_eq!(q("lm_head.weight", 256), GgmlType::Q6K);
        assert_eq!(
            FileType::Q8_0.storage(&cfg, "lm_head.weight", 64),
            GgmlType::Q8_0
        );
        assert_eq!(
            FileType::Q4_0.storage(&cfg, "model.layers.0.mlp.up_proj.weight", 48),
            GgmlType::F16
        );
    }
}
