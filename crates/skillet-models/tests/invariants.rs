//! Invariants of the model on tiny random weights built in code: padding
//! and batching change nothing, the KV cache changes nothing, every weight
//! source (memory, GGUF in each storage type, HF folder) gives one model,
//! and bad files give clear errors.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use skillet_gguf::{GgmlType, GgufFile, Value};
use skillet_models::export::{TokenIds, write_gguf, write_hf_weights};
use skillet_models::{
    Activations, Adapters, Architecture, BaseLinear, CachedBatch, CachedChunk, CausalLm,
    ForwardInput, KvCache, Linear, LoadOptions, MemoryWeights, Model, ModelConfig, ModelError,
    ModelSource, Weight, random_weights, tiny_config, tiny_config_for,
};

const TOL: f32 = 2e-5;

fn model(cfg: &ModelConfig, w: &MemoryWeights) -> Model {
    Model::load(cfg.clone(), w, LoadOptions::default()).unwrap()
}

fn logits(m: &dyn CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = ForwardInput::new(
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    single_row(m, &input)
}

/// Logits of a one-sequence batch, one row per position.
fn single_row(m: &dyn CausalLm, input: &ForwardInput) -> Vec<Vec<f32>> {
    m.forward(input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn batch(rows: &[Vec<u32>]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn tiny() -> (ModelConfig, MemoryWeights) {
    let cfg = tiny_config(97);
    let w = random_weights(&cfg, 7).unwrap();
    (cfg, w)
}

/// Tiny models of each decoder implementation and its switches.
fn tiny_models() -> Vec<(ModelConfig, MemoryWeights)> {
    [
        Architecture::Llama,
        Architecture::Qwen3,
        Architecture::Gemma3,
    ]
    .into_iter()
    .map(|arch| {
        let cfg = tiny_config_for(arch, 97);
        let w = random_weights(&cfg, 7).unwrap();
        (cfg, w)
    })
    .collect()
}

#[test]
fn right_padded_batch_equals_one_at_a_time() {
    for (cfg, w) in tiny_models() {
        let m = model(&cfg, &w);
        let a = vec![3u32, 14, 15, 92, 65, 35, 89];
        let b = vec![27u32, 18, 28, 18];
        let padded_b = [b.clone(), vec![0; 3]].concat();
        let mask = [vec![1u8; 7], vec![1, 1, 1, 1, 0, 0, 0]].concat();
        let input = ForwardInput {
            ids: batch(&[a.clone(), padded_b]),
            key_mask: Some(mask),
            positions: None,
            segments: None,
            adapters: Adapters::none(),
        };
        let out = m.forward(&input).unwrap().to_vec3::<f32>().unwrap();
        assert!(max_diff(&out[0], &logits(&m, &a)) < TOL);
        assert!(max_diff(&out[1][..4], &logits(&m, &b)) < TOL);
    }
}

#[test]
fn left_padded_batch_with_positions_equals_one_at_a_time() {
    for (cfg, w) in tiny_models() {
        let m = model(&cfg, &w);
        let a = vec![3u32, 14, 15, 92, 65, 35, 89];
        let b = vec![27u32, 18, 28, 18];
        let mask = [vec![1u8; 7], vec![0, 0, 0, 1, 1, 1, 1]].concat();
        let positions = [(0..7).collect::<Vec<u32>>(), vec![0, 0, 0, 0, 1, 2, 3]].concat();
        let input = ForwardInput {
            ids: batch(&[a.clone(), [vec![0; 3], b.clone()].concat()]),
            key_mask: Some(mask),
            positions: Some(positions),
            segments: None,
            adapters: Adapters::none(),
        };
        let out = m.forward(&input).unwrap().to_vec3::<f32>().unwrap();
        assert!(max_diff(&out[0], &logits(&m, &a)) < TOL);
        assert!(max_diff(&out[1][3..], &logits(&m, &b)) < TOL);
    }
}

#[test]
fn packed_sequences_equal_separate_runs() {
    for (cfg, w) in tiny_models() {
        let m = model(&cfg, &w);
        let a = vec![3u32, 14, 15, 92, 65];
        let b = vec![27u32, 18, 28];
        let input = ForwardInput {
            ids: batch(&[[a.clone(), b.clone()].concat()]),
            key_mask: None,
            positions: Some(vec![0, 1, 2, 3, 4, 0, 1, 2]),
            segments: Some(vec![0, 0, 0, 0, 0, 1, 1, 1]),
            adapters: Adapters::none(),
        };
        let out = single_row(&m, &input);
        assert!(max_diff(&out[..5], &logits(&m, &a)) < TOL);
        assert!(max_diff(&out[5..], &logits(&m, &b)) < TOL);
        // Without segments the second example would see the first.
        let leaky = ForwardInput {
            segments: None,
            ..input
        };
        let out = single_row(&m, &leaky);
        assert!(max_diff(&out[5..], &logits(&m, &b)) > 1e-3);
    }
}

/// One cached call: `(slot, tokens)` per sequence, no adapters; the
/// logits of each sequence's last token.
fn cached(m: &Model, cache: &mut KvCache, chunks: &[(usize, &[u32])]) -> Vec<Vec<f32>> {
    cached_with(m, cache, chunks, Activations::F32)
}

/// [`cached`] with quantized products taking their inputs as `activations`.
fn cached_with(
    m: &Model,
    cache: &mut KvCache,
    chunks: &[(usize, &[u32])],
    activations: Activations,
) -> Vec<Vec<f32>> {
    let batch = CachedBatch {
        chunks: chunks
            .iter()
            .map(|&(slot, tokens)| CachedChunk {
                slot,
                tokens: tokens.to_vec(),
                adapter: None,
            })
            .collect(),
        adapters: vec![],
        activations,
    };
    m.forward_cached(&batch, cache).unwrap().to_vec2().unwrap()
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    for (cfg, w) in tiny_models() {
        let m = model(&cfg, &w);
        let ids = vec![5u32, 9, 13, 2, 77, 41, 8, 8, 60];
        let full = logits(&m, &ids);
        // Prefill 5, then one token at a time.
        let mut cache = m.new_cache(1, 16);
        let mut got = cached(&m, &mut cache, &[(0, &ids[..5])]);
        for t in &ids[5..] {
            got.extend(cached(&m, &mut cache, &[(0, std::slice::from_ref(t))]));
        }
        assert_eq!(cache.len(0), ids.len());
        assert!(
            max_diff(&got, &full[4..]) < TOL,
            "{}",
            max_diff(&got, &full[4..])
        );
        // Chunked prefill (4 then 5) as well.
        let mut cache = m.new_cache(1, 16);
        let mut got = cached(&m, &mut cache, &[(0, &ids[..4])]);
        got.extend(cached(&m, &mut cache, &[(0, &ids[4..])]));
        assert!(max_diff(&got, &[full[3].clone(), full[8].clone()]) < TOL);
        // A full slot refuses more.
        assert!(
            m.forward_cached(
                &CachedBatch {
                    chunks: vec![CachedChunk {
                        slot: 0,
                        tokens: vec![1; 8],
                        adapter: None,
                    }],
                    ..CachedBatch::default()
                },
                &mut cache
            )
            .is_err()
        );
    }
}

#[test]
fn ragged_cached_batch_equals_single_sequences() {
    for (cfg, w) in tiny_models() {
        let m = model(&cfg, &w);
        let a = vec![3u32, 14, 15, 92, 65];
        let b = vec![27u32, 18];
        let c = vec![40u32, 41, 42, 43, 44, 45, 46];
        let mut cache = m.new_cache(3, 32);
        // Two prompts of different lengths together, no padding.
        let out = cached(&m, &mut cache, &[(0, &a), (2, &b)]);
        assert!(max_diff(&out[..1], &logits(&m, &a)[4..]) < TOL);
        assert!(max_diff(&out[1..], &logits(&m, &b)[1..]) < TOL);
        // Decode steps of both, while a third sequence joins with its prompt.
        let out = cached(&m, &mut cache, &[(0, &[50]), (1, &c), (2, &[51])]);
        let full_a = logits(&m, &[a.clone(), vec![50]].concat());
        let full_b = logits(&m, &[b.clone(), vec![51]].concat());
        assert!(max_diff(&out[..1], &full_a[5..]) < TOL);
        assert!(max_diff(&out[1..2], &logits(&m, &c)[6..]) < TOL);
        assert!(max_diff(&out[2..], &full_b[2..]) < TOL);
        // A freed slot starts over.
        cache.clear(0);
        let out = cached(&m, &mut cache, &[(0, &b)]);
        assert!(max_diff(&out, &logits(&m, &b)[1..]) < TOL);
    }
}

#[test]
fn hf_folder_round_trip_is_exact() {
    for (cfg, w) in tiny_models() {
        let dir = tempfile::tempdir().unwrap();
        write_hf_weights(
            &cfg,
            &w,
            dir.path(),
            TokenIds {
                bos: Some(1),
                eos: Some(2),
                pad: None,
            },
        )
        .unwrap();
        let src = ModelSource::open(dir.path()).unwrap();
        assert_eq!(src.config().unwrap(), cfg);
        let loaded = src.load_model(LoadOptions::default()).unwrap();
        let ids = [1u32, 2, 3, 50, 60];
        assert_eq!(
            max_diff(&logits(&loaded, &ids), &logits(&model(&cfg, &w), &ids)),
            0.0
        );
    }
}

/// A config whose widths are multiples of 256, as K-quant blocks need.
fn k_quant_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        ..tiny_config(300)
    }
}

fn candle_type(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q6K => GgmlDType::Q6K,
        other => panic!("not used here: {other}"),
    }
}

#[test]
fn gguf_in_every_storage_type_loads_the_same_model() {
    let cfg = k_quant_config();
    let w = random_weights(&cfg, 3).unwrap();
    let ids = [1u32, 7, 99, 250, 4, 4, 180];
    let dir = tempfile::tempdir().unwrap();

    // F32: exact, which checks names and llama.cpp's Q/K row order.
    let path = dir.path().join("f32.gguf");
    write_gguf(&cfg, &w, &path, &|_| GgmlType::F32, vec![]).unwrap();
    let loaded = ModelSource::open(&path)
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap();
    assert_eq!(
        max_diff(&logits(&loaded, &ids), &logits(&model(&cfg, &w), &ids)),
        0.0
    );

    let types = [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];
    for ty in types {
        let path = dir.path().join(format!("{ty}.gguf"));
        write_gguf(&cfg, &w, &path, &|_| ty, vec![]).unwrap();
        // Expected: the f32 model with every matrix rounded through `ty`.
        let mut rounded = w.clone();
        for t in rounded.tensors.values_mut().filter(|t| t.rank() == 2) {
            *t = QTensor::quantize(t, candle_type(ty))
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
        }
        let expected = logits(&model(&cfg, &rounded), &ids);
        let source = ModelSource::open(&path).unwrap();
        for keep_quantized in [false, true] {
            let got = logits(
                &source
                    .load_model(LoadOptions {
                        keep_quantized,
                        ..Default::default()
                    })
                    .unwrap(),
                &ids,
            );
            let d = max_diff(&got, &expected);
            assert!(d < 1e-4, "{ty} keep_quantized={keep_quantized}: {d}");
        }
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().ggml_type, ty);
    }
}

