"""llama.cpp (through llama-cpp-python, which builds it from source) on
the same GGUF, printing the same JSON row as `skillet bench`. Workloads:
decode (batch-1 greedy, 128 new tokens after the same prompt, prompt time
excluded) and score (prompt processing of --seq random tokens).

    python bench/reference/llamacpp.py --model MODEL.gguf --workload decode --json
"""

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", default="decode", choices=["decode", "score"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=1024, n_batch=512, verbose=False)
    rates = []
    if args.workload == "decode":
        prompt = llm.tokenize(b"Tell me a story about a dragon.", add_bos=False, special=False)
        for i in range(1 + args.steps):
            llm.reset()
            llm.eval(prompt)
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            start = time.perf_counter()
            for _ in range(128):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if i:
                rates.append(128 / (time.perf_counter() - start))
        batch, seq = 1, 1
    else:
        rng = np.random.default_rng(0)
        ids = [int(x) for x in rng.integers(0, llm.n_vocab(), args.seq)]
        for i in range(1 + args.steps):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            if i:
                rates.append(args.seq / (time.perf_counter() - start))
        batch, seq = 1, args.seq
    row = {"workload": args.workload, "batch": batch, "seq": seq, "tokens_per_s": statistics.median(rates),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "mfu": 0.0}
    print(json.dumps(row) if args.json else row)


if __name__ == "__main__":
    main()
