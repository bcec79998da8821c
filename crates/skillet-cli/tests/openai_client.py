"""Drives a running `skillet serve` with the official `openai` Python client,
as users do. Run by tests/serve.rs (which starts the server and makes the
adapters); exits non-zero with a message on the first failed check.

    python openai_client.py --base-url http://127.0.0.1:PORT/v1 --api-key KEY \
        --admin-key ADMIN --model BASE --adapter a1 --lazy-adapter a2 --load-path a1
"""

import argparse
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def expect(exc_type, fn, what):
    try:
        fn()
    except exc_type as e:
        print(f"ok: {what} -> {type(e).__name__} {e.status_code}")
        return e
    except Exception as e:  # noqa: BLE001 - report what came instead
        check(False, f"{what}: expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    check(False, f"{what}: expected {exc_type.__name__}, got no error")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--admin-key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--lazy-adapter", required=True)
    ap.add_argument("--load-path", required=True)
    a = ap.parse_args()

    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=120)
    admin = openai.OpenAI(base_url=a.base_url, api_key=a.admin_key, max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    # Models: the base and the adapter given at start, its parent the base.
    models = {m.id: m for m in client.models.list()}
    check(a.model in models and a.adapter in models, f"models list has the base and {a.adapter}: {list(models)}")
    check(getattr(models[a.adapter], "parent", None) == a.model, "an adapter's parent is the base model")

    # Chat, not streamed: greedy, with usage.
    r = client.chat.completions.create(model=a.model, messages=ask, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    check(r.object == "chat.completion" and "Paris" in text, f"greedy chat answer: {text!r}")
    check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason is stop or length")
    u = r.usage
    check(u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens,
          f"usage adds up: {u}")

    # The same, streamed, with a usage chunk at the end.
    chunks = list(client.chat.completions.create(model=a.model, messages=ask, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, f"streamed text equals the whole answer: {streamed!r}")
    check(all(c.object == "chat.completion.chunk" for c in chunks), "chunks are chat.completion.chunk")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(finishes == [r.choices[0].finish_reason], f"one finish_reason at the end: {finishes}")
    check(chunks[-1].choices == [] and chunks[-1].usage is not None
          and chunks[-1].usage.completion_tokens == u.completion_tokens, "last chunk carries usage only")
    check(all(c.usage is None for c in chunks[:-1]), "other chunks have usage null")

    # Text completions, whole and streamed.
    c = client.completions.create(model=a.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    check(c.object == "text_completion" and len(c.choices[0].text) > 0, f"completion: {c.choices[0].text!r}")
    cs = list(client.completions.create(model=a.model, prompt="The capital of France is", max_tokens=8,
                                        temperature=0, stream=True))
    check("".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text, "streamed completion equals whole")

    # n = 2, sampled with a seed: two choices, usage sums them; the same seed repeats.
    def two():
        return client.chat.completions.create(model=a.model, messages=ask, n=2, temperature=1.0, seed=7, max_tokens=16)
    r2 = two()
    check(len(r2.choices) == 2 and {ch.index for ch in r2.choices} == {0, 1}, "n=2 gives two choices")
    check(r2.usage.completion_tokens >= 2, "usage counts both choices")
    check([ch.message.content for ch in two().choices] == [ch.message.content for ch in r2.choices],
          "the same seed gives the same samples")

    # Log-probabilities.
    lp = client.chat.completions.create(model=a.model, messages=ask, temperature=0, max_tokens=4,
                                        logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    check(len(content) >= 1 and len(content[0].top_logprobs) == 2 and content[0].logprob <= 0,
          "logprobs with two alternatives")

    # An adapter by name: it answers under its own name, with its own numbers
    # (a short factual answer may keep its words, so compare log-probabilities).
    ra = client.chat.completions.create(model=a.adapter, messages=ask, temperature=0, max_tokens=4,
                                        logprobs=True, top_logprobs=2)
    check(ra.model == a.adapter, "the answer names the adapter")
    first = [(t.token, t.logprob) for t in content[0].top_logprobs]
    adapted = [(t.token, t.logprob) for t in ra.choices[0].logprobs.content[0].top_logprobs]
    check(adapted != first, f"the adapter changes the log-probabilities: {adapted} vs {first}")
    # An adapter in --adapters-dir, loaded on first use.
    rl = client.chat.completions.create(model=a.lazy_adapter, messages=ask, temperature=0, max_tokens=8)
    check(rl.model == a.lazy_adapter, "an adapter folder is served by name on first use")

    # Load and unload at run time (admin key), then 404.
    expect(openai.PermissionDeniedError,
           lambda: client.post("/load_lora_adapter", body={"lora_name": "hot", "lora_path": a.load_path},
                               cast_to=object), "loading needs the admin key")
    admin.post("/load_lora_adapter", body={"lora_name": "hot", "lora_path": a.load_path}, cast_to=object)
    check("hot" in {m.id for m in client.models.list()}, "a loaded adapter is listed")
    rh = client.chat.completions.create(model="hot", messages=ask, temperature=0, max_tokens=4,
                                        logprobs=True, top_logprobs=2)
    hot = [(t.token, t.logprob) for t in rh.choices[0].logprobs.content[0].top_logprobs]
    check(rh.choices[0].message.content == ra.choices[0].message.content and hot == adapted,
          "the loaded adapter answers like the same adapter at start")
    admin.post("/unload_lora_adapter", body={"lora_name": "hot"}, cast_to=object)
    check("hot" not in {m.id for m in client.models.list()}, "an unloaded adapter is gone from the list")
    expect(openai.NotFoundError, lambda: client.chat.completions.create(model="hot", messages=ask, max_tokens=4),
           "an unloaded adapter is 404")

    # Errors, each as the SDK's own exception class.
    bad = openai.OpenAI(base_url=a.base_url, api_key="wrong", max_retries=0)
    expect(openai.AuthenticationError, lambda: bad.models.list(), "a wrong key is 401")
    e = expect(openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model", messages=ask),
               "an unknown model is 404")
    check(e.code == "model_not_found", f"404 code: {e.code}")
    e = expect(openai.BadRequestError,
               lambda: client.chat.completions.create(model=a.model, messages=ask, temperature=5),
               "a bad field is 400")
    check(e.param == "temperature", f"400 names the field: {e.param}")
    e = expect(openai.BadRequestError,
               lambda: client.chat.completions.create(model=a.model, messages=ask, max_tokens=10 ** 7),
               "max_tokens beyond the context is 400")
    check(e.param == "max_tokens", f"400 names max_tokens: {e.param}")
    print("all openai client checks passed")


if __name__ == "__main__":
    main()