#[test]
fn gguf_round_trip_of_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1u32, 7, 50, 90, 4, 4, 33];
    for (cfg, w) in tiny_models() {
        let path = dir.path().join(format!("{:?}.gguf", cfg.architecture));
        write_gguf(&cfg, &w, &path, &|_| GgmlType::F32, vec![]).unwrap();
        let source = ModelSource::open(&path).unwrap();
        let read = source.config().unwrap();
        assert_eq!(
            (read.architecture, &read.layer_types, read.qk_norm),
            (cfg.architecture, &cfg.layer_types, cfg.qk_norm)
        );
        assert_eq!(
            (
                read.local_rope,
                read.final_logit_softcapping,
                read.hidden_act
            ),
            (cfg.local_rope, cfg.final_logit_softcapping, cfg.hidden_act)
        );
        let loaded = source.load_model(LoadOptions::default()).unwrap();
        let d = max_diff(&logits(&loaded, &ids), &logits(&model(&cfg, &w), &ids));
        // Gemma's norms go through `1 + w` in the file and back.
        assert!(d < 1e-5, "{:?}: {d}", cfg.architecture);
    }
}

#[derive(Debug)]
struct Zero(usize, usize);

impl Linear for Zero {
    fn forward(&self, x: &Tensor) -> skillet_models::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = self.1;
        Ok(Tensor::zeros(dims, x.dtype(), x.device())?)
    }
    fn weight_f32(&self) -> skillet_models::Result<Tensor> {
        Ok(Tensor::zeros((self.1, self.0), DType::F32, &Device::Cpu)?)
    }
    fn in_features(&self) -> usize {
        self.0
    }
    fn out_features(&self) -> usize {
        self.1
    }
}

