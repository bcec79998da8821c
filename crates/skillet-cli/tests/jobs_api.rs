//! OpenAI's fine-tuning jobs endpoints of `skillet serve` through raw
//! HTTP, on a tiny model:
//! - a job trains in a child process, reports its steps as events, and
//!   records a checkpoint per epoch;
//! - its fine-tuned model and checkpoints are served at once, to their
//!   owner only, and deleting the model stops serving it;
//! - a bad file, the wrong kind of file, or a bad option fails the job or
//!   the request with OpenAI's error shape;
//! - cancel stops the child;
//! - a kill -9 of the server and its child mid-job resumes on restart and
//!   ends with the adapter an uninterrupted run writes, byte for byte.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::http::{Server, request, upload};
use common::tiny_gguf;
use serde_json::{Value, json};
use skillet_gguf::GgmlType;

const ANN: Option<&str> = Some("sk-ann");
const BOB: Option<&str> = Some("sk-bob");

fn chat_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("add {i} and {}", i % 7)},
                {"role": "assistant", "content": format!("{}", i + i % 7)},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: std::path::PathBuf,
    keys: std::path::PathBuf,
    data: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, GgmlType::Q8_0, vec![]);
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "sk-ann ann\nsk-bob bob\n").unwrap();
    let data = dir.path().join("data");
    Fixture {
        model,
        keys,
        data,
        _dir: dir,
    }
}

fn start(f: &Fixture, data: &Path) -> Server {
    let model = f.model.display().to_string();
    let keys = f.keys.display().to_string();
    Server::start_in(
        &[
            "--model",
            &model,
            "--api-keys",
            &keys,
            "--train-threads",
            "1",
        ],
        data,
    )
}

