"""Load generator for an OpenAI-compatible chat server (skillet serve,
llama-server, ...). Standard library only (Python 3.11+): raw HTTP/1.1 over
asyncio streams, one connection per request.

Requests go to POST /v1/chat/completions with a fixed output length
("max_tokens": M, "temperature": 0, "ignore_eos": true), streamed by default
("stream": true, "stream_options": {"include_usage": true}). The `model`
field cycles round-robin over --models (for example the base model and
several adapters); without --models, every id that GET /v1/models lists is
used. The chat prompts are built in and cycled.

Per request it measures the time to first token (the first SSE chunk with
non-empty delta content), the gaps between content chunks, the total time
and the completion tokens (the final usage chunk's completion_tokens, else
the number of content chunks). A request is an error if the status is not
200, the body is malformed, or it carries no content.

Reported: requests, errors, wall seconds, output tokens/s (all completion
tokens over the wall time), requests/s, p50/p99 time to first token, p50/p99
inter-token latency (gap between content chunks) and p50/p99 time per output
token ((total - TTFT) / (tokens - 1) per request), and with --pid the
server's VmRSS after the first --rss-after completions and at the end, and
its VmHWM (peak RSS), from /proc/PID/status.

Usually run through bench/serve.py, which starts and stops the server. By
hand, against a running server:

    python3 bench/serve_load.py --url http://127.0.0.1:8080 \
        --requests 32 --concurrency 8 --max-tokens 64 \
        --pid "$(pgrep -n llama-server)" --rss-after 8

    python3 bench/serve_load.py --models base,math,code,chat \
        --requests 64 --concurrency 8 --max-tokens 64 --json
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "List ten ideas for a rainy afternoon with children, with one sentence each.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main differences between a city bike and a mountain bike?",
    "Write a polite email asking a neighbour to move their car from the driveway.",
    "Give a recipe for a simple vegetable soup and explain each step.",
    "Summarise the rules of chess for someone who has never played.",
]


def percentile(values, q):
    """q-th percentile (0-100) with linear interpolation; None if empty."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def read_proc_status(pid):
    """VmRSS and VmHWM of a process in MiB, or (None, None)."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024.0
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return rss, hwm


class Target:
    def __init__(self, url, api_key):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", ""):
            raise SystemExit(f"only plain http is supported, not {u.scheme}://")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        base = u.path.rstrip("/")
        if base.endswith("/chat/completions"):
            base = base[: -len("/chat/completions")]
        elif not base.endswith("/v1"):
            base += "/v1"
        self.base = base
        self.api_key = api_key

    def headers(self, method, path, body):
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "User-Agent: skillet-serve-load",
            "Accept: text/event-stream, application/json",
            "Connection: close",
        ]
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        if body is not None:
            lines.append("Content-Type: application/json")
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpError(Exception):
    pass


async def open_request(target, method, path, body=None):
    """Send one request; return (status, headers, reader, writer)."""
    reader, writer = await asyncio.open_connection(target.host, target.port, limit=1 << 20)
    writer.write(target.headers(method, path, body))
    if body is not None:
        writer.write(body)
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        writer.close()
        raise HttpError(f"bad status line {status_line[:80]!r}")
    status = int(parts[1])
    headers = {}
    while True:
        line = await reader.readline()
        if not line:
            raise HttpError("connection closed in headers")
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, reader, writer


async def body_pieces(reader, headers):
    """Yield the response body as it arrives, undoing chunked encoding."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise HttpError("connection closed in chunked body")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after the chunk
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            piece = await reader.read(min(left, 65536))
            if not piece:
                raise HttpError("connection closed before content-length")
            left -= len(piece)
            yield piece
    else:
        while True:
            piece = await reader.read(65536)
            if not piece:
                return
            yield piece


async def read_body(reader, headers):
    out = bytearray()
    async for piece in body_pieces(reader, headers):
        out += piece
    return bytes(out)


