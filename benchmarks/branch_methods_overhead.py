"""Time and peak-memory overhead of the methods with a second stream (`vhr`, `pai` with `use_cfg`, `pag`) against
the unmodified model, in one run, on CPU.

Model: a random-initialised LLaVA whose language model has SmolLM2-135M's shape (30 layers, hidden 576, 9 query /
3 KV heads, vocabulary 49152) and a 2-layer CLIP tower giving 576 image tokens, i.e. LLaVA-1.5's prompt layout:
BOS + 12 text tokens + 576 image tokens + 20 text tokens. (No real VLM weights are reachable offline; timings do
not depend on the weights.) Per config: prefill (one forward of the prompt, logits of every position) and a
16-token greedy generation. Time: the minimum over `--repeats` rounds that visit the configs in turn (a shared
machine's load spikes hit every config alike). Memory: in a fresh process per config and call, after one warm-up
call and `malloc_trim`, the peak resident memory the call adds over the memory before it (Linux VmHWM, reset
through /proc/self/clear_refs). `passes`: model
passes per step (the bound for time and memory is passes × 1.10 of the unmodified model).

    python benchmarks/branch_methods_overhead.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import re
import time
from collections.abc import Callable

import torch
import transformers

import interventions as iv

IMAGE_ID = 49151
#: (label, stack or None, model passes per step)
CONFIGS = [
    ("unmodified", None, 1),
    ("vhr alpha=1 (neutral)", [("vhr", {"alpha": 1.0})], 1),
    ("vhr alpha=2, layers {1} ∪ last 14", [("vhr", {"alpha": 2.0})], 2),
    ("pai alpha=0.2 (attention edit only)", [("pai", {"alpha": 0.2})], 1),
    ("pai alpha=0.2, use_cfg, gamma=1.1", [("pai", {"alpha": 0.2, "use_cfg": True, "gamma": 1.1})], 2),
    ("pag w=0 (neutral)", [("pag", {"heads": [[10, 0]], "w": 0.0})], 1),
    ("pag w=1, u=0.5, 9 heads", [("pag", {"heads": [[layer, head] for layer in (8, 12, 16) for head in (0, 4, 8)],
                                          "w": 1.0, "u": 0.5})], 2),
]


def build_model() -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=96, patch_size=4)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)
    model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval()


def make_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(16, 49000, (12,), generator=generator).tolist()
    after = torch.randint(16, 49000, (20,), generator=generator).tolist()
    ids = [1, *before, *[IMAGE_ID] * 576, *after]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(1, 3, 96, 96, generator=generator)}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_memory(index: int, generate: bool, threads: int) -> int:
    """Bytes that a prefill (or generation) adds at its peak, after a warm-up call, in this fresh process."""
    torch.set_num_threads(threads)
    model, inputs = build_model(), make_inputs()
    _, stack, _ = CONFIGS[index]
    if stack is not None:
        iv.wrap(model, stack)
    with torch.no_grad():
        call = (lambda: _generate(model, inputs)) if generate else (lambda: model(**inputs))
        call()  # one-time allocations stay out of the measurement
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next call's growth shows
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _status("VmRSS")
        call()
    return _status("VmHWM") - before


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, inputs = build_model(), make_inputs()
    times = {index: ([], []) for index in range(len(CONFIGS))}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            for index, (_, stack, _) in enumerate(CONFIGS):
                handle = iv.wrap(model, stack) if stack is not None else None
                try:
                    times[index][0].append(timed(lambda: model(**inputs)))
                    times[index][1].append(timed(lambda: _generate(model, inputs)))
                finally:
                    if handle is not None:
                        handle.unwrap()
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        jobs = [(index, generate, args.threads) for index in range(len(CONFIGS)) for generate in (False, True)]
        memory = dict(zip([job[:2] for job in jobs], pool.starmap(peak_memory, jobs)))
    rows = [(label, passes, min(times[i][0][1:]), memory[i, False], min(times[i][1][1:]), memory[i, True])
            for i, (label, _, passes) in enumerate(CONFIGS)]
    _, _, base_p, base_pm, base_g, base_gm = rows[0]
    print(f"prompt {inputs['input_ids'].shape[1]} tokens (576 image), 16 new tokens; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.threads} thread(s), min of {args.repeats}")
    print("| config | passes | prefill ms | ratio | peak MB | ratio | generate s | ratio | peak MB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, passes, p, pm, g, gm in rows:
        print(f"| {label} | {passes} | {p * 1e3:.0f} | {p / base_p:.2f} | {pm / 2**20:.0f} | {pm / base_pm:.2f} "
              f"| {g:.2f} | {g / base_g:.2f} | {gm / 2**20:.0f} | {gm / base_gm:.2f} |")


if __name__ == "__main__":
    main()
