"""Wall-clock overhead of ACT on the real SmolLM2-135M-Instruct against the unmodified model, in one run.

Prints prefill and 32-token greedy generation times for: the unmodified model, ACT wrapped at its neutral
strength (beta = 1: pure dispatch cost), and ACT at the defaults (all heads of layers 2..28). CPU, 2 threads.

    python benchmarks/act_overhead_smollm2.py
"""

from __future__ import annotations

import time

import torch

import interventions as iv
from evals.smollm2 import load_smollm2


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def generate():
        return model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)

    def prefill():
        return model(**inputs)

    rows = []
    with torch.no_grad():
        for label, stack in [("unmodified", None), ("act beta=1 (neutral)", {"beta": 1.0}), ("act defaults", {})]:
            handle = iv.wrap(model, "act", **stack) if stack is not None else None
            try:
                rows.append((label, timed(prefill, 5), timed(generate, 3)))
            finally:
                if handle is not None:
                    handle.unwrap()
    base_prefill, base_generate = rows[0][1], rows[0][2]
    print(f"prompt {inputs['input_ids'].shape[1]} tokens, torch {torch.__version__}, threads 2")
    print("| config | prefill ms | ratio | generate 32 tok s | ratio |")
    print("|---|---|---|---|---|")
    for label, p, g in rows:
        print(f"| {label} | {p * 1e3:.1f} | {p / base_prefill:.2f} | {g:.2f} | {g / base_generate:.2f} |")


if __name__ == "__main__":
    main()