async def get_json(target, path):
    status, headers, reader, writer = await open_request(target, "GET", path)
    try:
        body = await read_body(reader, headers)
    finally:
        writer.close()
    if status != 200:
        raise HttpError(f"GET {path}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


async def sse_events(pieces):
    """Yield the data of each SSE event (data lines joined by newlines)."""
    buf = b""
    data = []
    async for piece in pieces:
        buf += piece
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1:]
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" ").decode("utf-8", "replace"))
            # comments (":"), event:, id:, retry: are ignored
    tail = buf.rstrip(b"\r")
    if tail.startswith(b"data:"):
        data.append(tail[5:].lstrip(b" ").decode("utf-8", "replace"))
    if data:
        yield "\n".join(data)


class Result:
    __slots__ = ("index", "model", "ok", "error", "status", "ttft", "gaps", "total",
                 "completion_tokens", "prompt_tokens", "chunks", "usage_seen",
                 "finish_reason", "text_len")

    def __init__(self, index, model):
        self.index = index
        self.model = model
        self.ok = False
        self.error = None
        self.status = None
        self.ttft = None
        self.gaps = []
        self.total = None
        self.completion_tokens = 0
        self.prompt_tokens = None
        self.chunks = 0
        self.usage_seen = False
        self.finish_reason = None
        self.text_len = 0


def request_body(args, model, prompt):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": args.stream,
    }
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    body.update(args.extra_body)
    return json.dumps(body).encode()


async def one_request(target, args, index, model, prompt):
    r = Result(index, model)
    path = target.base + "/chat/completions"
    body = request_body(args, model, prompt)
    t0 = time.perf_counter()
    writer = None
    try:
        status, headers, reader, writer = await open_request(target, "POST", path, body)
        r.status = status
        if status != 200:
            text = await read_body(reader, headers)
            raise HttpError(f"HTTP {status}: {text[:200].decode('utf-8', 'replace')}")
        if args.stream:
            last = None
            done = False
            async for data in sse_events(body_pieces(reader, headers)):
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    ev = json.loads(data)
                except json.JSONDecodeError as e:
                    raise HttpError(f"malformed SSE data: {data[:120]!r}") from e
                if "error" in ev:
                    raise HttpError(f"error event: {json.dumps(ev['error'])[:200]}")
                now = time.perf_counter()
                for ch in ev.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        r.chunks += 1
                        r.text_len += len(content)
                        if r.ttft is None:
                            r.ttft = now - t0
                        else:
                            r.gaps.append(now - last)
                        last = now
                    if ch.get("finish_reason"):
                        r.finish_reason = ch["finish_reason"]
                usage = ev.get("usage")
                if usage:
                    r.usage_seen = True
                    r.completion_tokens = int(usage.get("completion_tokens") or 0)
                    r.prompt_tokens = usage.get("prompt_tokens")
            r.total = time.perf_counter() - t0
            if not done:
                raise HttpError("stream ended without data: [DONE]")
            if not r.usage_seen:
                r.completion_tokens = r.chunks
        else:
            raw = await read_body(reader, headers)
            r.total = time.perf_counter() - t0
            try:
                obj = json.loads(raw)
                msg = obj["choices"][0]["message"]
                content = msg.get("content") or ""
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                raise HttpError(f"malformed response: {raw[:160]!r}") from e
            r.ttft = None
            r.chunks = 1 if content else 0
            r.text_len = len(content)
            r.finish_reason = obj["choices"][0].get("finish_reason")
            usage = obj.get("usage") or {}
            r.usage_seen = bool(usage)
            r.completion_tokens = int(usage.get("completion_tokens") or r.chunks)
            r.prompt_tokens = usage.get("prompt_tokens")
        if r.chunks == 0:
            raise HttpError("no content in the response")
        r.ok = True
    except Exception as e:  # noqa: BLE001 - any failure is this request's error
        r.error = f"{type(e).__name__}: {e}" if not isinstance(e, HttpError) else str(e)
        if r.total is None:
            r.total = time.perf_counter() - t0
    finally:
        if writer is not None:
            writer.close()
    return r