#[test]
fn linear_layers_can_be_swapped_by_module_name() {
    let (cfg, w) = tiny();
    let mut m = model(&cfg, &w);
    let ids = [4u32, 8, 15, 16, 23, 42];
    let before = logits(&m, &ids);
    let mut names = Vec::new();
    m.visit_linears_mut(|name, slot| {
        names.push(name.to_string());
        if name == "model.layers.1.mlp.down_proj" {
            *slot = Box::new(Zero(slot.in_features(), slot.out_features()));
        }
    });
    assert_eq!(names.len(), 7 * cfg.num_hidden_layers + 1);
    assert!(names.contains(&"model.layers.0.self_attn.q_proj".to_string()));
    assert!(max_diff(&logits(&m, &ids), &before) > 1e-3);
    // Putting an equivalent base layer back restores the output exactly.
    let down = w.tensors["model.layers.1.mlp.down_proj.weight"].clone();
    m.visit_linears_mut(|name, slot| {
        if name == "model.layers.1.mlp.down_proj" {
            *slot = Box::new(BaseLinear::new(Weight::Dense(down.clone()), None));
        }
    });
    assert_eq!(max_diff(&logits(&m, &ids), &before), 0.0);
}

#[test]
fn load_errors_name_the_file_and_tensor() {
    let (cfg, w) = tiny();
    let dir = tempfile::tempdir().unwrap();

    let mut missing = w.clone();
    missing.tensors.remove("model.layers.1.mlp.up_proj.weight");
    let err = Model::load(cfg.clone(), &missing, LoadOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.up_proj.weight")
    );

    // Shape mismatch in a GGUF file names the GGUF tensor: the metadata
    // is patched to claim an MLP width of 95 while the tensors have 96.
    let path = dir.path().join("wrong.gguf");
    write_gguf(&cfg, &w, &path, &|_| GgmlType::F32, vec![]).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let key = b"llama.feed_forward_length";
    let pos = bytes.windows(key.len()).position(|win| win == key).unwrap() + key.len() + 4;
    bytes[pos..pos + 4].copy_from_slice(&95u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = ModelSource::open(&path)
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.0.ffn_gate.weight")
            && err.contains("[95, 64]")
            && err.contains("[96, 64]"),
        "{err}"
    );
    assert!(err.contains("wrong.gguf"), "{err}");

    // Unknown architecture, GGUF and HF.
    let path = dir.path().join("arch.gguf");
    write_gguf(
        &cfg,
        &w,
        &path,
        &|_| GgmlType::F32,
        vec![(
            "general.architecture".into(),
            Value::String("gptneox".into()),
        )],
    )
    .unwrap();
    let err = ModelSource::open(&path)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("unsupported architecture 'gptneox'"), "{err}");
    let hf = dir.path().join("hf");
    write_hf_weights(&cfg, &w, &hf, TokenIds::default()).unwrap();
    let text = std::fs::read_to_string(hf.join("config.json"))
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
    std::fs::write(hf.join("config.json"), text).unwrap();
    let err = ModelSource::open(&hf)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unsupported architecture 'gpt_neox'") && err.contains("config.json"),
        "{err}"
    );

    // Not a model at all.
    let err = ModelSource::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a model"), "{err}");
    let err = ModelSource::open(&dir.path().join("nope.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.gguf"), "{err}");
}

