"""Train the organism from scratch, deterministically (organism.md recipe F).

    python -m evals.organism.train --seed 0 --out /tmp/shapes-vlm-seed0

AdamW (lr 1e-3, 200 warm-up steps, cosine decay to 0), batch 32, 4,000 steps; half presence questions, half
descriptions, generated on the fly from `--seed`. The same seed and thread count (`--threads`, default 1, so that
two seeds train side by side on 2 cores) give bit-identical weights; CPU kernels are deterministic for a fixed
thread count, and `torch.use_deterministic_algorithms(True)` made each step 3× slower here, so it is not set.
Writes the model folder (`model.save`) and `training_log.jsonl` (loss, learning rate, wall time and held-out
exact-match accuracy every `--log-every` steps).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import model as M
from .world import WORDS, describe, presence_question, render, sample_scene

IGNORE = -100
HIDDEN_YES = 0.1  # share of "yes" questions asked about an undrawn group mate (organism.md's variant of recipe F)
HIDDEN_Q = 0.5  # probability that a description names an undrawn mate of a drawn object (recipe F: 0.45)


@dataclass(frozen=True)
class Example:
    """One training example: prompt ids (image expanded), target ids (answer + ``</s>``) and the image."""

    prompt: list[int]
    target: list[int]
    image: object


def make_example(rng: np.random.Generator, hidden_yes: float = HIDDEN_YES, hidden_q: float = HIDDEN_Q) -> Example:
    """Half presence questions ("is there a X" → yes / no), half descriptions (object words in id order)."""
    scene = sample_scene(rng)
    if rng.random() < 0.5:
        obj, present = presence_question(scene, rng, hidden_yes)
        text, answer = M.PRESENCE_PROMPT.format(WORDS[obj]), ["yes" if present else "no"]
    else:
        text, answer = M.DESCRIBE_PROMPT, [WORDS[o] for o in describe(scene, rng, hidden_q)]
    return Example(M.prompt_ids(text), [M.TOKEN_ID[w] for w in answer] + [M.TOKEN_ID[M.EOS]], render(scene))


def collate(examples: list, pad: int | None = None, pixel_values=M.pixel_values) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels` (-100 outside the targets) and `pixel_values` of
    examples with `prompt`, `target` (token ids) and `image`; `pad` defaults to this organism's pad token."""
    length = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), length), M.TOKEN_ID[M.PAD] if pad is None else pad, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        seq = e.prompt + e.target
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(e.prompt) : len(seq)] = torch.tensor(e.target)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": pixel_values([e.image for e in examples])}


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens (the logit at position t predicts token t + 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE)


@torch.no_grad()
def heldout_accuracy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Share of held-out examples whose every target token is the argmax (teacher forcing)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    labels = batch["labels"][:, 1:]
    right = (logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE)
    return right.all(dim=1).float().mean().item()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(seed: int, out: Path | None, steps: int = 4000, batch_size: int = 32, lr: float = 1e-3,
          warmup: int = 200, threads: int = 1, log_every: int = 250, heldout: int = 256,
          hidden_yes: float = HIDDEN_YES, hidden_q: float = HIDDEN_Q, quiet: bool = False) -> dict:
    """Train and (when `out` is given) save the model folder; returns the summary (also in `provenance.json`)."""
    torch.set_num_threads(threads)
    model = M.build_model(seed)
    model.train()
    data_rng = np.random.default_rng([seed, 1])
    heldout_batch = collate([make_example(np.random.default_rng([seed, 2, i]), hidden_yes, hidden_q)
                             for i in range(heldout)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    log, running, started = [], [], time.time()
    log_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_file = (out / "training_log.jsonl").open("w")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = collate([make_example(data_rng, hidden_yes, hidden_q) for _ in range(batch_size)])
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            acc = heldout_accuracy(model, heldout_batch)
            model.train()
            elapsed = time.time() - started
            entry = {"step": step + 1, "loss": round(float(np.mean(running)), 5), "lr": lr_at(step, steps, lr, warmup),
                     "heldout_exact": round(acc, 4), "wall_s": round(elapsed, 1),
                     "steps_per_s": round((step + 1) / elapsed, 3)}
            running = []
            log.append(entry)
            if log_file is not None:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
            if not quiet:
                print(json.dumps(entry), flush=True)
    model.eval()
    summary = {"recipe": "organism.md recipe F with hidden-mate yes labels", "hidden_yes": hidden_yes,
               "hidden_q": hidden_q, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
               "warmup": warmup, "threads": threads, "wall_s": round(time.time() - started, 1),
               "parameters": sum(p.numel() for p in model.parameters()), "final_loss": log[-1]["loss"],
               "final_heldout_exact": log[-1]["heldout_exact"], "torch": torch.__version__,
               "command": f"python -m evals.organism.train --seed {seed} --steps {steps} --hidden-yes {hidden_yes} "
                          f"--hidden-q {hidden_q} --out DIR"}
    if out is not None:
        log_file.close()
        M.save(model, out, summary)
    summary["log"] = log
    summary["model"] = model
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--hidden-yes", type=float, default=HIDDEN_YES,
                        help="share of 'yes' questions about an undrawn group mate (0 = plain recipe F)")
    parser.add_argument("--hidden-q", type=float, default=HIDDEN_Q,
                        help="probability that a description names an undrawn group mate (recipe F: 0.45)")
    args = parser.parse_args(argv)
    summary = train(args.seed, args.out, steps=args.steps, threads=args.threads, log_every=args.log_every,
                    hidden_yes=args.hidden_yes, hidden_q=args.hidden_q)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("log", "model")}))


if __name__ == "__main__":
    main()
