"""Checks `skillet export` against llama.cpp (llama-cpp-python): each merged
GGUF type, and the adapter alone as a llama.cpp LoRA GGUF on the base, must
give in llama.cpp the numbers Skillet gives on the same file: greedy
answers equal, or no further from llama.cpp's than llama.cpp's own are when
it reads the prompt another way.

    python3 bench/reference/check_export_llamacpp.py     # uses .venv-llamacpp

Model: the default (scripts/fetch-model.sh) unless --model; adapter:
runs/contacts/adapter (scripts/demo.sh writes it) unless --adapter; with
neither there, a short run of examples/contacts trains one into
runs/export-check. Prompts: the first --prompts questions of
examples/contacts/valid.jsonl, in the model's ChatML turn markup, tokenized
with the special tokens the tokenizer adds. Skillet's ids come from `skillet
generate --json` (greedy, stopping at end of turn), llama.cpp's from argmax
over its logits, token by token.

The yardstick: llama.cpp run a second time with the prompt read one token at
a time. In exact arithmetic nothing changes; in llama.cpp's kernels the 8-bit
rounding of activations and the order of sums do, and a trained model's
near ties (two tokens a few hundredths of a logit apart) then fall the other
way on some prompts. Each run scores Skillet's tokens (token by token after
the prompt), and the mean |log-probability difference| to llama.cpp's first
run is printed for Skillet and for the second run, with the largest, and
how many prompts' greedy answers equal the first run's. A file passes when
every answer is equal, or when Skillet's mean difference is at most
TOLERANCE times the second run's. Quantized types run twice: Skillet's
activations in f32 (shown, not judged: other numbers than llama.cpp's by
design) and rounded to 8 bits as llama.cpp rounds them (judged). Exits 1
when a judged file misses.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TYPES = ["f16", "bf16", "q8_0", "q6_k", "q4_k_m", "q4_0"]
# How much further from llama.cpp than llama.cpp from itself Skillet may be,
# in mean |log p difference| (Skillet's differences come from prompt and
# generation alike, the yardstick's from the prompt alone).
TOLERANCE = 1.25


def reexec_in_venv():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        python = subprocess.run(["bash", os.path.join(HERE, "setup-llamacpp.sh")], check=True,
                                capture_output=True, text=True).stdout.strip()
        os.execv(python, [python] + sys.argv)


def skillet(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return out.stdout


def prompts(n):
    rows = []
    with open(os.path.join(ROOT, "examples", "contacts", "valid.jsonl")) as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            user = next(m["content"] for m in msgs if m["role"] == "user")
            rows.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
            if len(rows) == n:
                break
    return rows


def llama_run(llm, ids, n, stops, forced=None):
    """llama.cpp's greedy tokens (or the `forced` ones), token by token after
    the prompt, and its log-softmax at each step."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out, logprobs = [], []
    for i in range(len(forced) if forced is not None else n):
        row = llm.scores[llm.n_tokens - 1].astype(np.float64)
        row -= row.max()
        row -= np.log(np.exp(row).sum())
        tok = int(row.argmax()) if forced is None else forced[i]
        out.append(tok)
        logprobs.append(row)
        if forced is None and tok in stops:
            break
        llm.eval([tok])
    return out, logprobs


def llama(model, lora, one_by_one=False):
    from llama_cpp import Llama

    kwargs = dict(model_path=model, n_ctx=512, n_threads=os.cpu_count(), logits_all=True, verbose=False)
    if lora:
        kwargs["lora_path"] = lora
    if one_by_one:
        # The prompt too is read one token at a time: the same numbers in
        # exact arithmetic, another path through llama.cpp's kernels (its
        # 8-bit activation rounding and sums run otherwise).
        kwargs.update(n_batch=1, n_ubatch=1)
    return Llama(**kwargs)