/// The tiny model written as Q8_0 GGUF and loaded in its quantized blocks.
fn tiny_q8_kept_quantized() -> Model {
    let (cfg, w) = tiny();
    let dir = tempfile::tempdir().unwrap();
    kept_quantized(&cfg, &w, dir.path().join("q8.gguf"), GgmlType::Q8_0)
}

/// `w` written as GGUF in `ty` blocks at `path` and loaded in them.
fn kept_quantized(
    cfg: &ModelConfig,
    w: &MemoryWeights,
    path: std::path::PathBuf,
    ty: GgmlType,
) -> Model {
    write_gguf(cfg, w, &path, &|_| ty, vec![]).unwrap();
    ModelSource::open(&path)
        .unwrap()
        .load_model(LoadOptions {
            keep_quantized: true,
            ..Default::default()
        })
        .unwrap()
}

#[test]
fn a_sequence_gets_the_same_numbers_alone_or_batched_on_a_quantized_base() {
    // In a cached call every row, prompt or decode, goes through the
    // quantized blocks on its own: how many rows share a call (here more
    // than the block kernel's limit in an ordinary forward) changes nothing.
    let m = tiny_q8_kept_quantized();
    let a = vec![3u32, 14, 15, 92, 65];
    let mut exact = Vec::new();
    // Inputs in f32, and rounded to int8 (on AMX tiles where the CPU has
    // them, else plain loops).
    for activations in [Activations::F32, Activations::Int8] {
        let mut cache = m.new_cache(24, 16);
        let alone_prefill = cached_with(&m, &mut cache, &[(0, &a)], activations);
        let alone_decode = cached_with(&m, &mut cache, &[(0, &[50])], activations);
        // The same sequence in slot 1, next to 22 others.
        let others: Vec<Vec<u32>> = (0..22).map(|i| vec![(i * 3 + 1) as u32 % 90 + 1]).collect();
        let mut chunks: Vec<(usize, &[u32])> = vec![(1, a.as_slice())];
        chunks.extend(
            others
                .iter()
                .enumerate()
                .map(|(i, t)| (i + 2, t.as_slice())),
        );
        let batched_prefill = cached_with(&m, &mut cache, &chunks, activations);
        chunks[0] = (1, &[50]);
        let long = vec![7u32; 9];
        chunks[5] = (6, long.as_slice());
        let batched_decode = cached_with(&m, &mut cache, &chunks, activations);
        assert_eq!(batched_prefill[0], alone_prefill[0], "{activations:?}");
        assert_eq!(batched_decode[0], alone_decode[0], "{activations:?}");
        if activations == Activations::F32 {
            exact = vec![alone_prefill[0].clone(), alone_decode[0].clone()];
        } else {
            // Rounding the inputs to 8 bits moves the logits by about 1%
            // of their spread, no more.
            for (got, want) in [&alone_prefill[0], &alone_decode[0]]
                .into_iter()
                .zip(&exact)
            {
                let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = max_diff(std::slice::from_ref(got), std::slice::from_ref(want));
                assert!(
                    d > 0.0 && d < 0.05 * spread,
                    "int8 logits off by {d} (spread {spread})"
                );
            }
        }
    }
}

