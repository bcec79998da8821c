//! Bad inputs give one clear error line and a non-zero exit, never a panic.

mod common;

use common::{expect_error, patch_tensor_type, tiny_gguf};
use skillet_gguf::{GgmlType, Value};

fn text_file(dir: &std::path::Path) -> String {
    let p = dir.join("t.txt");
    std::fs::write(&p, "hello there, tiny model").unwrap();
    p.display().to_string()
}

#[test]
fn missing_model_file() {
    let e = expect_error(&[
        "score",
        "--model",
        "/nonexistent/model.gguf",
        "--file",
        "/etc/hostname",
    ]);
    assert!(
        e.contains("/nonexistent/model.gguf") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    tiny_gguf(&p, GgmlType::F32, vec![]);
    let bytes = std::fs::read(&p).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 7, 100] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = expect_error(&["inspect", p.to_str().unwrap()]);
        assert!(e.contains("truncated GGUF") && e.contains("m.gguf"), "{e}");
    }
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.gguf");
    std::fs::write(&p, "this is a text file, not a model\n").unwrap();
    let e = expect_error(&["tokenize", "--model", p.to_str().unwrap(), "hi"]);
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn unsupported_quant_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq.gguf");
    tiny_gguf(&p, GgmlType::Q8_0, vec![]);
    patch_tensor_type(&p, "blk.1.ffn_up.weight", 16);
    let e = expect_error(&[
        "score",
        "--model",
        p.to_str().unwrap(),
        "--file",
        &text_file(dir.path()),
    ]);
    assert!(
        e.contains("'blk.1.ffn_up.weight'") && e.contains("IQ2_XXS"),
        "{e}"
    );
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("arch.gguf");
    tiny_gguf(
        &p,
        GgmlType::F32,
        vec![("general.architecture".into(), Value::String("rwkv6".into()))],
    );
    let e = expect_error(&["inspect", p.to_str().unwrap()]);
    assert!(
        e.contains("unsupported architecture 'rwkv6'") && e.contains("arch.gguf"),
        "{e}"
    );
}

#[test]
fn tensor_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shape.gguf");
    // The metadata claims 6 heads of width 16 while q_proj has 4 × 16 rows.
    tiny_gguf(
        &p,
        GgmlType::F32,
        vec![("llama.attention.head_count".into(), Value::U32(6))],
    );
    let e = expect_error(&[
        "score",
        "--model",
        p.to_str().unwrap(),
        "--file",
        &text_file(dir.path()),
    ]);
    assert!(
        e.contains("blk.0.attn_q.weight")
            && e.contains("expected [96, 64]")
            && e.contains("[64, 64]"),
        "{e}"
    );
}

#[test]
fn hf_folder_without_tokenizer_and_other_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    tiny_gguf(&gguf, GgmlType::F32, vec![]);
    let hf = dir.path().join("hf");
    let r = common::skillet(&[
        "convert",
        "--model",
        gguf.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let e = expect_error(&["inspect", hf.to_str().unwrap()]);
    assert!(e.contains("no tokenizer.json"), "{e}");

    let e = expect_error(&[
        "score",
        "--model",
        gguf.to_str().unwrap(),
        "--file",
        "/nonexistent/text.txt",
    ]);
    assert!(e.contains("/nonexistent/text.txt"), "{e}");
    let e = expect_error(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "x",
        "--temperature=-1",
    ]);
    assert!(e.contains("--temperature"), "{e}");
    let e = expect_error(&["inspect", dir.path().to_str().unwrap()]);
    assert!(e.contains("not a model"), "{e}");
}
