"""Writes prompt-only data for RL (GRPO) from the bundled example: each
line is the conversation without its assistant turn, plus the expected
one-line JSON as `answer` for the exact_match reward. Training prompts are
the second half of train.jsonl (the first half makes the preference
pairs); held-out prompts are all of valid.jsonl, the examples the SFT
demo is measured on, so GRPO's "before" is where SFT left off.

    python3 examples/contacts/make_prompts.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    for src, dst, rows in [("train.jsonl", "prompts_train.jsonl", slice(120, 240)),
                           ("valid.jsonl", "prompts_valid.jsonl", slice(0, 60))]:
        lines = [json.loads(l) for l in open(os.path.join(HERE, src), encoding="utf-8")][rows]
        with open(os.path.join(HERE, dst), "w", encoding="utf-8") as f:
            for r in lines:
                prompt, answer = r["messages"][:-1], r["messages"][-1]["content"]
                f.write(json.dumps({"messages": prompt, "answer": answer}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