#[test]
fn decode_teams_of_any_size_give_the_layer_by_layer_bits() {
    // Incremental calls of few rows run from the first layer to the
    // logits in one team of threads; the numbers must be the layer-by-layer
    // path's exactly, for every block type and input rounding, for ragged
    // batches of several sequences, within a sliding window, and however
    // many threads the team has.
    let dir = tempfile::tempdir().unwrap();
    let window = ModelConfig {
        architecture: Architecture::Mistral,
        sliding_window: Some(4),
        ..tiny_config(97)
    };
    for (cfg, ty) in [
        (tiny_config(97), GgmlType::Q8_0),
        (tiny_config(97), GgmlType::Q4_1),
        (window, GgmlType::Q4_1),
    ] {
        let w = random_weights(&cfg, 11).unwrap();
        let team = kept_quantized(&cfg, &w, dir.path().join("team.gguf"), ty);
        let mut layered = kept_quantized(&cfg, &w, dir.path().join("layered.gguf"), ty);
        layered.set_team_decode(false);
        let a = [3u32, 14, 15, 92, 65, 35];
        let b = [27u32, 18, 28];
        let long: Vec<u32> = (0..20).map(|i| (i * 5 + 2) % 96 + 1).collect();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for activations in [Activations::F32, Activations::Int8] {
                    let mut caches = [team.new_cache(3, 48), layered.new_cache(3, 48)];
                    let mut step = |chunks: &[(usize, &[u32])]| {
                        let [tc, lc] = &mut caches;
                        let got = cached_with(&team, tc, chunks, activations);
                        let want = cached_with(&layered, lc, chunks, activations);
                        assert!(
                            got == want,
                            "{ty:?} {:?}, {threads} threads, {activations:?}, {chunks:?}",
                            cfg.sliding_window
                        );
                    };
                    // Two prompts together, then decode steps of both
                    // (past the window), then a prompt longer than a
                    // team takes beside a decode step.
                    step(&[(0, &a), (1, &b)]);
                    for t in 0..6u32 {
                        step(&[(0, &[40 + t]), (1, &[60 + t])]);
                    }
                    step(&[(2, &long), (0, &[7])]);
                    step(&[(2, &[8]), (1, &[9]), (0, &[10])]);
                }
            });
        }
    }
}

