"""The dpo and grpo workloads of bench/reference/bench.py: TRL's own
DPOTrainer and GRPOTrainer (the trainers users run) on the model bench.py
loaded, with the LoRA of the other workloads (r=8, alpha=16 on q,k,v,o, no
dropout), AdamW at a constant 1e-4 and clipping at 1.0, as `skillet bench`
runs them. A step is timed from the trainer's step-begin to its step-end
callback: for DPO the policy forward and backward (and, unless
--precompute-ref, the reference forward with the adapter off, TRL's
default), for GRPO sampling, scoring and the update.

dpo: --batch pairs per step from --pairs (OpenAI's shape, as the bundled
pairs, handed to TRL in its conversational form); tokens are both sides'
prompt and completion tokens (the attention mask's sum).
grpo: --batch completions per step, --generations per prompt of
--prompts, every completion exactly --seq tokens (min_new_tokens), scored
by a json_valid rule; TRL's defaults otherwise (beta 0, dapo loss, one
iteration, generation with transformers, no vLLM); tokens are completion
tokens.
"""

import json
import tempfile
import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.started = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)


def dequantized(model):
    """The model transformers loaded from the GGUF holds float32 weights but
    keeps the GGUF tag, which the Trainer refuses to train; drop the tag."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.is_quantized = False
    except AttributeError:
        pass
    return model


def lora():
    from peft import LoraConfig
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def common(args, out):
    return dict(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=args.precision == "bf16",
                dataloader_num_workers=0, disable_tqdm=True, seed=0)


def read_jsonl(path):
    return [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]


def run_dpo(args, model, tok):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"], "rejected": r["non_preferred_output"]}
            for r in read_jsonl(args.pairs)]
    tokens = []

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(**common(args, out), beta=0.1, loss_type=["sigmoid"], max_length=1024,
                        precompute_ref_log_probs=args.precompute_ref)
        trainer = Counting(model=dequantized(model), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                           peft_config=lora(), callbacks=[timer])
        trainer.train()
    lens = [len(x) for x in trainer.train_dataset["prompt_ids"]]
    sides = [len(x) for x in trainer.train_dataset["chosen_ids"]] + [len(x) for x in trainer.train_dataset["rejected_ids"]]
    seq = (2 * sum(lens) + sum(sides)) // len(sides)
    return timer.times[args.warmup:], tokens[args.warmup:], seq


def run_grpo(args, model, tok):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def json_valid(completions, **kwargs):
        out = []
        for c in completions:
            text = c[0]["content"] if isinstance(c, list) else c
            try:
                json.loads(text.strip())
                out.append(1.0)
            except ValueError:
                out.append(0.0)
        return out

    rows = [{"prompt": r["messages"]} for r in read_jsonl(args.prompts)]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(**common(args, out), num_generations=args.generations, max_completion_length=args.seq,
                         generation_kwargs={"min_new_tokens": args.seq}, temperature=1.0, beta=0.0,
                         shuffle_dataset=False)
        trainer = GRPOTrainer(model=dequantized(model), reward_funcs=json_valid, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, peft_config=lora(), callbacks=[timer])
        trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    if any(abs(l - args.seq) > 1e-6 for l in lengths):
        raise SystemExit(f"completions were not all {args.seq} tokens: mean lengths {lengths}")
    times = timer.times[args.warmup:]
    return times, [args.batch * args.seq] * len(times), args.seq