async def list_models(target):
    obj = await get_json(target, target.base + "/models")
    return [m["id"] for m in obj.get("data", []) if "id" in m]


async def run(args):
    target = Target(args.url, args.api_key)
    if args.models:
        models = [m for m in args.models.split(",") if m]
    else:
        try:
            models = await list_models(target)
        except Exception as e:  # noqa: BLE001 - any failure: fall back
            print(f"serve_load: GET /v1/models failed ({e}); using model 'default'", file=sys.stderr)
            models = []
        models = models or ["default"]
    prompts = load_prompts(args)

    def job(i):
        return models[i % len(models)], prompts[i % len(prompts)]

    # Warm-up requests (not measured): one per model, sequentially by default.
    for i in range(args.warmup):
        m, p = job(i)
        r = await asyncio.wait_for(one_request(target, args, -1, m, p), args.timeout)
        if not r.ok:
            print(f"serve_load: warm-up request failed: {r.error}", file=sys.stderr)

    rss_start = read_proc_status(args.pid)[0] if args.pid else None
    rss_after = None
    results = []
    next_index = 0
    done_count = 0

    async def worker():
        nonlocal next_index, done_count, rss_after
        while next_index < args.requests:
            i = next_index
            next_index += 1
            m, p = job(i)
            try:
                r = await asyncio.wait_for(one_request(target, args, i, m, p), args.timeout)
            except asyncio.TimeoutError:
                r = Result(i, m)
                r.error = f"timeout after {args.timeout}s"
                r.total = args.timeout
            results.append(r)
            done_count += 1
            if args.pid and done_count == args.rss_after:
                rss_after = read_proc_status(args.pid)[0]
            if args.verbose:
                print(f"[{done_count}/{args.requests}] #{i} {m}: "
                      + (f"{r.completion_tokens} tok in {r.total:.2f}s" if r.ok else r.error),
                      file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(args.concurrency, args.requests)))))
    wall = time.perf_counter() - start
    rss_end, hwm = read_proc_status(args.pid) if args.pid else (None, None)
    if hwm is not None:  # VmHWM lags the per-thread RSS counters slightly
        hwm = max(x for x in (hwm, rss_start, rss_after, rss_end) if x is not None)
    return summarize(args, target, models, results, wall, rss_start, rss_after, rss_end, hwm)


def ms(x):
    return None if x is None else round(x * 1000.0, 2)


def summarize(args, target, models, results, wall, rss_start, rss_after, rss_end, hwm):
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tpots = [(r.total - r.ttft) / (r.completion_tokens - 1)
             for r in ok if r.ttft is not None and r.completion_tokens > 1]
    totals = [r.total for r in ok]
    per_model = {}
    for r in results:
        d = per_model.setdefault(r.model, {"requests": 0, "errors": 0, "completion_tokens": 0})
        d["requests"] += 1
        d["errors"] += 0 if r.ok else 1
        d["completion_tokens"] += r.completion_tokens if r.ok else 0
    counts = [r.completion_tokens for r in ok]
    error_samples = []
    for r in errors:
        if r.error not in error_samples:
            error_samples.append(r.error)
        if len(error_samples) >= 5:
            break
    rnd = lambda x, n=1: None if x is None else round(x, n)  # noqa: E731
    return {
        "url": f"http://{target.host}:{target.port}{target.base}/chat/completions",
        "models": models,
        "stream": args.stream,
        "requests": len(results),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "errors": len(errors),
        "error_samples": error_samples,
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "completion_tokens_min": min(counts) if counts else None,
        "completion_tokens_max": max(counts) if counts else None,
        "usage_reported": sum(1 for r in ok if r.usage_seen),
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
        "tpot_p99_ms": ms(percentile(tpots, 99)),
        "latency_p50_s": rnd(percentile(totals, 50), 3),
        "latency_p99_s": rnd(percentile(totals, 99), 3),
        "server_pid": args.pid,
        "rss_start_mib": rnd(rss_start),
        "rss_after": args.rss_after if args.pid else None,
        "rss_after_mib": rnd(rss_after),
        "rss_end_mib": rnd(rss_end),
        "rss_peak_mib": rnd(hwm),
        "per_model": per_model,
    }


