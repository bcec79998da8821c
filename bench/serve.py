"""Serving benchmark driver: starts a server, waits until GET /health answers
200, runs bench/serve_load.py against it, stops the server (SIGTERM, then
SIGKILL after --stop-timeout seconds) and prints the results. Standard
library only.

Sides:

  llama-server  llama.cpp's server (built by bench/reference/setup-llama-server.sh):
                BINARY -m GGUF -np PARALLEL -c CTX_PER_SLOT*PARALLEL -t THREADS
                       --host 127.0.0.1 --port PORT
  skillet       BINARY serve --model GGUF [--adapter NAME=DIR ...]
                       --host 127.0.0.1 --port PORT --max-batch N
  generate      batch-1 baseline without a server: BINARY generate --model GGUF
                --chat --prompt P --max-tokens M, --runs times; the decode
                tok/s is parsed from the "[... R tok/s decode ...]" line that
                skillet generate prints on stderr.

--requests, --concurrency, --max-tokens, --models, --rss-after, --warmup,
--prompts, --extra-body, --api-key and --no-stream go through to serve_load.py; the
server's pid is passed as --pid, so the server's RSS is reported.

The measurements (2 threads, SmolLM2-135M-Instruct Q4_1):

    LLAMA_SERVER=$(bash bench/reference/setup-llama-server.sh)
    MODEL=$(scripts/fetch-model.sh)   # ~/.cache/skillet/models/SmolLM2-135M-Instruct.Q4_1.gguf

    python3 bench/serve.py --side llama-server --binary "$LLAMA_SERVER" \
        --model "$MODEL" --parallel 8 --requests 32 --concurrency 8 --max-tokens 64

    python3 bench/serve.py --side skillet --binary target/release/skillet \
        --model "$MODEL" --max-batch 8 --requests 32 --concurrency 8 --max-tokens 64

    python3 bench/serve.py --side skillet --binary target/release/skillet \
        --model "$MODEL" --adapter a=ADAPTER_DIR_A --adapter b=ADAPTER_DIR_B \
        --max-batch 8 --requests 32 --concurrency 8 --max-tokens 64

    python3 bench/serve.py --side generate --binary target/release/skillet \
        --model "$MODEL" --max-tokens 64 --runs 3

llama-server keeps each slot's KV cache and reuses the longest common
prefix for the next request in that slot; the eight built-in prompts cycled
over eight slots then cost one token of prefill each. To measure full
prefills instead (no prefix cache on either side), add

    --extra-body '{"cache_prompt": false}'

Add --json for one JSON object (the serve_load.py summary plus the side,
the server command line, its version, the CPU and the start-up time).
"""

import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import serve_load  # noqa: E402

DECODE_RE = re.compile(
    r"\[(\d+) prompt tokens in ([0-9.]+)s; (\d+) new tokens, ([0-9.]+|inf|NaN) tok/s decode; finish: (\w+)\]")


