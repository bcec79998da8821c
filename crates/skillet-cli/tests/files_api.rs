//! OpenAI's files endpoints of `skillet serve` through raw HTTP, on a tiny
//! model: multipart uploads checked line by line (`processed`, or `error`
//! with the line-numbered problems), listing, reading, content and
//! deletion scoped to the key's owner (another owner gets 404), the size
//! limit, and the files still there after a restart.

mod common;

use common::http::{Server, request, upload};
use common::tiny_gguf;
use skillet_gguf::GgmlType;

const CHAT: &str =
    r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;

fn args(model: &std::path::Path, keys: &std::path::Path) -> Vec<String> {
    [
        "--model",
        &model.display().to_string(),
        "--api-key-file",
        &keys.display().to_string(),
        "--admin-key",
        "sk-root",
        "--max-file-bytes",
        "4000",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn files_are_uploaded_checked_listed_read_and_deleted_per_owner() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, GgmlType::Q8_0, vec![]);
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "sk-ann ann\nsk-bob bob\n").unwrap();
    let data = dir.path().join("data");
    let args = args(&model, &keys);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_in(&args, &data);
    let addr = server.addr.clone();
    let ann = Some("sk-ann");

    let good = format!("{CHAT}\n{CHAT}\n");
    let r = upload(
        &addr,
        "/v1/files",
        ann,
        &[("purpose", "fine-tune")],
        Some(("good.jsonl", good.as_bytes())),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let f = r.json();
    assert_eq!(f["object"], "file");
    assert_eq!(f["status"], "processed");
    assert_eq!(f["bytes"], good.len());
    assert_eq!(
        (f["filename"].as_str(), f["purpose"].as_str()),
        (Some("good.jsonl"), Some("fine-tune"))
    );
    let good_id = f["id"].as_str().unwrap().to_string();
    assert!(good_id.starts_with("file-"));

    let bad = format!("{CHAT}\n{{not json\n");
    let r = upload(
        &addr,
        "/v1/files",
        ann,
        &[("purpose", "fine-tune")],
        Some(("bad.jsonl", bad.as_bytes())),
    );
    let f = r.json();
    assert_eq!(f["status"], "error", "{f}");
    let details = f["status_details"].as_str().unwrap();
    assert!(details.contains("bad.jsonl:2"), "{details}");
    let bad_id = f["id"].as_str().unwrap().to_string();

    // Listing, reading and content, for the owner only.
    let list = request(&addr, "GET", "/v1/files", ann, None).json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [bad_id.as_str(), good_id.as_str()]);
    let bob = Some("sk-bob");
    assert_eq!(
        request(&addr, "GET", "/v1/files", bob, None).json()["data"],
        serde_json::json!([])
    );
    let path = format!("/v1/files/{good_id}");
    assert_eq!(request(&addr, "GET", &path, bob, None).status, 404);
    assert_eq!(
        request(&addr, "GET", &path, ann, None).json()["id"],
        good_id.as_str()
    );
    assert_eq!(
        request(&addr, "GET", &path, Some("sk-root"), None).status,
        200
    );
    let content = request(&addr, "GET", &format!("{path}/content"), ann, None);
    assert_eq!(
        (content.status, content.body.as_str()),
        (200, good.as_str())
    );
    assert_eq!(
        request(&addr, "GET", &format!("{path}/content"), bob, None).status,
        404
    );
    assert_eq!(request(&addr, "GET", "/v1/files", None, None).status, 401);

    // Refused uploads.
    let big = vec![b'x'; 5000];
    let r = upload(
        &addr,
        "/v1/files",
        ann,
        &[("purpose", "fine-tune")],
        Some(("big.jsonl", &big)),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    let r = upload(
        &addr,
        "/v1/files",
        ann,
        &[],
        Some(("a.jsonl", good.as_bytes())),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].as_str()),
        (400, Some("purpose"))
    );
    let r = upload(&addr, "/v1/files", ann, &[("purpose", "fine-tune")], None);
    assert_eq!(r.status, 400);
    let leftovers: Vec<_> = std::fs::read_dir(data.join("files"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload"))
        .collect();
    assert!(leftovers.is_empty(), "partial uploads left behind");

    // Deleting: another owner cannot; the owner can.
    let bad_path = format!("/v1/files/{bad_id}");
    assert_eq!(request(&addr, "DELETE", &bad_path, bob, None).status, 404);
    let d = request(&addr, "DELETE", &bad_path, ann, None).json();
    assert_eq!(
        (d["id"].as_str(), d["deleted"].as_bool()),
        (Some(bad_id.as_str()), Some(true))
    );
    assert_eq!(request(&addr, "GET", &bad_path, ann, None).status, 404);

    // A restart keeps what was uploaded.
    drop(server);
    let server = Server::start_in(&args, &data);
    let list = request(&server.addr, "GET", "/v1/files", ann, None).json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], good_id.as_str());
}
