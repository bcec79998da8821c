"""Loss curves of fine-tuning in f32 and under bf16 autocast with PyTorch,
on the bundled example with Skillet's recipe, beside `skillet train`'s
curves in both precisions when `--skillet` names its binary:

    python bench/reference/precision_curve.py --model MODEL.gguf --tuning full --lr 5e-6 --steps 6 \
        --skillet target/release/skillet

Skillet's recipe: the examples of examples/contacts/train.jsonl in the
order of its first epoch (the seeded shuffle of skillet-train's
`epoch_order`, reproduced here), batches of 8, loss on the assistant's
tokens (mean over the batch's labelled tokens), AdamW (0.9, 0.999, 1e-8,
no weight decay), cosine schedule with linear warmup (the first step's
rate is 0), gradient norm clipped to 1. `--tuning full` trains every
weight (the tied embeddings too); `lora` trains an r=8, alpha=16 adapter
on q, k, v and o. Prints one JSON line per side, step and precision (the
loss, the gradient norm before clipping and the learning rate), then a
table: each side's bf16 loss over its f32 loss, step by step.
"""

import argparse
import json
import math
import os
import subprocess
import tempfile

import torch

from bench import chat_examples, pad_id, padded_batch

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix(state):
    state = (state + GOLDEN) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def epoch_order(items, seed, epoch):
    """skillet-train's `epoch_order`: a Fisher-Yates shuffle by splitmix64."""
    order = list(range(items))
    state = seed ^ (((epoch + 1) * GOLDEN) & MASK)
    for i in range(items - 1, 0, -1):
        state, r = splitmix(state)
        j = r % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def run(args, precision, data, pad):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(args.model))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if args.tuning == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def rate(step):
        if step < args.warmup:
            return step / max(args.warmup, 1)
        progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    order = epoch_order(len(data), args.seed, 0)
    for step in range(args.steps):
        chunk = [data[i] for i in order[step * args.batch:(step + 1) * args.batch]]
        ids, mask, labels = padded_batch(chunk, pad)
        lr = sched.get_last_lr()[0]
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        row = {"side": "pytorch", "precision": precision, "step": step + 1, "loss": loss.item(),
               "grad_norm": norm.item(), "lr": lr}
        print(json.dumps(row), flush=True)
        yield row


def skillet(args, precision):
    """`skillet train` on the bundled example's config with the same
    settings; its metrics.jsonl's train rows."""
    with tempfile.TemporaryDirectory() as out:
        sets = {"model": json.dumps(os.path.abspath(args.model)), "output_dir": json.dumps(out),
                "data.train": json.dumps(args.data), "train.max_steps": str(args.steps),
                "train.precision": json.dumps(precision), "train.lr": repr(args.lr),
                "train.tuning": json.dumps(args.tuning), "train.warmup_steps": str(args.warmup),
                "train.batch_size": str(args.batch), "seed": str(args.seed),
                "eval.generate": "false", "eval.every": "0"}
        cmd = [args.skillet, "train", "examples/contacts/config.toml"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8"):
            m = json.loads(line)
            if m.get("kind") == "train":
                row = {"side": "skillet", "precision": precision, "step": m["step"], "loss": m["loss"],
                       "grad_norm": m["grad_norm"], "lr": m["lr"]}
                print(json.dumps(row), flush=True)
                yield row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="examples/contacts/train.jsonl")
    ap.add_argument("--tuning", choices=["full", "lora"], default="full")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skillet", help="the skillet binary: run its side too")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer
    folder, name = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    data = chat_examples(tok, args.data)
    pad = pad_id(tok)
    rows = []
    for precision in ("f32", "bf16"):
        rows += run(args, precision, data, pad)
        if args.skillet:
            rows += skillet(args, precision)
    loss = {(r["side"], r["precision"], r["step"]): r["loss"] for r in rows}
    sides = ["pytorch"] + (["skillet"] if args.skillet else [])
    print("| step | " + " | ".join(f"{s} f32 | {s} bf16 | {s} bf16/f32" for s in sides) + " |")
    print("|---" * (1 + 3 * len(sides)) + "|")
    for step in range(1, args.steps + 1):
        cells = []
        for s in sides:
            a, b = loss[(s, "f32", step)], loss[(s, "bf16", step)]
            cells += [f"{a:.4f}", f"{b:.4f}", f"{b / a:.3f}"]
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
