//! Several adapters at once, and adapters combined into one, against PEFT
//! (fixtures/peft/combine/make.py made the references on the tiny
//! Llama of fixtures/tiny-hf): logits of stacked adapters (weighted, a
//! DoRA adapter first), and `add_weighted_adapter`'s linear, cat and svd
//! results, factor by factor and by logits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use skillet_adapters::{
    Combine, LoraAdapter, PeftFile, Stacked, combine, read_lora_peft, write_peft_file,
};
use skillet_models::{
    Adapted, Adapter, CachedBatch, CachedChunk, CausalLm, ForwardInput, LoadOptions, Model,
    ModelSource,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/peft/combine")
}

fn base() -> Model {
    ModelSource::open(&dir().join("../../tiny-hf/llama"))
        .unwrap()
        .load_model(LoadOptions::default())
        .unwrap()
}

fn ids() -> Vec<Vec<u32>> {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap())
            .unwrap();
    serde_json::from_value(record["ids"].clone()).unwrap()
}

fn reference(name: &str) -> Tensor {
    candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu)
        .unwrap()
        .remove(name)
        .unwrap()
}

fn logits(m: &Model, adapter: Option<Arc<dyn Adapter>>) -> Tensor {
    let flat: Vec<u32> = ids().concat();
    let input = ForwardInput::new(Tensor::from_vec(flat, (2, 10), &Device::Cpu).unwrap());
    Adapted::new(m, adapter).forward(&input).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn load(m: &Model, name: &str, weight: f64) -> Arc<dyn Adapter> {
    Arc::new(
        LoraAdapter::load(m, &dir().join(name))
            .unwrap()
            .weighted(weight),
    )
}

fn stacked(m: &Model, parts: &[(&str, f64)]) -> Arc<dyn Adapter> {
    let parts = parts.iter().map(|&(n, w)| load(m, n, w)).collect();
    Arc::new(Stacked::new(parts, m.modules().len()).unwrap())
}

#[test]
fn stacked_adapters_match_peft_multiple_active_adapters() {
    let m = base();
    let plain = logits(&m, None);
    assert!(max_diff(&plain, &reference("base")) < 2e-5);
    for (name, parts) in [
        ("stack_ab", [("a", 1.0), ("b", 0.5)]),
        ("stack_ca", [("c", 1.0), ("a", -0.7)]),
    ] {
        let want = reference(name);
        let got = logits(&m, Some(stacked(&m, &parts)));
        let d = max_diff(&got, &want);
        eprintln!("{name}: max |logit diff| = {d:e}");
        assert!(d < 2e-5, "{name}: {d}");
        assert!(max_diff(&want, &plain) > 1e-2, "{name} changes the logits");
    }
}

/// The last position's logits of each sequence through the cached path,
/// which takes a stack of plain adapters as one product of concatenated
/// factors (the fused per-row kernel).
#[test]
fn a_stack_of_plain_adapters_serves_through_the_fused_rows() {
    let m = base();
    let ab = stacked(&m, &[("a", 1.0), ("b", 0.5)]);
    assert!(ab.factors(0).is_some(), "q_proj of a and b concatenated");
    let ca = stacked(&m, &[("c", 1.0), ("a", -0.7)]);
    assert!(ca.factors(0).is_none(), "DoRA is not a plain product");
    let seqs = ids();
    let mut cache = m.new_cache(3, 16);
    let batch = CachedBatch {
        chunks: vec![
            CachedChunk {
                slot: 0,
                tokens: seqs[0].clone(),
                adapter: Some(0),
            },
            CachedChunk {
                slot: 1,
                tokens: seqs[1].clone(),
                adapter: Some(1),
            },
            CachedChunk {
                slot: 2,
                tokens: seqs[1].clone(),
                adapter: None,
            },
        ],
        adapters: vec![ab, ca],
        ..CachedBatch::default()
    };
    let last = m.forward_cached(&batch, &mut cache).unwrap();
    let at = |t: &Tensor, row: usize| t.get(row).unwrap().get(9).unwrap();
    for (i, (name, row)) in [("stack_ab", 0), ("stack_ca", 1), ("base", 1)]
        .into_iter()
        .enumerate()
    {
        let d = max_diff(&last.get(i).unwrap(), &at(&reference(name), row));
        assert!(d < 2e-5, "{name}: {d}");
    }
}

fn peft(name: &str) -> PeftFile {
    read_lora_peft(&dir().join(name)).unwrap()
}

fn product(a: &Tensor, b: &Tensor) -> Tensor {
    b.to_dtype(DType::F64)
        .unwrap()
        .matmul(&a.to_dtype(DType::F64).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn combined_adapters_match_peft_add_weighted_adapter() {
    let m = base();
    let (a, b) = (peft("a"), peft("b"));
    let parts = [(&a, 0.7), (&b, 0.3)];
    for (name, how) in [
        ("linear", Combine::Linear),
        ("cat", Combine::Cat),
        ("svd", Combine::Svd { rank: None }),
        ("svd3", Combine::Svd { rank: Some(3) }),
    ] {
        let want = peft(&format!("combined_{name}"));
        let got = combine(&parts, how).unwrap();
        assert_eq!(got.config.r, want.config.r, "{name}");
        assert_eq!(got.config.lora_alpha, want.config.lora_alpha, "{name}");
        let mut modules: Vec<&String> = got.lora.keys().collect();
        let mut theirs: Vec<&String> = want.lora.keys().collect();
        modules.sort();
        theirs.sort();
        assert_eq!(modules, theirs, "{name}");
        for module in modules {
            let (ga, gb) = &got.lora[module];
            let (wa, wb) = &want.lora[module];
            assert_eq!(ga.dims(), wa.dims(), "{name} {module}");
            assert_eq!(gb.dims(), wb.dims(), "{name} {module}");
            if name.starts_with("svd") {
                // Singular vectors are defined up to sign: compare the
                // update and the singular values (B's column norms).
                let d = max_diff(&product(ga, gb), &product(wa, wb));
                assert!(d < 1e-6, "{name} {module}: update differs by {d}");
                let norms = |t: &Tensor| t.sqr().unwrap().sum(0).unwrap().sqrt().unwrap();
                let d = max_diff(&norms(gb), &norms(wb));
                assert!(d < 1e-6, "{name} {module}: singular values differ by {d}");
            } else {
                assert!(max_diff(ga, wa) < 1e-6, "{name} {module} A");
                assert!(max_diff(gb, wb) < 1e-6, "{name} {module} B");
            }
        }
        // Written, read back and applied: PEFT's logits.
        let out = tempfile::tempdir().unwrap();
        write_peft_file(out.path(), &got).unwrap();
        let adapter = LoraAdapter::load(&m, out.path()).unwrap();
        let d = max_diff(
            &logits(&m, Some(Arc::new(adapter))),
            &reference(&format!("combined_{name}")),
        );
        eprintln!("combined {name}: max |logit diff| = {d:e}");
        assert!(d < 2e-5, "{name}: {d}");
    }
}

#[test]
fn cat_is_the_exact_sum_and_bad_combinations_are_refused() {
    let m = base();
    let (a, b, c) = (peft("a"), peft("b"), peft("c"));
    // cat's update is exactly the weighted sum: the same logits as the
    // two adapters stacked at those weights.
    let cat = combine(&[(&a, 0.7), (&b, 0.3)], Combine::Cat).unwrap();
    let out = tempfile::tempdir().unwrap();
    write_peft_file(out.path(), &cat).unwrap();
    let one = logits(
        &m,
        Some(Arc::new(LoraAdapter::load(&m, out.path()).unwrap())),
    );
    let both = logits(&m, Some(stacked(&m, &[("a", 0.7), ("b", 0.3)])));
    assert!(max_diff(&one, &both) < 2e-5);

    let err = |r: skillet_adapters::Result<PeftFile>| r.unwrap_err().to_string();
    let e = err(combine(&[(&a, 1.0), (&c, 1.0)], Combine::Cat));
    assert!(e.contains("DoRA"), "{e}");
    let mut wide = b.clone();
    wide.config.r = 8;
    let e = err(combine(&[(&a, 1.0), (&wide, 1.0)], Combine::Linear));
    assert!(e.contains("one rank"), "{e}");
    let e = err(combine(
        &[(&a, 1.0), (&b, 1.0)],
        Combine::Svd { rank: Some(0) },
    ));
    assert!(e.contains("at least 1"), "{e}");
    let e = err(combine(&[(&a, f64::NAN), (&b, 1.0)], Combine::Cat));
    assert!(e.contains("weight"), "{e}");
    // Factors of another model's shapes for the same module name.
    let mut other = b.clone();
    let (qa, qb) = other
        .lora
        .get_mut("model.layers.0.self_attn.q_proj")
        .unwrap();
    *qa = Tensor::zeros((4, 7), DType::F32, &Device::Cpu).unwrap();
    *qb = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
    let e = err(combine(&[(&a, 1.0), (&other, 1.0)], Combine::Cat));
    assert!(e.contains("different models"), "{e}");
}
