//! Several adapters in one batch: each row's logits equal that row run
//! alone with its own adapter (or none), in a padded forward and in a
//! ragged cached one; and an adapter that does not fit the model is
//! refused, never served as the base.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use skillet_adapters::{LoraAdapter, LoraSettings, Targets, save_peft};
use skillet_models::{
    Adapted, Adapter, Adapters, CachedBatch, CachedChunk, CausalLm, ForwardInput, LoadOptions,
    Model, random_weights, tiny_config,
};

fn model() -> Model {
    let cfg = tiny_config(97);
    Model::load(
        cfg.clone(),
        &random_weights(&cfg, 3).unwrap(),
        LoadOptions::default(),
    )
    .unwrap()
}

/// A LoRA adapter with every B set to a pattern (so it changes the output).
fn adapter(m: &Model, targets: &[&str], r: usize, seed: u64) -> LoraAdapter {
    let settings = LoraSettings::new(
        r,
        2.0 * r as f64,
        0.0,
        false,
        Targets::Names(targets.iter().map(|s| s.to_string()).collect()),
    )
    .unwrap();
    let a = LoraAdapter::new(m, &settings, seed, None).unwrap();
    for (i, v) in a.vars().iter().enumerate().skip(1).step_by(2) {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|k| (((k * 31 + i * 7 + seed as usize) % 13) as f32 - 6.0) * 0.02)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    a
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Logits of `ids` alone under `adapter`.
fn alone(m: &Model, adapter: Option<Arc<dyn Adapter>>, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = ForwardInput::new(
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    rows(
        &Adapted::new(m, adapter)
            .forward(&input)
            .unwrap()
            .squeeze(0)
            .unwrap(),
    )
}

#[test]
fn mixed_adapter_batch_equals_each_row_alone() {
    let m = model();
    let a1: Arc<dyn Adapter> = Arc::new(adapter(&m, &["q_proj", "v_proj", "down_proj"], 4, 1));
    // Another rank and other modules, the LM head included.
    let a2: Arc<dyn Adapter> = Arc::new(adapter(&m, &["o_proj", "up_proj", "lm_head"], 2, 2));
    let prompts: [&[u32]; 4] = [
        &[3, 14, 15, 92, 65],
        &[27, 18, 28, 18, 2],
        &[1, 2, 3, 4, 5],
        &[9, 9, 8, 7, 6],
    ];
    let which = [Some(0), None, Some(1), Some(0)];
    let want: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .zip(which)
        .map(|(p, w)| alone(&m, w.map(|i| [&a1, &a2][i].clone()), p))
        .collect();
    // The adapters really differ from each other and from the base.
    assert!(max_diff(&want[0], &alone(&m, None, prompts[0])) > 1e-3);
    assert!(max_diff(&want[2], &alone(&m, None, prompts[2])) > 1e-3);

    // Padded batch of four rows, each with its own adapter.
    let flat: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut input = ForwardInput::new(Tensor::from_vec(flat, (4, 5), &Device::Cpu).unwrap());
    input.adapters = Adapters::per_row(vec![a1.clone(), a2.clone()], which.to_vec()).unwrap();
    let out = m.forward(&input).unwrap();
    for (i, w) in want.iter().enumerate() {
        let got = rows(&out.get(i).unwrap());
        assert!(max_diff(&got, w) < 1e-5, "row {i}: {}", max_diff(&got, w));
    }

    // Ragged cached batch: the fused per-row kernel.
    let mut cache = m.new_cache(4, 16);
    let batch = CachedBatch {
        chunks: prompts
            .iter()
            .zip(which)
            .enumerate()
            .map(|(slot, (p, w))| CachedChunk {
                slot,
                tokens: p.to_vec(),
                adapter: w,
            })
            .collect(),
        adapters: vec![a1.clone(), a2.clone()],
        ..CachedBatch::default()
    };
    let last = rows(&m.forward_cached(&batch, &mut cache).unwrap());
    for (i, w) in want.iter().enumerate() {
        assert!(max_diff(&last[i..i + 1], &w[4..]) < 1e-5, "row {i}");
    }
}

#[test]
fn adapters_that_do_not_fit_are_refused() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    // Saved for a model whose layers are named otherwise: no target matches.
    let good = adapter(&m, &["q_proj"], 2, 5);
    save_peft(&good, dir.path(), None).unwrap();
    assert!(LoraAdapter::load(&m, dir.path()).is_ok());
    let cfg_path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("\"q_proj\"", "\"query_key_value\"")).unwrap();
    let err = LoraAdapter::load(&m, dir.path()).unwrap_err().to_string();
    assert!(err.contains("matched no linear layer"), "{err}");
    // Targets that select more modules than the file has weights for.
    std::fs::write(
        &cfg_path,
        text.replace("\"q_proj\"", "\"q_proj\", \"k_proj\""),
    )
    .unwrap();
    let err = LoraAdapter::load(&m, dir.path()).unwrap_err().to_string();
    assert!(err.contains("no weights for"), "{err}");
    // Wrong shapes (another rank in the config than in the file).
    std::fs::write(&cfg_path, text.replace("\"r\": 2", "\"r\": 3")).unwrap();
    let err = LoraAdapter::load(&m, dir.path()).unwrap_err().to_string();
    assert!(err.contains("expected"), "{err}");
    // Non-finite weights.
    std::fs::write(&cfg_path, &text).unwrap();
    let nan = adapter(&m, &["q_proj"], 2, 5);
    let b = &nan.vars()[1];
    b.set(&(b.as_tensor() * f64::NAN).unwrap()).unwrap();
    save_peft(&nan, dir.path(), None).unwrap();
    let err = LoraAdapter::load(&m, dir.path()).unwrap_err().to_string();
    assert!(err.contains("not all finite"), "{err}");
    // A corrupted safetensors file.
    std::fs::write(
        dir.path().join("adapter_model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
    )
    .unwrap();
    assert!(LoraAdapter::load(&m, dir.path()).is_err());
}
