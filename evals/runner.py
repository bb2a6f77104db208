"""The eval runner: several methods (and `none`, the unmodified model) on one loaded model, batched generation
with the family's chat template, resumable JSONL predictions, optional sharding across processes, and a results
JSON + markdown table + PNG chart built from that JSON."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import interventions as iv

from .benchmarks.base import GenerationBenchmark, Sample
from .loading import LoadedModel
from .predictions import append_predictions, load_predictions
from .report import write_reports

RESULTS_SCHEMA = 1


@dataclass(frozen=True)
class MethodRun:
    """One column of the comparison: `none` (unmodified) or a stack of methods with their parameters."""

    label: str
    stack: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def parse_methods(methods: str, params_json: str | None = None) -> list[MethodRun]:
    """`"none,pai,pai+act"` plus `'{"pai": {"alpha": 0.5}}'` → validated runs.

    Raises:
        ValueError: unknown method, malformed JSON, parameters for a method not in the list, bad parameters.
    """
    try:
        params = json.loads(params_json) if params_json else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--params is not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ValueError('--params must be a JSON object {"method": {"parameter": value}}')
    labels = [m.strip() for m in methods.split(",") if m.strip()]
    if not labels:
        raise ValueError("--methods is empty; give e.g. none,pai")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--methods lists a method twice: {methods}")
    runs, used = [], set()
    for label in labels:
        if label == "none":
            runs.append(MethodRun("none"))
            continue
        stack = []
        for name in label.split("+"):
            iv.method_params(name, params.get(name, {}))  # validate now, before any model work
            stack.append((name, dict(params.get(name, {}))))
            used.add(name)
        runs.append(MethodRun(label, stack))
    unused = set(params) - used
    if unused:
        raise ValueError(f"--params names {sorted(unused)}, which --methods does not list")
    return runs


def _distributed() -> tuple[int, int, Any]:
    """(rank, world size, state); one process unless launched with `accelerate launch`."""
    if not _launched():
        return 0, 1, None
    state = process_state()
    return state.process_index, state.num_processes, state


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> Any:
    """accelerate's process state; on a machine without CUDA the workers use gloo on CPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_generation(loaded: LoadedModel, benchmark: GenerationBenchmark, runs: list[MethodRun], out_dir: Path,
                   batch_size: int = 1, limit: int | None = None, max_new_tokens: int | None = None,
                   seed: int = 0, progress: bool = True) -> dict[str, Any] | None:
    """Generate and score every run; return the results dict (None on non-zero ranks).

    Predictions go to `out_dir/predictions/<label>.jsonl` (`.rank<r>` shards when several processes), so a
    killed run restarted with the same arguments skips what is written and duplicates nothing.
    """
    started = time.time()
    rank, world, state = _distributed()
    samples = benchmark.samples()[:limit] if limit is not None else benchmark.samples()
    if not samples:
        raise ValueError(f"{benchmark.name}: no samples to evaluate")
    decoding = {"do_sample": False, "num_beams": 1,
                "max_new_tokens": max_new_tokens if max_new_tokens is not None else benchmark.max_new_tokens}
    mine = samples[rank::world]
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        key = run_key(loaded, benchmark, run, decoding)
        shard = out_dir / "predictions" / (f"{run.label}.jsonl" if world == 1 else f"{run.label}.rank{rank}.jsonl")
        done = load_predictions(shard, key)
        todo = [s for s in mine if s.id not in done]
        processor = loaded.processor if loaded.has_images else None  # for methods that build inputs (carve)
        handle = iv.wrap(loaded.model, run.stack, processor=processor) if run.stack else None
        try:
            _generate(loaded, todo, shard, key, decoding, batch_size, seed, progress and rank == 0, run.label)
        finally:
            if handle is not None:
                handle.unwrap()
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    result_runs = []
    for run in runs:
        key = run_key(loaded, benchmark, run, decoding)
        texts: dict[str, str] = {}
        shards = [out_dir / "predictions" / f"{run.label}.jsonl"] if world == 1 else [
            out_dir / "predictions" / f"{run.label}.rank{r}.jsonl" for r in range(world)]
        for path in shards:
            texts.update({i: r["text"] for i, r in load_predictions(path, key).items()})
        missing = [s.id for s in samples if s.id not in texts]
        if missing:
            raise RuntimeError(f"{run.label}: {len(missing)} samples have no prediction (e.g. {missing[:3]})")
        result_runs.append({"method": run.label, "stack": [{"method": n, "params": p} for n, p in run.stack],
                            "params": {n: p for n, p in run.stack}, "run_key": key,
                            "metrics": benchmark.score(samples, texts)})
    results = {
        "schema_version": RESULTS_SCHEMA,
        "benchmark": benchmark.name,
        "benchmark_version": benchmark.version,
        "data": benchmark.record(),
        "model": {"id": loaded.model_id, "family": loaded.family, "dtype": loaded.dtype},
        "decoding": decoding,
        "batch_size": batch_size,
        "seed": seed,
        "samples": {"available": len(benchmark.samples()), "evaluated": len(samples), "limit": limit},
        "processes": world,
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 2),
        "runs": result_runs,
    }
    write_reports(results, out_dir)
    return results


