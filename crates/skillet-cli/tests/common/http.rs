//! A `skillet serve` process for tests and a small HTTP/1.1 client that
//! reads plain, chunked and server-sent-event answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use skillet_adapters::{LoraAdapter, LoraSettings, Targets, save_peft};
use skillet_models::LoadOptions;
use skillet_runtime::Bundle;

/// A running server, stopped with SIGTERM (or killed) when dropped.
pub struct Server {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The service's data directory (a fresh one unless given).
    pub data: std::path::PathBuf,
    _owned: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `skillet serve ARGS --port 0` and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let owned = tempfile::tempdir().expect("a data directory");
        let data = owned.path().to_path_buf();
        let mut server = Self::start_in(args, &data);
        server._owned = Some(owned);
        server
    }

    /// Starts `skillet serve ARGS --port 0` with the data directory
    /// `data` (kept by the caller, e.g. across a restart).
    pub fn start_in(args: &[&str], data: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skillet"))
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .arg("--data-dir")
            .arg(data)
            .env_remove("SKILLET_API_KEY")
            .env_remove("SKILLET_ADMIN_KEY")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start skillet serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                if let Some(rest) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start listening within 60 s");
        Server {
            child: Some(child),
            addr,
            data: data.to_path_buf(),
            _owned: None,
        }
    }

    /// SIGTERM, then waits (at most `secs`) for the exit.
    pub fn stop(mut self, secs: u64) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server did not exit within {secs} s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's child processes (training jobs).
    pub fn children(&self) -> Vec<u32> {
        let pid = self.child.as_ref().expect("running").id();
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
        {
            let Ok(task) = task else { continue };
            let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        out
    }

    /// kill -9 of the server alone, as a crash would; its children's
    /// process ids (they are the caller's to check and clean up).
    pub fn kill_hard(mut self) -> Vec<u32> {
        let children = self.children();
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
        children
    }

    /// A request; see [`request`].
    pub fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Reply {
        request(&self.addr, method, path, key, body)
    }

    /// The `/metrics` value of a sample without labels.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.call("GET", "/metrics", Some(KEY), None).body;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The API key the server tests use.
pub const KEY: &str = "sk-test-key";
/// The admin key the server tests use.
pub const ADMIN: &str = "sk-test-admin";

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn send(addr: &str, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> TcpStream {
    send_bytes(
        addr,
        method,
        path,
        key,
        "application/json",
        body.unwrap_or("").as_bytes(),
    )
}

fn send_bytes(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (e.g. 413) before reading the whole body.
    let _ = s.write_all(body);
    s
}

/// Sends one request (`Connection: close`) and reads the whole answer.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Reply {
    read_reply(send(addr, method, path, key, body))
}

/// Sends a multipart form (`fields` as text parts, then `file` as the
/// file part named `filename`) and reads the answer.
pub fn upload(
    addr: &str,
    path: &str,
    key: Option<&str>,
    fields: &[(&str, &str)],
    file: Option<(&str, &[u8])>,
) -> Reply {
    let boundary = "skillet-test-boundary-7MA4YWxk";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    if let Some((filename, bytes)) = file {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    read_reply(send_bytes(addr, "POST", path, key, &content_type, &body))
}

fn read_reply(mut stream: TcpStream) -> Reply {
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Reply { status, body }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

/// The `data:` events of a streamed answer, `[DONE]` excluded (asserted last).
pub fn events(body: &str) -> Vec<serde_json::Value> {
    let data: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert_eq!(
        data.last(),
        Some(&"[DONE]"),
        "stream must end with [DONE]: {body}"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("event JSON"))
        .collect()
}

/// The text of a streamed chat answer (choice 0).
pub fn streamed_text(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str().or(c["text"].as_str()))
        .collect()
}

/// Opens a streamed request and returns the socket after the first `n`
/// bytes of the body have arrived (to drop it mid-stream).
pub fn open_stream(addr: &str, path: &str, key: Option<&str>, body: &str, n: usize) -> TcpStream {
    let mut s = send(addr, "POST", path, key, Some(body));
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < n {
        let k = s.read(&mut buf).expect("read");
        assert!(
            k > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..k]);
    }
    s
}

/// Writes two PEFT adapters for the real model into `dir` (`a1`: q/v, rank
/// 8; `a2`: o/up/down, rank 4), with non-zero B so each changes the output.
pub fn make_adapters(model: &Path, dir: &Path) {
    let bundle = Bundle::open(model).unwrap();
    let m = bundle.load_model(LoadOptions::default()).unwrap();
    for (name, targets, r, seed) in [
        ("a1", vec!["q_proj", "v_proj"], 8, 1u64),
        ("a2", vec!["o_proj", "up_proj", "down_proj"], 4, 2),
    ] {
        let settings = LoraSettings::new(
            r,
            2.0 * r as f64,
            0.0,
            false,
            Targets::Names(targets.iter().map(|s| s.to_string()).collect()),
        )
        .unwrap();
        let a = LoraAdapter::new(&m, &settings, seed, None).unwrap();
        for v in a.vars().iter().skip(1).step_by(2) {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|k| (((k * 37 + seed as usize * 11) % 17) as f32 - 8.0) * 0.02)
                .collect();
            v.set(
                &candle_core::Tensor::from_vec(vals, v.shape(), &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap();
        }
        save_peft(&a, &dir.join(name), None).unwrap();
    }
}