def log(msg):
    print(f"serve: {msg}", file=sys.stderr, flush=True)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_busy(seconds=1.0):
    """Fraction of all CPU time that was not idle over the next `seconds`."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return None if t1 == t0 else round(1.0 - (i1 - i0) / (t1 - t0), 3)


def free_port(host):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def binary_version(binary, side):
    cmd = [binary, "--version"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout + "\n" + p.stderr).strip()
    if side == "llama-server":
        m = re.search(r"version: .*", text)
        return m.group(0) if m else None
    return text.splitlines()[0] if text else None


def server_command(args, port):
    if args.side == "llama-server":
        cmd = [args.binary, "-m", args.model, "-np", str(args.parallel),
               "-c", str(args.ctx_per_slot * args.parallel), "-t", str(args.threads),
               "--host", args.host, "--port", str(port)]
        if args.adapter:
            raise SystemExit("--adapter is for --side skillet (llama-server takes --lora FILE.gguf; "
                             "use --server-arg)")
    else:
        cmd = [args.binary, "serve", "--model", args.model]
        for a in args.adapter:
            cmd += ["--adapter", a]
        cmd += ["--host", args.host, "--port", str(port), "--max-batch", str(args.max_batch)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd + args.server_arg


def wait_healthy(proc, url, timeout, logfile, api_key=None):
    deadline = time.monotonic() + timeout
    last = None
    req = urllib.request.Request(url + "/health")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was healthy"
                               f"\n{tail(logfile)}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"  # llama-server answers 503 while loading
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout}s (last: {last})\n{tail(logfile)}")


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return ""
    return "".join(lines[-n:])


def stop(proc, timeout):
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"server did not exit {timeout}s after SIGTERM; killing it")
        proc.kill()
        return proc.wait()


def load_args(args, url, pid):
    out = ["--url", url, "--requests", str(args.requests), "--concurrency", str(args.concurrency),
           "--max-tokens", str(args.max_tokens), "--rss-after", str(args.rss_after),
           "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--pid", str(pid),
           "--timeout", str(args.timeout), "--json"]
    if args.models:
        out += ["--models", args.models]
    if args.extra_body:
        out += ["--extra-body", args.extra_body]
    if args.api_key:
        out += ["--api-key", args.api_key]
    if not args.stream:
        out.append("--no-stream")
    if args.verbose:
        out.append("--verbose")
    return out


def run_server_side(args):
    port = args.port or free_port(args.host)
    url = f"http://{args.host}:{port}"
    cmd = server_command(args, port)
    if args.log:
        logpath = args.log
    else:
        fd, logpath = tempfile.mkstemp(prefix=f"serve-{args.side}-", suffix=".log")
        os.close(fd)
    version = binary_version(args.binary, args.side)
    busy = cpu_busy()
    if busy is not None and busy > 0.1:
        log(f"warning: the CPUs were {busy:.0%} busy before the start; other work skews the numbers")
    log(f"starting: {shlex.join(cmd)}")
    log(f"server log: {logpath}")
    with open(logpath, "wb") as lf:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_healthy(proc, url, args.startup_timeout, logpath, args.api_key)
        startup = time.monotonic() - t0
        log(f"healthy after {startup:.1f}s (pid {proc.pid}); running the load")
        load_cmd = [sys.executable, os.path.join(HERE, "serve_load.py")] + load_args(args, url, proc.pid)
        p = subprocess.run(load_cmd, stdout=subprocess.PIPE, text=True)
        if p.returncode not in (0, 1) or not p.stdout.strip():
            raise RuntimeError(f"serve_load.py failed with status {p.returncode}")
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        if proc.poll() is not None:
            log(f"warning: the server exited during the load (status {proc.returncode})")
    finally:
        rc = stop(proc, args.stop_timeout)
        log(f"server stopped (status {rc})")
    result = {
        "side": args.side,
        "server_command": cmd,
        "server_version": version,
        "cpu": cpu_model(),
        "threads": args.threads if args.side == "llama-server" else None,
        "startup_s": round(startup, 2),
        "cpu_busy_before": busy,
        **summary,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"side             {args.side}  ({version or 'version unknown'})")
        print(f"server command   {shlex.join(cmd)}")
        print(f"cpu              {result['cpu']}")
        print(f"start-up         {result['startup_s']} s")
        print(serve_load.format_table(summary))
    return 0 if summary["errors"] == 0 else 1


def run_generate_side(args):
    prompt = args.prompt or serve_load.PROMPTS[0]
    cmd = [args.binary, "generate", "--model", args.model, "--chat", "--prompt", prompt,
           "--max-tokens", str(args.max_tokens)]
    if args.adapter:
        cmd += ["--adapter", args.adapter[0].split("=", 1)[-1]]
    cmd += args.server_arg
    busy = cpu_busy()
    if busy is not None and busy > 0.1:
        log(f"warning: the CPUs were {busy:.0%} busy before the start; other work skews the numbers")
    log(f"running {args.runs}x: {shlex.join(cmd)}")
    runs = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        m = DECODE_RE.search(p.stderr)
        if p.returncode != 0 or not m:
            sys.stderr.write(p.stderr[-2000:])
            raise RuntimeError(f"skillet generate failed (status {p.returncode}) or printed no decode line")
        run = {"prompt_tokens": int(m.group(1)), "prefill_s": float(m.group(2)),
               "new_tokens": int(m.group(3)), "decode_tok_s": float(m.group(4)),
               "finish": m.group(5), "wall_s": round(wall, 3)}
        runs.append(run)
        log(f"run {i + 1}: {run['new_tokens']} tokens, {run['decode_tok_s']} tok/s decode, "
            f"finish {run['finish']}, {wall:.2f}s wall")
    import resource
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # KiB on Linux
    rates = [r["decode_tok_s"] for r in runs]
    result = {
        "side": "generate",
        "command": cmd,
        "cpu": cpu_model(),
        "cpu_busy_before": busy,
        "runs": runs,
        "decode_tok_s_median": round(statistics.median(rates), 1),
        "decode_tok_s_best": round(max(rates), 1),
        "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
        "peak_rss_mib": round(peak, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"side                 generate (batch 1)")
        print(f"command              {shlex.join(cmd)}")
        print(f"cpu                  {result['cpu']}")
        print(f"runs                 {len(runs)}; new tokens {[r['new_tokens'] for r in runs]};"
              f" finish {[r['finish'] for r in runs]}")
        print(f"decode tok/s         median {result['decode_tok_s_median']}, best {result['decode_tok_s_best']}"
              f" (runs: {', '.join(str(r) for r in rates)})")
        print(f"prefill              {runs[0]['prompt_tokens']} tokens in"
              f" {statistics.median(r['prefill_s'] for r in runs):.3f} s (median)")
        print(f"wall per run         {result['wall_s_median']} s (median, includes loading)")
        print(f"peak RSS             {result['peak_rss_mib']} MiB")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", required=True, choices=["llama-server", "skillet", "generate"])
    ap.add_argument("--binary", required=True, help="llama-server or skillet executable")
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="skillet serve adapter (repeatable); generate uses the first one's DIR")
    ap.add_argument("--parallel", type=int, default=8, help="llama-server slots, -np (default %(default)s)")
    ap.add_argument("--ctx-per-slot", type=int, default=1024,
                    help="llama-server context per slot; -c is this times --parallel (default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=8, help="skillet serve --max-batch (default %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="llama-server -t (default: all cores, %(default)s)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for the server (or skillet generate), repeatable")
    ap.add_argument("--log", help="server log file (default: a temporary file)")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--stop-timeout", type=float, default=15.0)
    # passed through to serve_load.py
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--models", help="comma list of model names (default: GET /v1/models)")
    ap.add_argument("--rss-after", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1,
                    help="unmeasured requests before the load (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=len(serve_load.PROMPTS))
    ap.add_argument("--extra-body", metavar="JSON", help="merged into every request body")
    ap.add_argument("--api-key")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s")
    # generate side
    ap.add_argument("--runs", type=int, default=3, help="skillet generate runs (default %(default)s)")
    ap.add_argument("--prompt", help="skillet generate prompt (default: the first built-in prompt)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.binary = os.path.abspath(os.path.expanduser(args.binary))
    args.model = os.path.abspath(os.path.expanduser(args.model))
    for path in (args.binary, args.model):
        if not os.path.exists(path):
            ap.error(f"{path} does not exist")
    try:
        if args.side == "generate":
            return run_generate_side(args)
        return run_server_side(args)
    except RuntimeError as e:
        log(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
