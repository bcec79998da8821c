"""Generates preference pairs for the bundled example, in OpenAI's DPO
shape: the prompt and preferred answer of each example in train.jsonl and
valid.jsonl (the exact one-line JSON), and a rejected answer of the kinds a
small model gives before tuning: prose instead of JSON, extra text around
the JSON, a wrong age, or a missing field. Deterministic (fixed seed).

    python3 examples/contacts/make_pairs.py
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def rejected(rng, answer):
    a = json.loads(answer)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{a['name']} is {a['age']} years old and lives in {a['city']}."
    if kind == 1:
        return f"Here is the JSON:\n```json\n{answer}\n```"
    if kind == 2:
        return json.dumps({"name": a["name"], "age": a["age"] + rng.choice([-2, -1, 1, 2]), "city": a["city"]})
    return json.dumps({"name": a["name"], "city": a["city"]})


def main():
    rng = random.Random(20261122)
    for src, dst, n in [("train.jsonl", "pairs_train.jsonl", 120), ("valid.jsonl", "pairs_valid.jsonl", 30)]:
        rows = [json.loads(l) for l in open(os.path.join(HERE, src), encoding="utf-8")][:n]
        with open(os.path.join(HERE, dst), "w", encoding="utf-8") as f:
            for r in rows:
                prompt, answer = r["messages"][:-1], r["messages"][-1]["content"]
                pair = {
                    "input": {"messages": prompt},
                    "preferred_output": [{"role": "assistant", "content": answer}],
                    "non_preferred_output": [{"role": "assistant", "content": rejected(rng, answer)}],
                }
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