def compare(binary, model, texts, max_tokens, lora=None, adapter=None, activations="f32"):
    """Skillet's greedy tokens against llama.cpp's on the same file, and,
    as the yardstick, llama.cpp's against itself with the prompt read one
    token at a time. Each of the three is also scored on Skillet's tokens:
    the largest difference of log-probability shows how far apart the
    numbers are where no answer parts."""
    import numpy as np

    llm, llm1 = llama(model, lora), llama(model, lora, one_by_one=True)
    stops = {llm.token_eos()}
    results = []
    for text in texts:
        want_prompt = skillet_tokenize(binary, model, text)
        got_prompt = llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                                  special=True)
        args = ["generate", "--model", model, "--prompt", text, "--max-tokens", str(max_tokens), "--json",
                "--activations", activations, "--logprobs", "0"]
        if adapter:
            args += ["--adapter", adapter]
        gen = json.loads(skillet(binary, *args))
        ours = gen["ids"]
        # Skillet stops at any of the model's end ids; the one it met ends
        # llama.cpp's run too.
        ends = stops | set(ours[-1:]) if gen["finish_reason"] == "stop" else stops
        theirs, lps = llama_run(llm, got_prompt, max_tokens, ends)
        self_run, _ = llama_run(llm1, got_prompt, max_tokens, ends)
        _, forced = llama_run(llm, got_prompt, 0, ends, forced=ours)
        _, forced1 = llama_run(llm1, got_prompt, 0, ends, forced=ours)
        on_ours = np.array([row[t] for row, t in zip(forced, ours)])
        on_ours1 = np.array([row[t] for row, t in zip(forced1, ours)])
        skillet_lp = np.array([lp["logprob"] for lp in gen["logprobs"]])
        part = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        results.append({
            "prompt": text, "prompt_equal": got_prompt == want_prompt, "skillet": ours, "llama_cpp": theirs,
            "equal": got_prompt == want_prompt and theirs[: len(ours)] == ours,
            "self_equal": self_run == theirs,
            "part": part,
            # Where they part: llama.cpp's own gap between its token and
            # Skillet's (a near tie is a few hundredths).
            "gap": None if part is None else float(lps[part][theirs[part]] - lps[part][ours[part]]),
            "delta": np.abs(skillet_lp - on_ours).tolist(),
            "self_delta": np.abs(on_ours1 - on_ours).tolist(),
        })
    return results


def skillet_tokenize(binary, model, text):
    return json.loads(skillet(binary, "tokenize", "--model", model, "--add-special", "--json", text))["ids"]


def main():
    reexec_in_venv()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--adapter")
    ap.add_argument("--skillet", default=os.path.join(ROOT, "target", "release", "skillet"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    model = args.model or subprocess.run(["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")], check=True,
                                         capture_output=True, text=True).stdout.strip()
    adapter = args.adapter or os.path.join(ROOT, "runs", "contacts", "adapter")
    if not os.path.isdir(adapter):
        out = os.path.join(ROOT, "runs", "export-check")
        skillet(args.skillet, "train", os.path.join(ROOT, "examples", "contacts", "config.toml"),
                "--set", f"model=\"{model}\"", "--set", f"output_dir=\"{out}\"", "--set", "train.max_steps=20",
                "--overwrite")
        adapter = os.path.join(out, "adapter")
    texts = prompts(args.prompts)
    import numpy as np

    summary, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for ty in args.types.split(","):
            path = os.path.join(tmp, f"merged-{ty}.gguf")
            skillet(args.skillet, "export", "--model", model, "--adapter", adapter, "--type", ty, "--out", path)
            if ty.startswith("q"):
                summary[f"merged {ty} f32"] = compare(args.skillet, path, texts, args.max_tokens)
                # Skillet's activations rounded to 8 bits as llama.cpp rounds
                # them for each quantized weight type (per 32 values for
                # Q4_0 / Q4_1 / Q5_x / Q8_0, per 256 for the K-quants).
                summary[f"merged {ty} int8"] = compare(args.skillet, path, texts, args.max_tokens,
                                                       activations="int8")
            else:
                summary[f"merged {ty}"] = compare(args.skillet, path, texts, args.max_tokens)
        base = os.path.join(tmp, "base-f16.gguf")
        skillet(args.skillet, "export", "--model", model, "--type", "f16", "--out", base)
        lora = os.path.join(tmp, "adapter.gguf")
        skillet(args.skillet, "export", "--model", model, "--adapter", adapter, "--format", "gguf-lora",
                "--out", lora)
        summary["f16 base + gguf-lora"] = compare(args.skillet, base, texts, args.max_tokens, lora=lora,
                                                  adapter=adapter)
    for name, res in summary.items():
        equal = sum(r["equal"] for r in res)
        self_equal = sum(r["self_equal"] for r in res)
        # Skillet's f32 inputs to quantized weights are other numbers than
        # llama.cpp's 8-bit ones: that row is shown, not judged.
        judged = not name.endswith(" f32")
        delta = np.concatenate([r["delta"] for r in res])
        self_delta = np.concatenate([r["self_delta"] for r in res])
        passed = equal == len(res) or delta.mean() <= TOLERANCE * self_delta.mean()
        ok &= passed or not judged
        verdict = ("ok" if passed else "MISSED") if judged else "shown"
        print(f"{name:22} equal {equal}/{len(res)}, llama.cpp with itself {self_equal}/{len(res)}; "
              f"|log p difference| mean {delta.mean():.4f} (itself {self_delta.mean():.4f}), "
              f"max {delta.max():.3f} (itself {self_delta.max():.3f}); {len(delta)} tokens: {verdict}")
        for r in res:
            if not r["equal"]:
                print(f"    prompt    {r['prompt']!r} (tokens equal: {r['prompt_equal']})\n"
                      f"    parts at token {r['part']}, llama.cpp's logit gap there {r['gap']}\n"
                      f"    skillet   {r['skillet']}\n    llama.cpp {r['llama_cpp']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