def fmt(v, unit=""):
    if v is None:
        return "–"
    return f"{v}{unit}"


def format_table(s):
    """A readable multi-line summary of a summarize() result."""
    rows = [
        ("url", s["url"]),
        ("models", ", ".join(s["models"])),
        ("requests / concurrency", f"{s['requests']} / {s['concurrency']}"
                                   f" (max_tokens {s['max_tokens']}, stream {'on' if s['stream'] else 'off'})"),
        ("errors", str(s["errors"])),
        ("wall", f"{s['wall_s']:.2f} s"),
        ("completion tokens", f"{s['completion_tokens']} (per request {fmt(s['completion_tokens_min'])}"
                              f"..{fmt(s['completion_tokens_max'])}; usage reported by"
                              f" {s['usage_reported']}/{s['requests'] - s['errors']})"),
        ("output tokens/s", fmt(s["output_tok_s"])),
        ("requests/s", fmt(s["requests_s"])),
        ("TTFT p50 / p99", f"{fmt(s['ttft_p50_ms'])} / {fmt(s['ttft_p99_ms'])} ms"),
        ("inter-token p50 / p99", f"{fmt(s['itl_p50_ms'])} / {fmt(s['itl_p99_ms'])} ms"),
        ("time/output token p50 / p99", f"{fmt(s['tpot_p50_ms'])} / {fmt(s['tpot_p99_ms'])} ms"),
        ("request latency p50 / p99", f"{fmt(s['latency_p50_s'])} / {fmt(s['latency_p99_s'])} s"),
    ]
    if s.get("server_pid"):
        rows += [
            ("server RSS at start", f"{fmt(s['rss_start_mib'])} MiB"),
            (f"server RSS after {s['rss_after']} requests", f"{fmt(s['rss_after_mib'])} MiB"),
            ("server RSS at end", f"{fmt(s['rss_end_mib'])} MiB"),
            ("server peak RSS (VmHWM)", f"{fmt(s['rss_peak_mib'])} MiB"),
        ]
    if len(s["per_model"]) > 1:
        for m, d in s["per_model"].items():
            rows.append((f"  model {m}", f"{d['requests']} requests, {d['errors']} errors,"
                                         f" {d['completion_tokens']} tokens"))
    for e in s["error_samples"]:
        rows.append(("  error", e))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def load_prompts(args):
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise SystemExit(f"no prompts in {args.prompt_file}")
        return prompts
    return PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080",
                    help="server base URL (default %(default)s); /v1/chat/completions is appended")
    ap.add_argument("--api-key", default=os.environ.get("SKILLET_API_KEY"),
                    help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--models", default=None,
                    help="comma-separated model names, used round-robin (default: all of GET /v1/models)")
    ap.add_argument("--requests", type=int, default=32, help="measured requests (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64,
                    help="output tokens per request, with ignore_eos (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS),
                    help=f"how many of the {len(PROMPTS)} built-in prompts to cycle (default all)")
    ap.add_argument("--prompt-file", help="cycle these prompts instead (one per line)")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                    help="stream with SSE and include_usage (default on)")
    ap.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON",
                    help="object merged into every request body, e.g. '{\"cache_prompt\": false}'")
    ap.add_argument("--pid", type=int, help="server process id, for VmRSS/VmHWM from /proc")
    ap.add_argument("--rss-after", type=int, default=8,
                    help="record the server's VmRSS after this many requests complete (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="unmeasured requests sent one at a time first (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per request on stderr")
    args = ap.parse_args(argv)
    if not isinstance(args.extra_body, dict):
        ap.error("--extra-body must be a JSON object")
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        ap.error("--requests, --concurrency and --max-tokens must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary))
    return 1 if summary["errors"] == summary["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
