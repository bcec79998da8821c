//! `skillet serve` on the real default model with two LoRA adapters,
//! driven through the official `openai` Python client (installed by
//! scripts/openai-env.sh) and through raw HTTP: answers, streaming,
//! adapters per request, run-time loading, every error class, 64
//! concurrent streams mixing adapters, disconnects, the queue limit and
//! shutdown.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::http::{
    ADMIN, KEY, Server, events, make_adapters, open_stream, request, streamed_text,
};
use common::real_model;
use serde_json::json;

/// Adapters for the real model, made once per test binary:
/// `adapters/a1`, `adapters/a2`, plus broken ones.
fn adapters_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        make_adapters(&real_model(), dir.path());
        // A corrupted weights file, and an adapter for other module names.
        let broken = dir.path().join("broken");
        copy_dir(&dir.path().join("a1"), &broken);
        std::fs::write(
            broken.join("adapter_model.safetensors"),
            b"\x08\0\0\0\0\0\0\0{garbage",
        )
        .unwrap();
        let other = dir.path().join("other-model");
        copy_dir(&dir.path().join("a1"), &other);
        let cfg = other.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            text.replace("\"q_proj\"", "\"query_key_value\"")
                .replace("\"v_proj\"", "\"dense\""),
        )
        .unwrap();
        dir
    })
    .path()
    .to_path_buf()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn model_id() -> String {
    real_model()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn start(extra: &[&str]) -> Server {
    let model = real_model();
    let dir = adapters_dir();
    let a1 = format!("a1={}", dir.join("a1").display());
    let mut args = vec![
        "--model".to_string(),
        model.display().to_string(),
        "--adapter".into(),
        a1,
        "--adapters-dir".into(),
        dir.display().to_string(),
        "--api-key".into(),
        KEY.into(),
        "--admin-key".into(),
        ADMIN.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn chat(model: &str, content: &str, max_tokens: u32, stream: bool) -> String {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

#[test]
fn the_openai_python_client_works_unchanged() {
    // f32 inputs: transformers' greedy answers on every CPU (int8, the
    // default where AMX is, gives llama.cpp's, which differ on some).
    let server = start(&["--activations", "f32"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai-env.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run scripts/openai-env.sh");
    assert!(
        out.status.success(),
        "scripts/openai-env.sh failed (the server tests need pip and the package index):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let run = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
        .args(["--base-url", &format!("http://{}/v1", server.addr)])
        .args([
            "--api-key",
            KEY,
            "--admin-key",
            ADMIN,
            "--model",
            &model_id(),
        ])
        .args([
            "--adapter",
            "a1",
            "--lazy-adapter",
            "a2",
            "--load-path",
            "a1",
        ])
        .output()
        .expect("run the openai client script");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "openai client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("all openai client checks passed"),
        "{stdout}"
    );
    // SIGTERM: stop accepting, finish, exit 0.
    assert!(server.stop(30).success());
}

#[test]
fn answers_equal_skillet_generate_and_errors_have_openai_shapes() {
    let server = start(&[]);
    let id = model_id();
    let dir = adapters_dir();
    // The server's greedy answer is the CLI's, for the base and an adapter.
    for (model, adapter) in [(id.as_str(), None), ("a1", Some(dir.join("a1")))] {
        let r = server.call(
            "POST",
            "/v1/chat/completions",
            Some(KEY),
            Some(&chat(model, "Name three colors.", 20, false)),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let served = r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let m = real_model();
        let mut args = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--chat",
            "--prompt",
            "Name three colors.",
            "--max-tokens",
            "20",
            "--json",
            // The server's default arithmetic.
            "--activations",
            "auto",
        ];
        let a = adapter.map(|p| p.display().to_string());
        if let Some(a) = &a {
            args.extend(["--adapter", a.as_str()]);
        }
        let cli = common::skillet_json(&args);
        assert_eq!(served, cli["text"].as_str().unwrap(), "{model}");
    }

    let call =
        |key: Option<&str>, path: &str, body: &str| server.call("POST", path, key, Some(body));
    let error = |r: &common::http::Reply, status: u16, param: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.body);
        let e = &r.json()["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            r.body
        );
        assert!(e["type"].is_string(), "{}", r.body);
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{}", r.body);
        }
    };
    let ok = chat(&id, "Hi", 4, false);
    // 401: no key, a wrong key; /health needs none.
    error(&call(None, "/v1/chat/completions", &ok), 401, None);
    error(&call(Some("nope"), "/v1/chat/completions", &ok), 401, None);
    assert_eq!(server.call("GET", "/v1/models", None, None).status, 401);
    assert_eq!(server.call("GET", "/health", None, None).status, 200);
    // 404: unknown model or adapter, unknown route.
    error(
        &call(
            Some(KEY),
            "/v1/chat/completions",
            &chat("nobody", "Hi", 4, false),
        ),
        404,
        Some("model"),
    );
    error(
        &server.call("GET", "/v1/nothing", Some(KEY), None),
        404,
        None,
    );
    // 400: bad JSON, wrong types, bad values, each naming the field.
    let path = "/v1/chat/completions";
    error(
        &call(Some(KEY), path, "{\"model\": \"x\", \"messages\": ["),
        400,
        None,
    );
    error(&call(Some(KEY), path, "[]"), 400, None);
    error(
        &call(Some(KEY), path, &json!({"messages": []}).to_string()),
        400,
        Some("model"),
    );
    error(
        &call(
            Some(KEY),
            path,
            &json!({"model": id, "messages": "hi"}).to_string(),
        ),
        400,
        Some("messages"),
    );
    error(
        &call(
            Some(KEY),
            path,
            &json!({"model": id, "messages": []}).to_string(),
        ),
        400,
        Some("messages"),
    );
    error(&call(Some(KEY), path, &json!({"model": id, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string()), 400, Some("temperature"));
    error(
        &call(
            Some(KEY),
            path,
            &json!({"model": id, "messages": [{"role": "user", "content": "x"}], "top_p": 0})
                .to_string(),
        ),
        400,
        Some("top_p"),
    );
    error(
        &call(
            Some(KEY),
            path,
            &json!({"model": id, "messages": [{"role": "user", "content": "x"}], "n": 0})
                .to_string(),
        ),
        400,
        Some("n"),
    );
    error(&call(Some(KEY), path, &json!({"model": id, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}).to_string()), 400, Some("stop"));
    error(
        &call(
            Some(KEY),
            path,
            &json!({"model": id, "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
        ),
        400,
        Some("messages[0].role"),
    );
    error(&call(Some(KEY), path, &json!({"model": id, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string()), 400, Some("messages[0].content[0]"));
    error(&call(Some(KEY), path, &json!({"model": id, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1_000_000_000u64}).to_string()), 400, Some("max_tokens"));
    error(
        &call(
            Some(KEY),
            "/v1/completions",
            &json!({"model": id, "prompt": 5}).to_string(),
        ),
        400,
        Some("prompt"),
    );
    // 413: a body over the limit.
    let huge = format!(
        "{{\"model\": \"{id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(2 << 20)
    );
    error(&call(Some(KEY), path, &huge), 413, None);
    // Adapter loading: admin only; confined to the adapters folder; files
    // that are missing, corrupted or for another model are refused.
    let load = |name: &str, p: &str| json!({"lora_name": name, "lora_path": p}).to_string();
    error(
        &call(Some(KEY), "/v1/load_lora_adapter", &load("x", "a2")),
        403,
        None,
    );
    error(
        &call(
            Some(ADMIN),
            "/v1/load_lora_adapter",
            &load("x", "../../etc"),
        ),
        403,
        None,
    );
    error(
        &call(Some(ADMIN), "/v1/load_lora_adapter", &load("x", "/etc")),
        403,
        None,
    );
    error(
        &call(Some(ADMIN), "/v1/load_lora_adapter", &load("x", "missing")),
        400,
        Some("lora_path"),
    );
    error(
        &call(Some(ADMIN), "/v1/load_lora_adapter", &load("x", "broken")),
        400,
        Some("lora_path"),
    );
    let r = call(
        Some(ADMIN),
        "/v1/load_lora_adapter",
        &load("x", "other-model"),
    );
    error(&r, 400, Some("lora_path"));
    assert!(r.body.contains("matched no linear layer"), "{}", r.body);
    error(
        &call(Some(ADMIN), "/v1/load_lora_adapter", &load("a1", "a2")),
        400,
        Some("lora_name"),
    );
    error(
        &call(
            Some(ADMIN),
            "/v1/unload_lora_adapter",
            &json!({"lora_name": "nobody"}).to_string(),
        ),
        404,
        None,
    );
    // A folder name with a path in it is never looked up on disk.
    error(
        &call(Some(KEY), path, &chat("../a1", "Hi", 4, false)),
        404,
        Some("model"),
    );
    // Nothing above was a 500, and the server still answers.
    assert_eq!(call(Some(KEY), path, &ok).status, 200);
    let metrics = server.call("GET", "/metrics", Some(KEY), None).body;
    assert!(!metrics.contains("status=\"500\""), "{metrics}");
}

#[test]
fn concurrent_streams_mixing_adapters_equal_sequential_answers() {
    // The default inputs of quantized products (int8 where the CPU has AMX
    // tiles, AVX512-VNNI or AVX2), and exact f32 inputs where that is not already
    // the default.
    if skillet_models::Activations::for_batches() != skillet_models::Activations::F32 {
        let f32_server = start(&["--max-batch", "8", "--activations", "f32"]);
        batched_answers_equal_alone(&f32_server);
        assert!(f32_server.stop(30).success());
    }
    let server = start(&["--max-batch", "8"]);
    batched_answers_equal_alone(&server);
    let id = model_id();
    // A client that disconnects mid-stream frees its slot.
    let before = server.metric("skillet_cancelled_sequences_total");
    let long =
        json!({"model": id, "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1000, "ignore_eos": true, "stream": true})
        .to_string();
    // Wait for a few tokens: the gauges are updated after each step.
    let s = open_stream(&server.addr, "/v1/chat/completions", Some(KEY), &long, 1500);
    assert_eq!(server.metric("skillet_running_sequences"), 1.0);
    drop(s);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.metric("skillet_running_sequences") > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was not freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        server.metric("skillet_cancelled_sequences_total"),
        before + 1.0
    );
    assert!(server.stop(30).success());
}

/// Each (model, prompt) pair asked alone, then 64 streams of them at once
/// mixing the base and two adapters: every streamed answer equals its
/// answer alone.
fn batched_answers_equal_alone(server: &Server) {
    let id = model_id();
    let models = [id.as_str(), "a1", "a2"];
    let prompts = [
        "Tell me about the sea.",
        "What is 2 + 2?",
        "Write a haiku about rain.",
        "List some fruits.",
    ];
    // Each (model, prompt) alone first.
    let mut alone = std::collections::HashMap::new();
    for m in models {
        for p in prompts {
            let r = server.call(
                "POST",
                "/v1/chat/completions",
                Some(KEY),
                Some(&chat(m, p, 24, false)),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            alone.insert(
                (m.to_string(), p),
                r.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    // 64 streams at once.
    let addr = server.addr.clone();
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let (m, p) = (models[i % 3].to_string(), prompts[(i / 3) % 4]);
            let addr = addr.clone();
            std::thread::spawn(move || {
                let r = request(
                    &addr,
                    "POST",
                    "/v1/chat/completions",
                    Some(KEY),
                    Some(&chat(&m, p, 24, true)),
                );
                assert_eq!(r.status, 200, "{}", r.body);
                (m, p, streamed_text(&events(&r.body)))
            })
        })
        .collect();
    for h in handles {
        let (m, p, text) = h.join().unwrap();
        assert_eq!(
            &text,
            &alone[&(m.clone(), p)],
            "{m} / {p}: batched differs from alone"
        );
    }
}

#[test]
fn idle_clients_are_cut_off_a_full_queue_answers_429_and_shutdown_cancels_running_streams() {
    let server = start(&[
        "--max-batch",
        "1",
        "--max-queue",
        "0",
        "--shutdown-grace",
        "2",
    ]);
    let id = model_id();
    let long =
        json!({"model": id, "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1500, "ignore_eos": true, "stream": true})
        .to_string();
    let _running = open_stream(&server.addr, "/v1/chat/completions", Some(KEY), &long, 400);
    let r = server.call(
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some(&chat(&id, "Hi", 4, false)),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "queue_full");
    // SIGTERM with a stream still running (its client reads nothing): after
    // the grace period it is cancelled and the server exits 0.
    let t = std::time::Instant::now();
    assert!(server.stop(30).success());
    assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());
}
