"""Times `skillet eval --generate` on 100 chat examples (the bundled
example's 60 held-out ones and the first 40 training ones, base model, at
most 64 new tokens): the answers generated one at a time
(--generate-batch 1, what eval did before continuous batching) against the
default batched engine, and checks the answers are identical.

    python3 bench/eval_generate.py [--binary target/release/skillet] [--batch 16] [--json]

--reference BINARY also times an older skillet binary that has no
--generate-batch (its one-prompt-at-a-time loop) and compares its answers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/skillet"))
    ap.add_argument("--reference", help="an older skillet binary (one answer at a time)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    model = subprocess.run([os.path.join(ROOT, "scripts/fetch-model.sh")], check=True,
                           capture_output=True, text=True).stdout.strip()
    ex = os.path.join(ROOT, "examples/contacts")
    lines = open(os.path.join(ex, "valid.jsonl")).read().splitlines()
    lines += open(os.path.join(ex, "train.jsonl")).read().splitlines()[:40]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        data = f.name
    base = ["eval", "--model", model, "--data", data, "--generate", "--max-new-tokens", "64", "--json"]
    rows = {}
    for name, cmd in [
        ("one at a time", [a.binary] + base + ["--generate-batch", "1"]),
        (f"batched ({a.batch})", [a.binary] + base + ["--generate-batch", str(a.batch)]),
    ] + ([("reference binary", [a.reference] + base)] if a.reference else []):
        secs, out = run(cmd)
        rows[name] = (secs, [s["generated"] for s in out["exact_match"]["samples"]])
    os.unlink(data)
    one = rows["one at a time"]
    result = {
        "examples": len(one[1]),
        "seconds": {k: round(v[0], 2) for k, v in rows.items()},
        "speedup": round(one[0] / rows[f"batched ({a.batch})"][0], 2),
        "identical_answers": all(v[1] == one[1] for v in rows.values()),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
    }
    if a.reference:
        result["speedup_vs_reference"] = round(rows["reference binary"][0] / rows[f"batched ({a.batch})"][0], 2)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:22} {v}")
    if not result["identical_answers"]:
        for name, (_, answers) in rows.items():
            diff = [i for i, (x, y) in enumerate(zip(answers, one[1])) if x != y]
            if diff:
                print(f"{name}: {len(diff)} answers differ, first at {diff[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