#[test]
fn a_prompt_gets_the_same_logits_however_it_is_split() {
    // A server may prefill a prompt whole, in chunks, or after a reused
    // prefix, next to other sequences: the last token's logits must not
    // change by a bit, or a request's answer would depend on the traffic.
    let quantized = tiny_q8_kept_quantized();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 96 + 1).collect();
    let other = [11u32, 12, 13];
    for activations in [Activations::F32, Activations::Int8] {
        let mut cache = quantized.new_cache(2, 48);
        let whole = cached_with(&quantized, &mut cache, &[(0, &prompt)], activations);
        for splits in [&[1, 39][..], &[17, 23], &[20, 20], &[39, 1], &[5, 30, 5]] {
            cache.clear(0);
            cache.clear(1);
            cached_with(&quantized, &mut cache, &[(1, &other)], activations);
            let mut start = 0;
            let mut last = Vec::new();
            for &len in splits {
                let chunk = &prompt[start..start + len];
                let out = cached_with(
                    &quantized,
                    &mut cache,
                    &[(1, &[14]), (0, chunk)],
                    activations,
                );
                last = out[1].clone();
                start += len;
                cache.clear(1);
                cached_with(&quantized, &mut cache, &[(1, &other)], activations);
            }
            assert!(last == whole[0], "{activations:?}, split {splits:?}");
        }
    }
}

