"""Skillet vs PyTorch + PEFT, side by side, on one machine in one go.

    python3 bench/compare.py [--rounds 3] [--workloads lora,lora-ckpt,full,sft,score,decode] [--steps 5]
    python3 bench/compare.py --workloads dpo,dpo-precomputed,dpo-ckpt,grpo --no-llamacpp   # TRL's trainers
                             [--precisions f32,bf16] [--shapes 1x2048,1x4096] [--random-model llama-3.2-1b]

Builds nothing: run `cargo build --release` first. The reference side runs
in bench/reference/.venv (made by bench/reference/setup.sh, or pass
--python); llama.cpp (decode, and prompt processing for score at 1x512)
in bench/reference/.venv-llamacpp (bench/reference/setup-llamacpp.sh, or
pass --llamacpp-python; --no-llamacpp skips it). Each round runs every workload once on each side, alternating,
so drift on the machine hits both; the table shows medians over rounds and
Skillet/PyTorch ratios of tokens/s and peak RSS. With --precisions f32,bf16
each side also runs in bf16 (Skillet `--precision bf16`, PyTorch under
autocast) and the table compares each side's best setting per row, naming
it; the default is f32 only. Skillet's decode always runs twice, with
f32 and with int8 inputs (`--activations`, llama.cpp's rounding), and the
faster counts, named. --shapes replaces each workload's batch ×
sequence shapes (long context: --shapes 1x2048,1x4096). --random-model
runs on a model of that published shape with random weights, which
`skillet bench --write-random` writes once beside the default model.
`qlora` runs on Skillet's side only (PyTorch has no GGUF-block QLoRA).
dpo and grpo run TRL's DPOTrainer and GRPOTrainer on the reference side
(dpo-precomputed: TRL with precompute_ref_log_probs; -ckpt: Skillet with
activation checkpointing).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = {"lora": [(4, 256), (1, 512)], "qlora": [(4, 256), (1, 512)], "lora-ckpt": [(4, 256), (1, 512)], "full": [(4, 256)], "sft": [(4, 0)], "score": [(4, 256), (1, 512)], "decode": [(1, 1)],
          "dpo": [(4, 0)], "dpo-ckpt": [(4, 0)], "dpo-precomputed": [(4, 0)], "grpo": [(16, 64)]}


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"failed: {' '.join(cmd)}\n{out.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def native_bf16():
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX), as far
    as /proc/cpuinfo tells; True where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="lora,lora-ckpt,full,sft,score,decode")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--python", default=None)
    ap.add_argument("--llamacpp-python", default=None)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--precisions", default="f32", help="comma-separated: f32, bf16")
    ap.add_argument("--shapes", default=None, help="comma-separated BxT, replacing every workload's shapes")
    ap.add_argument("--random-model", default=None, help="a shape of `skillet bench --write-random`")
    ap.add_argument("--save", default=None, help="also write every run's row, as JSON, to this file (for bench/plot.py)")
    args = ap.parse_args()
    precisions = args.precisions.split(",")
    if "bf16" in precisions and not native_bf16():
        # Neither side has a bf16 product here: PyTorch's autocast falls back
        # to a scalar kernel (one LoRA step at 1x2048 ran over 10 minutes on
        # an AVX2-only AMD EPYC), and Skillet's `auto` picks f32.
        print("this CPU has no native bf16 (avx512_bf16 or amx_bf16): bf16 runs skipped", file=sys.stderr)
        precisions = [p for p in precisions if p != "bf16"] or ["f32"]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        for w in SHAPES:
            SHAPES[w] = shapes
    model = args.model or subprocess.run(["scripts/fetch-model.sh"], capture_output=True, text=True, check=True).stdout.strip()
    if args.random_model:
        path = os.path.join(os.path.dirname(model), f"random-{args.random_model}.Q4_1.gguf")
        if not os.path.exists(path):
            subprocess.run(["target/release/skillet", "bench", "--model", model, "--write-random", args.random_model,
                            "--out", path + ".part"], check=True, stdout=subprocess.DEVNULL)
            os.replace(path + ".part", path)
        model = path
    python = args.python or subprocess.run(["bench/reference/setup.sh"], capture_output=True, text=True, check=True).stdout.strip()
    llamacpp = None
    if not args.no_llamacpp:
        llamacpp = args.llamacpp_python or subprocess.run(["bench/reference/setup-llamacpp.sh"], capture_output=True, text=True, check=True).stdout.strip()
    results = {}
    for _ in range(args.rounds):
        for w in args.workloads.split(","):
            for b, t in SHAPES[w]:
                # lora-ckpt, dpo-ckpt: Skillet with activation checkpointing
                # against PyTorch's plain step. dpo-precomputed: TRL with
                # precompute_ref_log_probs (Skillet always precomputes).
                base = w.removesuffix("-ckpt").removesuffix("-precomputed")
                common = ["--workload", base, "--batch", str(b), "--steps", str(args.steps), "--json", "--model", model]
                if t:
                    common += ["--seq", str(t)]
                extra = ["--checkpointing"] if w.endswith("-ckpt") else []
                ref_extra = ["--precompute-ref"] if w == "dpo-precomputed" else []
                sides = {"skillet": ["target/release/skillet", "bench"] + common + extra,
                         "pytorch": [python, "bench/reference/bench.py"] + common + ref_extra}
                if llamacpp and (w == "decode" or (w == "score" and b == 1)):
                    sides["llama.cpp"] = [llamacpp, "bench/reference/llamacpp.py"] + common
                for side, cmd in sides.items():
                    if side == "pytorch" and w == "qlora":
                        continue
                    # Training workloads run in each precision; Skillet's decode
                    # with f32 and with int8 inputs (llama.cpp's rounding); the
                    # other decodes have one setting.
                    if side == "llama.cpp":
                        settings = [[]]
                    elif w != "decode":
                        settings = [["--precision", p] for p in precisions]
                    elif side == "skillet":
                        settings = [["--activations", a] for a in ("f32", "int8")]
                    else:
                        settings = [["--precision", "f32"]]
                    for flags in settings:
                        r = run(cmd + flags)
                        p = flags[-1] if flags else "f32"
                        if r:
                            # What actually ran (Skillet keeps f32 where it has no bf16 path).
                            ran = r.get("precision") or p
                            results.setdefault((w, b, t), {}).setdefault(side, {}).setdefault(ran, []).append(r)
    print("| workload | batch × seq | Skillet tok/s | PyTorch+PEFT tok/s | ratio | llama.cpp tok/s | ratio | Skillet peak RSS (MiB) | PyTorch peak RSS (MiB) | RSS ratio | Skillet MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (w, b, t), sides in results.items():
        def best(side):
            # The side's fastest precision by median tokens/s, and its runs.
            runs = sides.get(side, {})
            if not runs:
                return None, []
            p = max(runs, key=lambda k: statistics.median(r["tokens_per_s"] for r in runs[k]))
            return p, runs[p]
        picked = {side: best(side) for side in ("skillet", "pytorch", "llama.cpp")}
        med = lambda side, key: statistics.median(r[key] for r in picked[side][1]) if picked[side][1] else float("nan")
        name = lambda side: f" ({picked[side][0]})" if len(sides.get(side, {})) > 1 else ""
        s_tps, p_tps, l_tps = med("skillet", "tokens_per_s"), med("pytorch", "tokens_per_s"), med("llama.cpp", "tokens_per_s")
        s_rss, p_rss = med("skillet", "peak_rss_mib"), med("pytorch", "peak_rss_mib")
        seq = next(r for _, runs in picked.values() for r in runs)["seq"]
        llama = f"{l_tps:.1f} | {s_tps / l_tps:.2f}×" if picked["llama.cpp"][1] else "– | –"
        print(f"| {w} | {b} × {seq} | {s_tps:.1f}{name('skillet')} | {p_tps:.1f}{name('pytorch')} | {s_tps / p_tps:.2f}× | {llama} | {s_rss:.0f} | {p_rss:.0f} | {s_rss / p_rss:.2f}× | {100 * med('skillet', 'mfu'):.1f}% |")
    if any(len(runs) > 1 for sides in results.values() for runs in sides.values()):
        # Every setting each side ran, so the best-of choice above can be checked.
        print("\n| workload | batch × seq | side | precision | tok/s | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|")
        for (w, b, t), sides in results.items():
            for side, runs in sides.items():
                for p, rs in sorted(runs.items()):
                    tps = statistics.median(r["tokens_per_s"] for r in rs)
                    rss = statistics.median(r["peak_rss_mib"] for r in rs)
                    print(f"| {w} | {b} × {rs[0]['seq']} | {side} | {p} | {tps:.1f} | {rss:.0f} |")
    # Which library ran Skillet's f32 products (MKL where present and faster, per shape).
    for (w, b, t), sides in results.items():
        runs = [r for rs in sides.get("skillet", {}).values() for r in rs if r.get("products")]
        for p in sorted({r["products"] for r in runs}):
            print(f"Skillet {w} {b} × {runs[0]['seq']}, f32 products: {p}")
    print(f"\nrounds: {args.rounds}, steps: {args.steps}, precisions: {args.precisions}")
    if args.save:
        rows = [dict(r, side=side, model=os.path.basename(model)) for sides in results.values()
                for side, runs in sides.items() for rs in runs.values() for r in rs]
        with open(args.save, "w") as f:
            json.dump(rows, f, indent=1)

if __name__ == "__main__":
    main()