fn upload_file(addr: &str, key: Option<&str>, name: &str, text: &str) -> Value {
    let r = upload(
        addr,
        "/v1/files",
        key,
        &[("purpose", "fine-tune")],
        Some((name, text.as_bytes())),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn post(addr: &str, key: Option<&str>, path: &str, body: &Value) -> common::http::Reply {
    request(addr, "POST", path, key, Some(&body.to_string()))
}

fn get(addr: &str, key: Option<&str>, path: &str) -> Value {
    let r = request(addr, "GET", path, key, None);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

/// The job once its status is one of `until` (panics after `secs`).
fn wait(addr: &str, id: &str, until: &[&str], secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let job = get(addr, ANN, &format!("/v1/fine_tuning/jobs/{id}"));
        if until.contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} still {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every event of job `id` (ann's), newest first.
fn job_events(addr: &str, id: &str) -> Vec<Value> {
    get(
        addr,
        ANN,
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"),
    )["data"]
        .as_array()
        .unwrap()
        .clone()
}

/// A supervised job on `file` (small and quick on the tiny model).
fn job_request(file: &str, epochs: u64) -> Value {
    json!({
        "model": "tiny", "training_file": file, "suffix": "sums", "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters":
            {"n_epochs": epochs, "batch_size": 4, "learning_rate_multiplier": 10}}},
        "skillet": {"data": {"max_seq_len": 48, "validation_fraction": 0.2},
                    "eval": {"generate": false}},
    })
}

fn chat(addr: &str, key: Option<&str>, model: &str) -> common::http::Reply {
    post(
        addr,
        key,
        "/v1/chat/completions",
        &json!({"model": model, "max_tokens": 4,
                "messages": [{"role": "user", "content": "add 3 and 3"}]}),
    )
}

#[test]
fn a_job_trains_reports_checkpoints_and_serves_its_model_to_its_owner() {
    let f = fixture();
    let server = start(&f, &f.data);
    let addr = server.addr.clone();
    let file = upload_file(&addr, ANN, "sums.jsonl", &chat_lines(40));
    let file_id = file["id"].as_str().unwrap();
    // A second server on the same data directory is refused.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_skillet"))
        .arg("serve")
        .arg("--model")
        .arg(&f.model)
        .args(["--port", "0", "--data-dir"])
        .arg(&f.data)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another skillet serve"), "{err}");

    let r = post(&addr, ANN, "/v1/fine_tuning/jobs", &job_request(file_id, 2));
    assert_eq!(r.status, 200, "{}", r.body);
    let job = r.json();
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "validating_files");
    assert_eq!(
        job["hyperparameters"],
        json!({"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10.0})
    );
    assert_eq!(job["method"]["type"], "supervised");
    let id = job["id"].as_str().unwrap().to_string();
    // Another owner does not see it.
    let r = request(
        &addr,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}"),
        BOB,
        None,
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        get(&addr, BOB, "/v1/fine_tuning/jobs")["data"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let job = wait(&addr, &id, &["succeeded", "failed", "cancelled"], 120);
    assert_eq!(job["status"], "succeeded", "{job}");
    let name = job["fine_tuned_model"].as_str().unwrap().to_string();
    assert_eq!(name, format!("ft:tiny:ann:sums:{id}"));
    assert!(job["trained_tokens"].as_i64().unwrap() > 0);
    assert!(job["finished_at"].as_i64().is_some());

    // Events: newest first, paged, with each step's metrics.
    let events = job_events(&addr, &id);
    let messages: Vec<&str> = events
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages[0], "The job has successfully completed");
    assert!(
        messages
            .last()
            .unwrap()
            .starts_with("Created fine-tuning job"),
        "{messages:?}"
    );
    let steps: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .collect();
    let total = steps[0]["data"]["total_steps"].as_u64().unwrap();
    assert_eq!(steps.len() as u64, total, "one event per step");
    assert!(events.iter().any(|e| e["data"]["valid_loss"].is_number()));
    let page = get(
        &addr,
        ANN,
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=2"),
    );
    assert_eq!(page["has_more"], true);
    let after = page["data"][1]["id"].as_str().unwrap();
    let next = get(
        &addr,
        ANN,
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=1&after={after}"),
    );
    assert_eq!(next["data"][0]["id"], events[2]["id"]);

    // One checkpoint per epoch, latest first, each servable.
    let ckpts = get(
        &addr,
        ANN,
        &format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
    )["data"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    assert_eq!(ckpts[0]["step_number"].as_u64(), Some(total));
    assert_eq!(ckpts[1]["step_number"].as_u64(), Some(total / 2));
    assert!(ckpts[0]["metrics"]["train_loss"].is_number());
    assert!(ckpts[0]["metrics"]["valid_loss"].is_number());
    let ckpt_model = ckpts[1]["fine_tuned_model_checkpoint"].as_str().unwrap();
    assert_eq!(ckpt_model, format!("{name}:ckpt-step-{}", total / 2));

    // Served at once, to its owner only.
    let ids = |key| -> Vec<String> {
        get(&addr, key, "/v1/models")["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(ids(ANN).contains(&name));
    assert!(ids(ANN).contains(&ckpt_model.to_string()));
    assert_eq!(ids(BOB), ["tiny"]);
    for model in [name.as_str(), ckpt_model] {
        let r = chat(&addr, ANN, model);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["model"], model);
        let r = chat(&addr, BOB, model);
        assert_eq!(r.status, 404, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "model_not_found");
    }
    // The tuned model answers differently from the base model.
    let text = |r: common::http::Reply| r.json()["choices"][0]["message"]["content"].clone();
    assert_ne!(
        text(chat(&addr, ANN, &name)),
        text(chat(&addr, ANN, "tiny"))
    );

    // The report is among the result files.
    let results = job["result_files"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let report = request(
        &addr,
        "GET",
        &format!("/v1/files/{}/content", results[0].as_str().unwrap()),
        ANN,
        None,
    );
    assert!(report.body.contains("loss"), "{}", report.body);

    // Deleting the model stops serving it; bob cannot delete it.
    let r = request(&addr, "DELETE", &format!("/v1/models/{name}"), BOB, None);
    assert_eq!(r.status, 404);
    let r = request(&addr, "DELETE", &format!("/v1/models/{name}"), ANN, None);
    assert_eq!(
        r.json(),
        json!({"id": name, "object": "model", "deleted": true})
    );
    assert_eq!(chat(&addr, ANN, &name).status, 404);
    assert_eq!(chat(&addr, ANN, ckpt_model).status, 200);

    // A model can be fine-tuned further: the job starts from its adapter.
    let r = post(
        &addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &json!({"model": ckpt_model, "training_file": file_id,
                "hyperparameters": {"n_epochs": 1}, "skillet": {"eval": {"generate": false}}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let more = r.json()["id"].as_str().unwrap().to_string();
    let done = wait(&addr, &more, &["succeeded", "failed"], 120);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        std::fs::read_to_string(f.data.join("jobs").join(&more).join("config.toml"))
            .unwrap()
            .contains("init_adapter")
    );
}

#[test]
fn bad_files_options_and_cancels_end_with_openai_errors() {
    let f = fixture();
    let server = start(&f, &f.data);
    let addr = server.addr.clone();
    let good = upload_file(&addr, ANN, "sums.jsonl", &chat_lines(40));
    let good = good["id"].as_str().unwrap();

    // Missing or another owner's file, unknown model, bad options: 400.
    let bobs = upload_file(&addr, BOB, "b.jsonl", &chat_lines(4));
    for (body, param) in [
        (
            json!({"model": "tiny", "training_file": "file-nope"}),
            "training_file",
        ),
        (
            json!({"model": "tiny", "training_file": bobs["id"]}),
            "training_file",
        ),
        (json!({"model": "gpt-4o", "training_file": good}), "model"),
        (
            json!({"model": "tiny", "training_file": good, "hyperparameters": {"n_epochs": -1}}),
            "hyperparameters.n_epochs",
        ),
        (
            json!({"model": "tiny", "training_file": good, "skillet": {"lora": {"rank": 4}}}),
            "skillet",
        ),
        (
            json!({"model": "tiny", "training_file": good, "suffix": "a:b"}),
            "suffix",
        ),
    ] {
        let r = post(&addr, ANN, "/v1/fine_tuning/jobs", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], param, "{e}");
    }

    // A file with problems: the job fails with their line numbers.
    let bad = upload_file(
        &addr,
        ANN,
        "bad.jsonl",
        &format!("{}{{oops\n", chat_lines(3)),
    );
    assert_eq!(bad["status"], "error");
    let r = post(
        &addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &json!({"model": "tiny", "training_file": bad["id"]}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let job = wait(&addr, &id, &["failed"], 30);
    assert_eq!(job["error"]["code"], "invalid_training_file");
    assert_eq!(job["error"]["param"], "training_file");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("bad.jsonl:4"), "{message}");

    // Examples for DPO: the wrong kind of file.
    let r = post(
        &addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &json!({"model": "tiny", "training_file": good, "method": {"type": "dpo"}}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let job = wait(&addr, &id, &["failed"], 30);
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("holds examples") && message.contains("pairs"),
        "{message}"
    );

    // Cancel: the child stops, the job stays cancelled.
    let r = post(&addr, ANN, "/v1/fine_tuning/jobs", &job_request(good, 50));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = f.data.join("jobs").join(&id).join("out/metrics.jsonl");
    while !metrics.exists() {
        assert!(Instant::now() < deadline, "the job never started training");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.children().len(), 1);
    let r = post(
        &addr,
        BOB,
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        &json!({}),
    );
    assert_eq!(r.status, 404);
    let r = post(
        &addr,
        ANN,
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "cancelled");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.children().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the child still runs 5 s after cancel"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let size = std::fs::metadata(&metrics).unwrap().len();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(std::fs::metadata(&metrics).unwrap().len(), size);
    let job = get(&addr, ANN, &format!("/v1/fine_tuning/jobs/{id}"));
    assert_eq!(job["status"], "cancelled");
    assert!(job["fine_tuned_model"].is_null());
    let r = post(
        &addr,
        ANN,
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        &json!({}),
    );
    assert_eq!(r.status, 400, "a job that ended cannot be cancelled again");
}

#[test]
fn the_openai_python_client_runs_the_whole_fine_tuning_flow() {
    let f = fixture();
    let server = start(&f, &f.data);
    let dir = f.data.with_file_name("py");
    std::fs::create_dir_all(&dir).unwrap();
    let train = dir.join("sums.jsonl");
    std::fs::write(&train, chat_lines(40)).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, format!("{}{{oops\n", chat_lines(3))).unwrap();
    let addr = format!("http://{}/v1", server.addr);
    run_python(
        "openai-env.sh",
        "openai_jobs.py",
        &[
            "--base-url".as_ref(),
            addr.as_ref(),
            "--key".as_ref(),
            "sk-ann".as_ref(),
            "--other-key".as_ref(),
            "sk-bob".as_ref(),
            "--owner".as_ref(),
            "ann".as_ref(),
            "--model".as_ref(),
            "tiny".as_ref(),
            "--train".as_ref(),
            train.as_os_str(),
            "--bad".as_ref(),
            bad.as_os_str(),
        ],
    );
}

/// Runs `tests/SCRIPT` with the Python that `scripts/ENV` sets up, and
/// asserts it passed every check.
fn run_python(env: &str, script: &str, args: &[&std::ffi::OsStr]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join("../../scripts").join(env))
        .output()
        .expect("run the environment script");
    assert!(
        out.status.success(),
        "scripts/{env} failed (this test needs pip and the package index):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let run = std::process::Command::new(python)
        .arg(root.join("tests").join(script))
        .args(args)
        .output()
        .expect("run the script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{text}");
    assert!(text.contains("all checks passed"), "{text}");
}

#[test]
fn the_web_page_uploads_starts_watches_and_asks_the_tuned_model() {
    let f = fixture();
    let server = start(&f, &f.data);
    let train = f.data.with_file_name("sums.jsonl");
    std::fs::write(&train, chat_lines(40)).unwrap();
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    let url = format!("http://{}/", server.addr);
    // Screenshots land in target/tmp/web-screenshots.
    run_python(
        "browser-env.sh",
        "web_page.py",
        &[
            "--url".as_ref(),
            url.as_ref(),
            "--key".as_ref(),
            "sk-ann".as_ref(),
            "--train".as_ref(),
            train.as_os_str(),
            "--shots".as_ref(),
            shots.as_os_str(),
        ],
    );
    for shot in ["job-finished.png", "playground.png", "files.png"] {
        assert!(shots.join(shot).is_file(), "{shot}");
    }
}

#[test]
fn dpo_and_reinforcement_jobs_train_on_pairs_and_prompts() {
    let f = fixture();
    let server = start(&f, &f.data);
    let addr = server.addr.clone();
    let pairs: String = (0..12)
        .map(|i| {
            json!({"prompt": [{"role": "user", "content": format!("add {i} and 1")}],
                   "chosen": [{"role": "assistant", "content": format!("{}", i + 1)}],
                   "rejected": [{"role": "assistant", "content": "no idea"}]})
            .to_string()
                + "\n"
        })
        .collect();
    let prompts: String = (0..8)
        .map(|i| {
            json!({"messages": [{"role": "user", "content": format!("add {i} and 2")}],
                   "answer": format!("{}", i + 2)})
            .to_string()
                + "\n"
        })
        .collect();
    let pairs = upload_file(&addr, ANN, "pairs.jsonl", &pairs);
    let prompts = upload_file(&addr, ANN, "prompts.jsonl", &prompts);
    let quick = json!({"data": {"max_seq_len": 48}, "eval": {"generate": false}});
    let dpo = post(
        &addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &json!({"model": "tiny", "training_file": pairs["id"], "skillet": quick,
                "method": {"type": "dpo", "dpo": {"hyperparameters":
                    {"n_epochs": 1, "batch_size": 2, "beta": 0.2}}}}),
    );
    assert_eq!(dpo.status, 200, "{}", dpo.body);
    let mut rl_options = quick.clone();
    rl_options["method"] = json!({"num_generations": 2, "max_completion_length": 4});
    let rl = post(
        &addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &json!({"model": "tiny", "training_file": prompts["id"], "skillet": rl_options,
                "method": {"type": "reinforcement", "reinforcement": {
                    "grader": {"type": "string_check", "name": "sum", "operation": "eq",
                               "input": "{{sample.output_text}}", "reference": "{{item.answer}}"},
                    "hyperparameters": {"n_epochs": 1, "batch_size": 2}}}}),
    );
    assert_eq!(rl.status, 200, "{}", rl.body);
    for (job, method) in [(dpo.json(), "dpo"), (rl.json(), "reinforcement")] {
        let id = job["id"].as_str().unwrap();
        let done = wait(&addr, id, &["succeeded", "failed"], 120);
        assert_eq!(done["status"], "succeeded", "{method}: {done}");
        assert_eq!(done["method"]["type"], method);
        let config =
            std::fs::read_to_string(f.data.join("jobs").join(id).join("config.toml")).unwrap();
        let steps = job_events(&addr, id)
            .iter()
            .filter(|e| e["data"]["train_loss"].is_number())
            .count();
        assert!(steps > 0, "{method}: no steps");
        if method == "dpo" {
            assert!(
                config.contains("type = \"dpo\"") && config.contains("beta = 0.2"),
                "{config}"
            );
        } else {
            assert!(
                config.contains("type = \"grpo\"") && config.contains("exact_match"),
                "{config}"
            );
            assert!(
                config.contains("batch_size = 4"),
                "2 prompts x 2 completions: {config}"
            );
        }
        let model = done["fine_tuned_model"].as_str().unwrap();
        assert_eq!(chat(&addr, ANN, model).status, 200);
    }
}

fn adapter_bytes(data: &Path, job: &str) -> Vec<u8> {
    std::fs::read(
        data.join("jobs")
            .join(job)
            .join("out/adapter/adapter_model.safetensors"),
    )
    .unwrap()
}

#[test]
fn a_job_killed_with_its_server_resumes_and_ends_byte_identical() {
    let f = fixture();
    let file_text = chat_lines(40);
    let request_for = |file: &str| {
        let mut r = job_request(file, 6);
        r["skillet"]["eval"]["save_every"] = json!(3);
        r
    };

    // Uninterrupted.
    let quiet = f.data.with_file_name("quiet");
    let server = start(&f, &quiet);
    let file = upload_file(&server.addr, ANN, "sums.jsonl", &file_text);
    let r = post(
        &server.addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &request_for(file["id"].as_str().unwrap()),
    );
    let quiet_id = r.json()["id"].as_str().unwrap().to_string();
    let done = wait(&server.addr, &quiet_id, &["succeeded", "failed"], 120);
    assert_eq!(done["status"], "succeeded", "{done}");
    drop(server);

    // Killed (server and child, kill -9) once a checkpoint is written.
    let server = start(&f, &f.data);
    let file = upload_file(&server.addr, ANN, "sums.jsonl", &file_text);
    let r = post(
        &server.addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &request_for(file["id"].as_str().unwrap()),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let queued = post(
        &server.addr,
        ANN,
        "/v1/fine_tuning/jobs",
        &request_for(file["id"].as_str().unwrap()),
    );
    let queued_id = queued.json()["id"].as_str().unwrap().to_string();
    // Its files are validated by the worker's next look at the store, which
    // a busy machine can delay past the first checkpoint: wait for it, so
    // that the kill finds it queued.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(
        &server.addr,
        ANN,
        &format!("/v1/fine_tuning/jobs/{queued_id}"),
    )["status"]
        != "queued"
    {
        assert!(Instant::now() < deadline, "the second job was not queued");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ckpts = f.data.join("jobs").join(&id).join("out/checkpoints");
    let deadline = Instant::now() + Duration::from_secs(120);
    let complete = || {
        std::fs::read_dir(&ckpts).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-"))
            })
            .count()
        })
    };
    while complete() == 0 {
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let job = get(&server.addr, ANN, &format!("/v1/fine_tuning/jobs/{id}"));
    assert_eq!(job["status"], "running", "killed before the end: {job}");
    let children = server.kill_hard();
    assert_eq!(children.len(), 1);
    // The child dies with its server (it is gone, or a zombie no one has
    // reaped yet); a survivor is killed here too, as the test's kill -9.
    let alive = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        !matches!(state, None | Some("Z") | Some("X"))
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(children[0]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let survived = alive(children[0]);
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &children[0].to_string()])
        .status();
    assert!(!survived, "the training child outlived its server");

    // Restarted: the running job resumes and finishes; the queued one
    // stays queued behind it, then runs; files and models are all there.
    let server = start(&f, &f.data);
    let addr = server.addr.clone();
    assert_eq!(
        get(&addr, ANN, &format!("/v1/fine_tuning/jobs/{queued_id}"))["status"],
        "queued"
    );
    let job = wait(&addr, &id, &["succeeded", "failed"], 120);
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = job_events(&addr, &id);
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .unwrap()
            .contains("resumed from the checkpoint")),
        "{events:?}"
    );
    let mut steps: Vec<u64> = events
        .iter()
        .filter(|e| e["data"]["train_loss"].is_number())
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect();
    steps.sort();
    let total = steps.len() as u64;
    assert_eq!(steps, (1..=total).collect::<Vec<_>>(), "each step once");
    assert_eq!(
        adapter_bytes(&f.data, &id),
        adapter_bytes(&quiet, &quiet_id)
    );
    assert_eq!(
        get(&addr, ANN, &format!("/v1/fine_tuning/jobs/{id}"))["trained_tokens"],
        done["trained_tokens"]
    );
    assert_eq!(
        get(
            &addr,
            ANN,
            &format!("/v1/files/{}", file["id"].as_str().unwrap())
        )["status"],
        "processed"
    );
    let model = job["fine_tuned_model"].as_str().unwrap();
    assert_eq!(chat(&addr, ANN, model).status, 200);
    let queued = wait(&addr, &queued_id, &["succeeded", "failed"], 120);
    assert_eq!(queued["status"], "succeeded");
    assert_eq!(
        adapter_bytes(&f.data, &queued_id),
        adapter_bytes(&quiet, &quiet_id)
    );
}
