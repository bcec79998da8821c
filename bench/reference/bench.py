"""The reference side of `skillet bench`: the same workloads on the same
weights and shapes with PyTorch + transformers + PEFT, printing the same
JSON row. Run through bench/compare.py, or by hand:

    python bench/reference/bench.py --model MODEL.gguf --workload lora --batch 4 --seq 256 --json

The GGUF is loaded by transformers and dequantized to float32, as Skillet
does. Workloads: lora (r=8, alpha=16 on q,k,v,o; AdamW; `model(ids,
labels=ids)`), full (every weight trained), sft (LoRA on a chat JSONL with
the usual recipe: chat template, loss on assistant tokens only, padding to
the batch's longest, full logits; real tokens counted), score (forward),
decode (batch-1 greedy, 128 new tokens, KV cache); dpo and grpo run TRL's
DPOTrainer and GRPOTrainer (trl_workloads.py). `--precision bf16` runs
the training and scoring workloads under `torch.autocast("cpu",
dtype=torch.bfloat16)`, the mixed precision TRL and the HF Trainer turn on
where the CPU has bf16 (weights and optimizer state stay f32).
"""

import contextlib

import argparse
import json
import os
import resource
import statistics
import time

import torch


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gemm_gflops():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(5))
    return 2 * 1024 ** 3 / best / 1e9


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_params(cfg):
    h, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h


def chat_examples(tok, path):
    """Each chat line of a JSONL file as (ids, labels): the chat template
    applied, labels -100 on the prompt (loss on the assistant's reply)."""
    examples = []
    for line in open(path, encoding="utf-8"):
        if not line.strip():
            continue
        msgs = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        examples.append((ids, [-100] * len(p_ids) + ids[len(p_ids):]))
    return examples


def padded_batch(chunk, pad):
    """(ids, attention mask, labels) of examples padded to the longest."""
    longest = max(len(e[0]) for e in chunk)
    ids = torch.tensor([e[0] + [pad] * (longest - len(e[0])) for e in chunk])
    labels = torch.tensor([e[1] + [-100] * (longest - len(e[1])) for e in chunk])
    mask = torch.tensor([[1] * len(e[0]) + [0] * (longest - len(e[0])) for e in chunk])
    return ids, mask, labels


def pad_id(tok):
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def sft_batches(tok, path, batch):
    examples = chat_examples(tok, path)
    return [padded_batch(examples[i:i + batch], pad_id(tok)) for i in range(0, len(examples), batch)]


def nf4_model(model, precision):
    """The model reloaded with bitsandbytes' NF4 (double quantization, the
    compute dtype of `precision`), as transformers' QLoRA recipe loads it."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from safetensors.torch import save_model
    with tempfile.TemporaryDirectory() as d:
        # A model read from GGUF will not save itself: write its config
        # and weights as a plain folder.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(d)
        save_model(model, os.path.join(d, "model.safetensors"))
        del model
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.float32, device_map="cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True, choices=["lora", "qlora-nf4", "full", "sft", "dpo", "grpo", "score", "decode"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", default="examples/contacts/train.jsonl")
    ap.add_argument("--pairs", default="examples/contacts/pairs_train.jsonl")
    ap.add_argument("--prompts", default="examples/contacts/prompts_train.jsonl")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--precompute-ref", action="store_true",
                    help="dpo: reference log-probabilities computed before training (TRL's precompute_ref_log_probs)")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if args.workload == "qlora-nf4":
        model = nf4_model(model, args.precision)
    gemm = gemm_gflops()
    params = matmul_params(model.config)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    batch, seq = args.batch, args.seq

    if args.workload in ("dpo", "grpo"):
        import trl_workloads
        run = trl_workloads.run_dpo if args.workload == "dpo" else trl_workloads.run_grpo
        times, tokens, seq = run(args, model, tok)
        step = statistics.median(times)
        tps = statistics.median(tokens) / step
        flops = (4 if args.workload == "dpo" else 6) * params
    elif args.workload in ("lora", "qlora-nf4", "full", "sft"):
        if args.workload in ("lora", "qlora-nf4", "sft"):
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            flops = 4 * params
        else:
            flops = 6 * params
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if args.workload == "sft":
            batches = sft_batches(tok, args.data, batch)
            seq = sum(len(b[0][0]) for b in batches) // len(batches)
        else:
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            batches = [(ids, torch.ones_like(ids), ids)]
        times, tokens = [], []
        for i in range(args.warmup + args.steps):
            ids, mask, labels = batches[i % len(batches)]
            t = time.perf_counter()
            with autocast():
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
                tokens.append(int(mask.sum()))
        step = statistics.median(times)
        tps = statistics.median(tokens) / step
    elif args.workload == "score":
        model.eval()
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        with torch.no_grad(), autocast():
            times = [timed(lambda: model(ids)) for _ in range(args.warmup + args.steps)][args.warmup:]
        step = statistics.median(times)
        tps, flops = batch * seq / step, 2 * params
    else:
        model.eval()
        prompt = tok("Tell me a story about a dragon.", return_tensors="pt", add_special_tokens=False)["input_ids"]
        rates = []
        for i in range(args.warmup + min(args.steps, 3)):
            with torch.no_grad():
                first = timed(lambda: model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id))
                total = timed(lambda: model.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                                                     pad_token_id=tok.eos_token_id))
            if i >= args.warmup:
                rates.append(127 / (total - first))
        tps, flops, batch, seq = statistics.median(rates), 2 * params, 1, 1
        step = 1 / tps
    row = {"workload": args.workload, "batch": batch, "seq": seq, "tokens_per_s": tps, "peak_rss_mib": peak_rss_mib(),
           "mfu": tps * flops / (gemm * 1e9), "step_seconds": step, "gemm_gflops": gemm, "threads": args.threads,
           "precision": args.precision if args.workload != "decode" else "f32",
           "attention": model.config._attn_implementation}
    if args.workload == "dpo":
        row["precompute_ref"] = args.precompute_ref
    print(json.dumps(row))


if __name__ == "__main__":
    main()
