"""Loads a Hugging Face folder that Skillet wrote (the `model/` of a full
fine-tuning run, `skillet merge`, `skillet convert`, `skillet export
--format hf`) with transformers, unchanged, and compares it with Skillet's
own numbers on the same text.

    python bench/reference/check_hf_model.py MODEL_DIR TEXT_FILE SKILLET_SCORE_JSON

SKILLET_SCORE_JSON is the output of
`skillet score --model MODEL_DIR --file TEXT_FILE --json`. Checks that
transformers' tokenizer gives Skillet's token count, that the chat template
renders, and compares mean losses and argmax; exits 1 if the losses differ
by more than 1e-4 relative or the token counts differ.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, text_file, score_file = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok(open(text_file, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    loss = -logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean().item()
    skillet = json.load(open(score_file))
    agree = sum(a == b for a, b in zip(logits.argmax(-1).tolist(), skillet["argmax"])) / len(ids)
    rel = abs(loss - skillet["mean_loss"]) / loss
    print(f"{model.config.architectures[0]}, {sum(p.numel() for p in model.parameters())} parameters; "
          f"chat prompt {prompt!r}")
    print(f"tokens: transformers {len(ids)}, Skillet {skillet['tokens']}")
    print(f"transformers mean loss {loss:.7f}, Skillet {skillet['mean_loss']:.7f}, "
          f"relative difference {rel:.2e}, argmax agreement {agree:.3f}")
    sys.exit(0 if rel < 1e-4 and len(ids) == skillet["tokens"] else 1)


if __name__ == "__main__":
    main()