def run_key(loaded: LoadedModel, benchmark: GenerationBenchmark, run: MethodRun, decoding: dict) -> str:
    """Hash of everything that determines a prediction: model, benchmark prompt/version, stack, decoding."""
    payload = json.dumps({"model": loaded.model_id, "dtype": loaded.dtype, "benchmark": benchmark.name,
                          "version": benchmark.version, "prompt": benchmark.record().get("prompt"),
                          "stack": run.stack, "decoding": decoding}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _generate(loaded: LoadedModel, todo: list[Sample], path: Path, key: str, decoding: dict, batch_size: int,
              seed: int, progress: bool, label: str) -> None:
    import torch
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=label, disable=not progress, unit="sample")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        torch.manual_seed(seed)
        inputs = build_inputs(loaded, batch)
        with torch.no_grad():
            out = loaded.model.generate(**inputs, **decoding)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = _tokenizer(loaded).batch_decode(new, skip_special_tokens=True)
        append_predictions(path, ({"id": s.id, "run_key": key, "text": t.strip()} for s, t in zip(batch, texts)))
        bar.update(len(batch))
    bar.close()


def _tokenizer(loaded: LoadedModel) -> Any:
    return getattr(loaded.processor, "tokenizer", loaded.processor)


def build_inputs(loaded: LoadedModel, batch: list[Sample]) -> dict[str, Any]:
    """Left-padded model inputs through the family's chat template (image first, then the question)."""
    from PIL import Image

    tokenizer = _tokenizer(loaded)
    tokenizer.padding_side = "left"
    if not loaded.has_images:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": s.question}], tokenize=False,
                                               add_generation_prompt=True) for s in batch]
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    texts, images = [], []
    for s in batch:
        if s.image is None or not Path(s.image).is_file():
            raise ValueError(f"sample {s.id}: image file {s.image} not found")
        content = [{"type": "image"}, {"type": "text", "text": s.question}]
        texts.append(loaded.processor.apply_chat_template([{"role": "user", "content": content}],
                                                          add_generation_prompt=True, tokenize=False))
        with Image.open(s.image) as img:
            images.append(img.convert("RGB"))
    if iv.family(loaded.model).nests_images:  # these processors take one list of images per prompt
        images = [[img] for img in images]
    inputs = loaded.processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: v.to(loaded.model.device) for k, v in inputs.items()}


def versions() -> dict[str, str]:
    """Versions of everything that shapes a number, plus the git commit when run from a checkout."""
    import torch
    import transformers

    found = {"interventions": iv.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
             "python": platform.python_version()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent)
        if commit.returncode == 0:
            found["git"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def run_lm(loaded: LoadedModel, tasks: list[str], runs: list[MethodRun], out_dir: Path, limit: int | None = None,
           include_path: str | None = None, seed: int = 0) -> dict[str, Any]:
    """lm-eval `tasks` for every run on the loaded model; a finished run is kept in `out_dir/lm_runs/` and not
    recomputed when the command is repeated."""
    from .benchmarks.lm import evaluate_lm

    if loaded.has_images:
        raise ValueError(f"eval lm runs text-only tasks; {loaded.model_id} is a {loaded.family} VLM")
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    result_runs = []
    for run in runs:
        key = hashlib.sha256(json.dumps({"model": loaded.model_id, "tasks": tasks, "limit": limit, "seed": seed,
                                         "stack": run.stack}, sort_keys=True).encode()).hexdigest()[:16]
        cache = out_dir / "lm_runs" / f"{run.label}.{key}.json"
        if cache.exists():
            result_runs.append(json.loads(cache.read_text()))
            continue
        handle = iv.wrap(loaded.model, run.stack) if run.stack else None
        try:
            out = evaluate_lm(loaded.model, _tokenizer(loaded), tasks, out_dir, limit, include_path, seed)
        finally:
            if handle is not None:
                handle.unwrap()
        entry = {"method": run.label, "stack": [{"method": n, "params": p} for n, p in run.stack],
                 "params": {n: p for n, p in run.stack}, "run_key": key, "metrics": out["metrics"],
                 "lm_eval_versions": out["versions"], "n_samples": out["n-samples"]}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(entry, sort_keys=True))
        result_runs.append(entry)
    results = {
        "schema_version": RESULTS_SCHEMA,
        "benchmark": "lm",
        "tasks": tasks,
        "model": {"id": loaded.model_id, "family": loaded.family, "dtype": loaded.dtype},
        "decoding": {"protocol": "lm-eval loglikelihood / generate_until as each task defines", "batch_size": 1},
        "seed": seed,
        "samples": {"limit": limit, "evaluated": limit},
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 2),
        "runs": result_runs,
    }
    write_reports(results, out_dir)
    return results
