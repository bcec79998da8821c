"""The fine-tuning service's overhead, measured on the bundled example.

    python3 bench/service.py [--rounds 4] [--chats 12]

Builds nothing: run `cargo build --release` first; the default model is
fetched by scripts/fetch-model.sh. Each round:

1. `skillet train` on examples/contacts/config.toml directly (its
   forgetting check left out, as the API does not take server paths): wall
   time from start to exit.
2. The same run as a job of `skillet serve`: upload train.jsonl and
   valid.jsonl, then `POST /v1/fine_tuning/jobs` with the same settings.
   Time from the create request until the fine-tuned model answers a chat.
3. Chat latency of the base model (`max_tokens` 32, one request at a time)
   with the server idle, and while a job trains.

Rounds alternate which of 1 and 2 goes first. Prints a table of medians
over rounds and the ratios.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKILLET = os.path.join(ROOT, "target", "release", "skillet")
KEY = "sk-bench"


def call(base, method, path, body=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Authorization": f"Bearer {KEY}"}
    if body is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def upload(base, path):
    boundary = "skillet-bench-boundary"
    with open(path, "rb") as f:
        content = f.read()
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{os.path.basename(path)}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return call(base, "POST", "/v1/files", raw=body,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def chat_latency(base, model, n):
    times = []
    for i in range(n):
        t = time.perf_counter()
        call(base, "POST", "/v1/chat/completions", {
            "model": model, "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}],
        })
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def start_server(model, data, keys):
    p = subprocess.Popen(
        [SKILLET, "serve", "--model", model, "--port", "0", "--data-dir", data, "--api-keys", keys],
        stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return p, m.group(1)
    sys.exit("the server did not start")


def job_request(model, train_id, valid_id):
    # examples/contacts/config.toml's settings, through the API.
    return {
        "model": model, "training_file": train_id, "validation_file": valid_id, "seed": 42,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1}}},
        "skillet": {
            "data": {"max_seq_len": 128},
            "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 4, "max_grad_norm": 1.0},
            "eval": {"every": 20, "save_every": 20, "generate": True, "max_new_tokens": 48},
        },
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--chats", type=int, default=12)
    a = ap.parse_args()
    model = subprocess.run(["bash", os.path.join(ROOT, "scripts/fetch-model.sh")],
                           capture_output=True, text=True, check=True).stdout.strip()
    model_id = os.path.splitext(os.path.basename(model))[0]
    example = os.path.join(ROOT, "examples/contacts")
    rows = {"direct": [], "job": [], "idle": [], "busy": []}
    with tempfile.TemporaryDirectory() as tmp:
        keys = os.path.join(tmp, "keys.txt")
        with open(keys, "w") as f:
            f.write(f"{KEY} bench\n")
        cfg = open(os.path.join(example, "config.toml")).read()
        cfg = re.sub(r'(?m)^general = .*$', "", cfg)
        cfg_path = os.path.join(tmp, "config.toml")
        with open(cfg_path, "w") as f:
            f.write(cfg)
        def direct(r):
            out = os.path.join(tmp, f"direct-{r}")
            t = time.perf_counter()
            subprocess.run([SKILLET, "train", cfg_path, "--set", f'model="{model}"',
                            "--set", f'output_dir="{out}"'], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows["direct"].append(time.perf_counter() - t)

        for r in range(a.rounds):
            # Alternate which side goes first, so drift hits both.
            if r % 2 == 0:
                direct(r)
            server, base = start_server(model, os.path.join(tmp, f"data-{r}"), keys)
            try:
                train = upload(base, os.path.join(example, "train.jsonl"))
                valid = upload(base, os.path.join(example, "valid.jsonl"))
                rows["idle"].append(chat_latency(base, model_id, a.chats))
                t = time.perf_counter()
                job = call(base, "POST", "/v1/fine_tuning/jobs", job_request(model_id, train["id"], valid["id"]))
                while True:
                    j = call(base, "GET", f"/v1/fine_tuning/jobs/{job['id']}")
                    if j["status"] in ("succeeded", "failed", "cancelled"):
                        break
                    time.sleep(0.25)
                if j["status"] != "succeeded":
                    sys.exit(f"job {j['id']} {j['status']}: {j['error']}")
                call(base, "POST", "/v1/chat/completions", {
                    "model": j["fine_tuned_model"], "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hi"}]})
                rows["job"].append(time.perf_counter() - t)
                # A second job, to measure chat while it trains.
                busy = call(base, "POST", "/v1/fine_tuning/jobs", job_request(model_id, train["id"], valid["id"]))
                while call(base, "GET", f"/v1/fine_tuning/jobs/{busy['id']}")["status"] != "running":
                    time.sleep(0.25)
                time.sleep(20)  # past loading, into the steps
                rows["busy"].append(chat_latency(base, model_id, a.chats))
                call(base, "POST", f"/v1/fine_tuning/jobs/{busy['id']}/cancel", {})
            finally:
                server.terminate()
                server.wait()
            if r % 2 == 1:
                direct(r)
            print(f"round {r + 1}: direct {rows['direct'][-1]:.1f} s, job {rows['job'][-1]:.1f} s, "
                  f"chat idle {rows['idle'][-1] * 1000:.0f} ms, while training {rows['busy'][-1] * 1000:.0f} ms",
                  flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print()
    print("| measure | median |")
    print("|---|---|")
    print(f"| `skillet train` directly, start to exit | {med['direct']:.1f} s |")
    print(f"| job: `jobs.create` to the tuned model answering | {med['job']:.1f} s |")
    print(f"| job overhead | {100 * (med['job'] / med['direct'] - 1):+.1f}% |")
    print(f"| chat latency, 32 tokens, idle | {med['idle'] * 1000:.0f} ms |")
    print(f"| chat latency, 32 tokens, while a job trains | {med['busy'] * 1000:.0f} ms ({med['busy'] / med['idle']:.2f}x) |")


if __name__ == "__main__":
    main()