#[test]
fn an_nf4_base_is_the_model_of_its_dequantized_weights() {
    // Quantized at load (QLoRA on a dense base): the layers' projections
    // become NF4, whose products equal those of the dense model holding
    // the same dequantized values; the head, embeddings and norms stay.
    // Tiny's MLP is 96 wide: down_proj's blocks of 64 span two rows.
    let (cfg, w) = tiny();
    let ids = [5u32, 17, 3, 60, 2, 41, 41, 9];
    for double_quant in [false, true] {
        let opts = LoadOptions {
            quantize: Some(skillet_models::QuantizeBase::Nf4 { double_quant }),
            ..Default::default()
        };
        let nf4 = Model::load(cfg.clone(), &w, opts).unwrap();
        let mut dense = MemoryWeights::default();
        for (name, t) in &w.tensors {
            let t = if name.contains(".self_attn.") || name.contains(".mlp.") {
                let (rows, cols) = t.dims2().unwrap();
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let q = skillet_models::Nf4::quantize(&v, cols, double_quant).unwrap();
                let back = q.into_matrix(rows, cols).unwrap().dequantize();
                Tensor::from_vec(back, (rows, cols), &Device::Cpu).unwrap()
            } else {
                t.clone()
            };
            dense.tensors.insert(name.clone(), t);
        }
        let want = logits(&model(&cfg, &dense), &ids);
        let got = logits(&nf4, &ids);
        assert!(max_diff(&got, &want) < TOL, "{}", max_diff(&got, &want));
        // And it is not the original model (the quantization did happen).
        assert!(max_diff(&got, &logits(&model(&cfg, &w), &ids)) > 1e-3);
    }
    // Full fine-tuning cannot train a base quantized at load.
    let opts = LoadOptions {
        trainable: true,
        quantize: Some(skillet_models::QuantizeBase::Nf4 { double_quant: true }),
        ..Default::default()
    };
    let e = Model::load(cfg, &w, opts).unwrap_err().to_string();
    assert!(e.contains("cannot be trained"), "{e}");
}

/// A weight in GGML blocks other than Q4_1 and Q8_0 (Q4_0 and Q5_0,
/// repacked into those at load; the K-quants) meets int8 activations as
/// llama.cpp's CPU backend does: its inputs rounded per 32 (Q8_0) or per
/// 256 (Q8_K), then multiplied by the dequantized weight (for Q4_0, no f16
/// rounding of the input sums, which llama.cpp's Q4_0 product does not
/// have); f32 activations leave them as they are. 40 rows: two stripes of
/// 16 for the integer kernels, and 8 rows for the plain loops.
#[test]
fn int8_activations_round_inputs_as_llama_cpp_for_every_block_type() {
    use skillet_kernels::{InputRounding, round_inputs};
    let (rows, cols) = (40, 512);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
        .collect();
    let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let xs: Vec<f32> = (0..3 * cols)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.173)
        .collect();
    let x = Tensor::from_vec(xs.clone(), (3, cols), &Device::Cpu).unwrap();
    for (dtype, how) in [
        (GgmlDType::Q4_0, InputRounding::Q8_0),
        (GgmlDType::Q5_0, InputRounding::Q8_0),
        (GgmlDType::Q4K, InputRounding::Q8K),
        (GgmlDType::Q6K, InputRounding::Q8K),
    ] {
        let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let lin = BaseLinear::new(Weight::Quantized(q), None);
        let got = lin.forward_rowwise(&x, Activations::Int8).unwrap();
        let rounded =
            Tensor::from_vec(round_inputs(&xs, cols, how), (3, cols), &Device::Cpu).unwrap();
        let want = rounded.matmul(&dense.t().unwrap()).unwrap();
        let exact = x.matmul(&dense.t().unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| max_diff(&a.to_vec2().unwrap(), &b.to_vec2().unwrap());
        assert!(diff(&got, &want) < 1e-4, "{dtype:?}: {}", diff(&got, &want));
        assert!(
            diff(&got, &exact) > 1e-3,
            "{dtype:?}: the inputs were rounded"
        );
        let f32s = lin.forward_rowwise(&x, Activations::F32).unwrap();
        assert!(diff(&f32s, &exact) < 1e-4, "{dtype:?}");
    }
}
