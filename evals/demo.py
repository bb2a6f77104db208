"""The main job on the embedded default (for now SmolLM2-135M-Instruct): wrap it with ACT and show, for a few
prompts, the unmodified and the ACT generation and the attention sinks ACT found."""

from __future__ import annotations

from collections import Counter

import torch

from interventions.api import wrap

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Is a tomato a fruit or a vegetable? Answer in one sentence.",
)


def run_demo(max_new_tokens: int = 24, beta: float = 0.4, threshold: float = 0.1) -> list[dict]:
    """Generate greedily with and without ACT; return one record per prompt (also printed)."""
    from .smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    records = []
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        start = inputs["input_ids"].shape[1]
        with torch.no_grad():
            plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            handle = wrap(model, "act", beta=beta, threshold=threshold)
            try:
                act = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                detected = handle.methods[0].sinks(calibrated=False)
                calibrated = handle.methods[0].sinks(calibrated=True)
            finally:
                handle.unwrap()
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
        record = {
            "prompt": prompt,
            "plain": tokenizer.decode(plain[0, start:], skip_special_tokens=True),
            "act": tokenizer.decode(act[0, start:], skip_special_tokens=True),
            "kept_sinks": _count_heads(detected, calibrated, tokens, kept=True),
            "calibrated_sinks": _count_heads(detected, calibrated, tokens, kept=False),
        }
        records.append(record)
        print(f"\nprompt:     {prompt}\nunmodified: {record['plain']!r}\nACT:        {record['act']!r}")
        print("first sink kept (position 'token': heads):", _fmt(record["kept_sinks"]))
        print("sinks scaled by beta (position 'token': heads):", _fmt(record["calibrated_sinks"]))
    return records


def _count_heads(detected: dict, calibrated: dict, tokens: list[str], kept: bool) -> dict[str, int]:
    """How many (layer, head) pairs flag each prompt position, as `"pos 'token'" -> count`."""
    counts: Counter[int] = Counter()
    for layer, found in detected.items():
        flags = found[0] & ~calibrated[layer][0] if kept else calibrated[layer][0]
        for pos in flags.nonzero()[:, 1].tolist():
            counts[pos] += 1
    return {f"{pos} {tokens[pos]!r}": n for pos, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def _fmt(counts: dict[str, int], top: int = 6) -> str:
    return ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:top]) or "none"
