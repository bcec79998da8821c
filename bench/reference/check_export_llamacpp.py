"""Checks `skillet export` against llama.cpp (llama-cpp-python): each merged
GGUF type, and the adapter alone as a llama.cpp LoRA GGUF on the base, must
give llama.cpp the same greedy tokens Skillet gives on the same file.

    python3 bench/reference/check_export_llamacpp.py     # uses .venv-llamacpp

Model: the default (scripts/fetch-model.sh) unless --model; adapter:
runs/contacts/adapter (scripts/demo.sh writes it) unless --adapter; with
neither there, a short run of examples/contacts trains one into
runs/export-check. Prompts: the first --prompts questions of
examples/contacts/valid.jsonl, in the model's ChatML turn markup, tokenized
with the special tokens the tokenizer adds. Skillet's ids come from `skillet
generate --json` (greedy, stopping at end of turn), llama.cpp's from argmax
over its logits, token by token. Prints one line per file (quantized types
twice: Skillet's activations in f32, and rounded to 8 bits as llama.cpp
rounds them) and each difference; exits 1 on any.
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


def llama_greedy(llm, ids, n, stops):
    """llama.cpp's greedy tokens, and its logits at each step."""
    llm.reset()
    llm.eval(ids)
    out, scores = [], []
    for _ in range(n):
        row = llm.scores[llm.n_tokens - 1].copy()
        tok = int(row.argmax())
        out.append(tok)
        scores.append(row)
        if tok in stops:
            break
        llm.eval([tok])
    return out, scores


def compare(binary, model, texts, max_tokens, lora=None, adapter=None, activations="f32"):
    from llama_cpp import Llama

    kwargs = dict(model_path=model, n_ctx=512, n_threads=os.cpu_count(), logits_all=True, verbose=False)
    if lora:
        kwargs["lora_path"] = lora
    llm = Llama(**kwargs)
    stops = {llm.token_eos()}
    results = []
    for text in texts:
        want_prompt = skillet_tokenize(binary, model, text)
        got_prompt = llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                                  special=True)
        args = ["generate", "--model", model, "--prompt", text, "--max-tokens", str(max_tokens), "--json",
                "--activations", activations]
        if adapter:
            args += ["--adapter", adapter]
        gen = json.loads(skillet(binary, *args))
        ours = gen["ids"]
        # Skillet stops at any of the model's end ids; the one it met ends
        # llama.cpp's run too.
        ends = stops | set(ours[-1:]) if gen["finish_reason"] == "stop" else stops
        theirs, scores = llama_greedy(llm, got_prompt, max_tokens, ends)
        same = got_prompt == want_prompt and theirs[: len(ours)] == ours
        # Where they part: llama.cpp's own logit gap between its token and
        # Skillet's (a near tie is a few hundredths).
        part = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        gap = None if part is None else float(scores[part][theirs[part]] - scores[part][ours[part]])
        results.append({"prompt": text, "prompt_equal": got_prompt == want_prompt, "skillet": ours,
                        "llama_cpp": theirs, "equal": same, "part": part, "gap": gap})
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
    summary, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for ty in args.types.split(","):
            path = os.path.join(tmp, f"merged-{ty}.gguf")
            skillet(args.skillet, "export", "--model", model, "--adapter", adapter, "--type", ty, "--out", path)
            summary[f"merged {ty}"] = compare(args.skillet, path, texts, args.max_tokens)
            if ty.startswith("q"):
                # Skillet's activations rounded to 8 bits as llama.cpp rounds
                # them for each quantized weight type (per 32 values for
                # Q4_0 / Q4_1 / Q5_x / Q8_0, per 256 for the K-quants).
                summary[f"merged {ty} int8"] = compare(args.skillet, path, texts, args.max_tokens,
                                                       activations="int8")
        base = os.path.join(tmp, "base-f16.gguf")
        skillet(args.skillet, "export", "--model", model, "--type", "f16", "--out", base)
        lora = os.path.join(tmp, "adapter.gguf")
        skillet(args.skillet, "export", "--model", model, "--adapter", adapter, "--format", "gguf-lora",
                "--out", lora)
        summary["f16 base + gguf-lora"] = compare(args.skillet, base, texts, args.max_tokens, lora=lora,
                                                  adapter=adapter)
    for name, res in summary.items():
        equal = sum(r["equal"] for r in res)
        ok &= equal == len(res)
        tokens = sum(len(r["skillet"]) for r in res)
        print(f"{name:24} {equal}/{len(res)} prompts equal ({tokens} tokens)")
        for r in res:
            if not r["equal"]:
                print(f"    prompt    {r['prompt']!r} (tokens equal: {r['prompt_equal']})\n"
                      f"    parts at token {r['part']}, llama.cpp's logit gap there {r['gap']}\n"
                      f"    skillet   {r['skillet']}\n    llama.cpp {r['llama_cpp']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
