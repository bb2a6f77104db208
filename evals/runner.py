"""The eval runner: several methods (and `none`, the unmodified model) on one loaded model, batched generation
with the family's chat template, resumable JSONL predictions, optional sharding across processes, and a results
JSON + markdown table + PNG chart built from that JSON."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import interventions as iv

from .benchmarks.base import GenerationBenchmark, Sample
from .decoding import decoding_settings
from .folder_lock import locked
from .loading import LoadedModel
from .method_specs import MethodRun, parse_methods
from .paired import attach, generation_table, lm_table
from .predictions import append_predictions, load_predictions
from .preflight import ImageFact, check_images, prompt_md5, select_samples
from .report import write_reports
from .run_keys import canonical, check_reuse, digest, model_fingerprint, store_payload

logger = logging.getLogger(__name__)

__all__ = ["GenerationPlan", "MethodRun", "ModelSpec", "execute_plan", "parse_methods", "plan_generation",
           "run_generation", "run_lm"]

RESULTS_SCHEMA = 2


@dataclass(frozen=True)
class ModelSpec:
    """How the model is loaded: the part of a run key that is about the model.

    Args:
        model_id (`str`): hub id, local path or `builtin:` name.
        dtype (`str`, *optional*, defaults to `"float32"`).
        device_map (`str`, *optional*): as given to `from_pretrained`.
        load_in_4bit, load_in_8bit (`bool`, *optional*): bitsandbytes quantisation.
    """

    model_id: str
    dtype: str = "float32"
    device_map: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelSpec:
        """The spec a `load_model` result was loaded with."""
        return cls(loaded.model_id, loaded.dtype, loaded.device_map, loaded.load_in_4bit, loaded.load_in_8bit)

    def record(self, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
        quantisation = "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None
        return {"id": self.model_id, "dtype": self.dtype, "device_map": canonical(self.device_map),
                "quantisation": quantisation, "fingerprint": fingerprint}


@dataclass
class GenerationPlan:
    """Everything a generation run will do, settled before the model loads: the samples (`--limit` per split),
    the images they read (opened once), the decoding settings, and the run key of every column."""

    benchmark: GenerationBenchmark
    runs: list[MethodRun]
    samples: list[Sample]
    images: dict[str, ImageFact]
    decoding: dict[str, Any]
    model: dict[str, Any]
    batch_size: int = 1
    limit: int | None = None
    seed: int = 0

    def payload(self, run: MethodRun) -> dict[str, Any]:
        """What the run key of `run` covers (stored beside its predictions, so a refusal can say what changed)."""
        record = self.benchmark.record()
        data = ({split: info["md5"] for split, info in record["files"].items()} if "files" in record
                else {"image_ids": digest(record.get("image_ids"))})
        payload = {"model": self.model,
                   "benchmark": {"name": self.benchmark.name, "version": self.benchmark.version,
                                 "prompt": record.get("prompt"), "data_md5": data},
                   "stack": [{"method": n, "params": p} for n, p in run.resolved],
                   "decoding": self.decoding, "seed": self.seed}
        if self.decoding.get("do_sample"):  # each batch is seeded afresh, so sampled texts depend on the batching
            payload["batch_size"] = self.batch_size
        return canonical(payload)

    def key(self, run: MethodRun) -> str:
        return digest(self.payload(run))

    @property
    def run_id(self) -> str:
        """Short hash of the whole run (every column's key, the limit), kept in `results.json`: a folder holds the
        results of one run."""
        return digest({"keys": [(r.label, self.key(r)) for r in self.runs], "limit": self.limit,
                       "benchmark": self.benchmark.name}, 8)

    @property
    def folder_id(self) -> str:
        """`run_id` without the weights fingerprint: names the default output folder, so a rerun after the weights
        changed meets its earlier predictions and is refused with what changed, instead of silently starting over."""
        def unfingerprinted(run: MethodRun) -> dict[str, Any]:
            payload = self.payload(run)
            return {**payload, "model": {**payload["model"], "fingerprint": None}}

        return digest({"runs": [(r.label, unfingerprinted(r)) for r in self.runs], "limit": self.limit}, 8)

    def set_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        self.model = {**self.model, "fingerprint": fingerprint}


def plan_generation(benchmark: GenerationBenchmark, runs: list[MethodRun], model: ModelSpec, batch_size: int = 1,
                    limit: int | None = None, max_new_tokens: int | None = None,
                    gen_kwargs: dict[str, Any] | None = None, seed: int = 0) -> GenerationPlan:
    """Settle a run without loading the model: select samples, open every image once, check the decoding.

    Raises:
        ValueError: no samples, an image path outside the images folder, a missing or unreadable image, invalid
            decoding settings.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    samples = select_samples(benchmark.samples(), limit)
    if not samples:
        raise ValueError(f"{benchmark.name}: no samples to evaluate")
    decoding = decoding_settings(benchmark.max_new_tokens, max_new_tokens, gen_kwargs)
    images = check_images(samples, benchmark.images) if getattr(benchmark, "images", None) is not None else {}
    return GenerationPlan(benchmark, runs, samples, images, decoding,
                          model.record(model_fingerprint(model.model_id)), batch_size, limit, seed)


def shard_path(out_dir: Path, run: MethodRun, rank: int = 0, world: int = 1) -> Path:
    """`out_dir/predictions/<label>.jsonl`, or `<label>.rank<r>.jsonl` when several processes share the work."""
    name = f"{run.file_stem}.jsonl" if world == 1 else f"{run.file_stem}.rank{rank}.jsonl"
    return out_dir / "predictions" / name


def check_folder(plan: GenerationPlan, out_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Refuse, before any model work, to reuse predictions of another configuration or to overwrite the results
    of another run.

    Raises:
        ValueError: what changed since the predictions were written (the configuration, or a sample's image or
            prompt), or a `results.json` of another run in `out_dir`.
    """
    wanted = {s.id: s for s in plan.samples}
    for run in plan.runs:
        path = shard_path(out_dir, run, rank, world)
        key = check_reuse(path, plan.payload(run))
        for sid, line in load_predictions(path, key).items():
            if sid in wanted:
                _check_sample(path, line, wanted[sid], plan.images)
    results = out_dir / "results.json"
    if rank == 0 and results.exists():
        try:
            earlier = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError):
            earlier = {}
        if earlier.get("run_id") != plan.run_id:
            methods = ",".join(r.get("method", "?") for r in earlier.get("runs", []))
            raise ValueError(f"{results} holds the results of another run (run {earlier.get('run_id')}, methods "
                             f"{methods or '?'}); give another --out, or leave --out out for a folder of its own")


def _check_sample(path: Path, line: dict[str, Any], sample: Sample, images: dict[str, ImageFact]) -> None:
    fact = images.get(sample.image_ref) if sample.image_ref is not None else None
    now = {"image": sample.image_ref, "image_md5": fact.md5 if fact else None, "prompt_md5": prompt_md5(sample)}
    diffs = [f"{k} {line.get(k)!r} -> {v!r}" for k, v in now.items() if line.get(k) != v]
    if diffs:
        raise ValueError(f"{path}: sample {sample.id} was predicted from another input ({'; '.join(diffs)}); "
                         f"use another --out (or delete {path.name} to recompute)")


def run_generation(loaded: LoadedModel, benchmark: GenerationBenchmark, runs: list[MethodRun], out_dir: Path,
                   batch_size: int = 1, limit: int | None = None, max_new_tokens: int | None = None,
                   seed: int = 0, progress: bool = True,
                   gen_kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Generate and score every run on an already-loaded model; return the results dict (None on non-zero ranks).

    Plans the run (`plan_generation`), locks `out_dir`, checks what is already there (`check_folder`) and runs it
    (`execute_plan`). `limit` counts per split.
    """
    started = time.time()
    plan = plan_generation(benchmark, runs, ModelSpec.of(loaded), batch_size, limit, max_new_tokens, gen_kwargs, seed)
    rank, world, _ = _distributed()
    with locked(out_dir, ".lock" if rank == 0 else f".lock.rank{rank}"):
        check_folder(plan, out_dir, rank, world)
        return execute_plan(loaded, plan, out_dir, progress, started)


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


def execute_plan(loaded: LoadedModel, plan: GenerationPlan, out_dir: Path, progress: bool = True,
                 started: float | None = None) -> dict[str, Any] | None:
    """Generate what `out_dir` does not hold yet, score every run, write the results files; return the results
    dict (None on non-zero ranks). Call under `locked(out_dir)` after `check_folder`.

    Predictions go to `out_dir/predictions/<label>.jsonl` (`.rank<r>` shards when several processes), so a killed
    run restarted with the same arguments skips what is written and duplicates nothing. `wall_time_s` counts this
    invocation from `started` plus the generation time of the predictions earlier invocations wrote.
    """
    started = time.time() if started is None else started
    rank, world, state = _distributed()
    if plan.model.get("fingerprint") is None:  # a hub model that was not cached before the load
        plan.set_fingerprint(model_fingerprint(loaded.model_id) or
                             {"revision": getattr(loaded.model.config, "_commit_hash", None)})
        check_folder(plan, out_dir, rank, world)
    mine = plan.samples[rank::world]
    earlier_s = 0.0
    for run in plan.runs:
        shard, key = shard_path(out_dir, run, rank, world), plan.key(run)
        done = load_predictions(shard, key)
        earlier_s += sum(r.get("seconds", 0.0) for r in done.values())
        todo = [s for s in mine if s.id not in done]
        store_payload(shard, plan.payload(run))
        if not todo:
            continue
        processor = loaded.processor if loaded.has_images else None  # for methods that build inputs (carve)
        handle = iv.wrap(loaded.model, run.wrap_target(), processor=processor) if run.resolved else None
        try:
            if handle is not None:
                _set_template(handle, loaded)
            _generate(loaded, plan, todo, shard, key, progress and rank == 0, run.label)
        finally:
            if handle is not None:
                handle.unwrap()
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    return _write_results(loaded, plan, out_dir, world, time.time() - started + earlier_s)


def _set_template(handle: iv.Handle, loaded: LoadedModel) -> None:
    """Tell the methods the chat template (template tokens are not question words) and the tokenizer."""
    if getattr(_tokenizer(loaded), "chat_template", None) is None:
        logger.warning("%s has no chat template on its tokenizer; token roles will not mark template tokens",
                       loaded.model_id)
        return
    handle.set_template(loaded.processor)


def _write_results(loaded: LoadedModel, plan: GenerationPlan, out_dir: Path, world: int,
                   wall_time_s: float) -> dict[str, Any]:
    result_runs, tables = [], {}
    for run in plan.runs:
        key = plan.key(run)
        texts: dict[str, str] = {}
        for r in range(world):
            texts.update({i: p["text"] for i, p in load_predictions(shard_path(out_dir, run, r, world), key).items()})
        missing = [s.id for s in plan.samples if s.id not in texts]
        if missing:
            raise RuntimeError(f"{run.label}: {len(missing)} samples have no prediction (e.g. {missing[:3]})")
        metrics = plan.benchmark.score(plan.samples, texts)
        tables[run.label] = generation_table(plan.benchmark, {s.id: texts[s.id] for s in plan.samples}, metrics)
        result_runs.append({"method": run.label, "stack": [{"method": n, "params": p} for n, p in run.stack],
                            "params": {n: p for n, p in run.stack},
                            "resolved_params": {n: p for n, p in run.resolved}, "run_key": key,
                            "metrics": metrics})
    attach(result_runs, tables)
    results = {
        "schema_version": RESULTS_SCHEMA,
        "run_id": plan.run_id,
        "benchmark": plan.benchmark.name,
        "benchmark_version": plan.benchmark.version,
        "data": plan.benchmark.record(),
        "images": {ref: {"bytes": f.bytes, "md5": f.md5} for ref, f in sorted(plan.images.items())},
        "model": {**plan.model, "family": loaded.family},
        "decoding": plan.decoding,
        "batch_size": plan.batch_size,
        "seed": plan.seed,
        "samples": {"available": len(plan.benchmark.samples()), "evaluated": len(plan.samples), "limit": plan.limit,
                    "limit_per": "split"},
        "processes": world,
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall_time_s, 2),
        "runs": result_runs,
    }
    write_reports(results, out_dir)
    return results


def _generate(loaded: LoadedModel, plan: GenerationPlan, todo: list[Sample], path: Path, key: str, progress: bool,
              label: str) -> None:
    import torch
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=label, disable=not progress, unit="sample")
    try:
        for start in range(0, len(todo), plan.batch_size):
            batch = todo[start:start + plan.batch_size]
            began = time.time()
            try:
                torch.manual_seed(plan.seed)
                inputs = build_inputs(loaded, batch)
                with torch.no_grad():
                    out = loaded.model.generate(**inputs, **plan.decoding)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:
                where = ", ".join(f"{s.id}" + (f" ({s.image_ref})" if s.image_ref else "") for s in batch[:3])
                raise RuntimeError(f"{label}: generation failed on sample(s) {where}"
                                   f"{' ...' if len(batch) > 3 else ''}: {type(e).__name__}: {e}") from e
            new = out[:, inputs["input_ids"].shape[1]:]
            texts = _tokenizer(loaded).batch_decode(new, skip_special_tokens=True)
            seconds = (time.time() - began) / len(batch)
            append_predictions(path, (_line(s, t, key, seconds, plan.images) for s, t in zip(batch, texts)))
            bar.update(len(batch))
    finally:
        bar.close()


def _line(sample: Sample, text: str, key: str, seconds: float, images: dict[str, ImageFact]) -> dict[str, Any]:
    fact = images.get(sample.image_ref) if sample.image_ref is not None else None
    return {"id": sample.id, "run_key": key, "text": text.strip(), "image": sample.image_ref,
            "image_md5": fact.md5 if fact else None, "prompt_md5": prompt_md5(sample), "seconds": round(seconds, 4)}


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


@dataclass(frozen=True)
class LmOptions:
    """lm-eval settings of `eval lm` (the run key holds all but `batch_size`, which does not change a number)."""

    limit: int | None = None
    include_path: str | None = None
    seed: int = 0
    batch_size: int = 1
    num_fewshot: int | None = None
    bootstrap_iters: int = 1000
    log_samples: bool = False
    #: task → document indices, instead of `limit` (a dev or test part of each task, for `tune`)
    docs: dict[str, list[int]] | None = None


def run_lm(loaded: LoadedModel, tasks: list[str], runs: list[MethodRun], out_dir: Path,
           options: LmOptions = LmOptions()) -> dict[str, Any]:
    """lm-eval `tasks` for every run on the loaded model, through the `interventions` lm-eval model type; a finished
    run is kept in `out_dir/lm_runs/` and not recomputed when the command is repeated (its key covers the model's
    dtype, quantisation and weights, the tasks, the resolved stack and every option but the batch size). With
    `log_samples`, every sample's requests, responses and scores go to `out_dir/lm_samples/<label>/<task>.jsonl`."""
    from .benchmarks.lm import evaluate_lm, task_manager
    from .lm_model import InterventionsLM

    if loaded.has_images:
        raise ValueError(f"eval lm runs text-only tasks; {loaded.model_id} is a {loaded.family} VLM")
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ModelSpec.of(loaded).record(model_fingerprint(loaded.model_id))  # dtype, quantisation, weights
    settings = {k: v for k, v in vars(options).items() if k != "batch_size"}
    manager = None
    result_runs = []
    for run in runs:
        key = digest({"model": model, "tasks": tasks, "stack": run.resolved, "per_sample": 1, **settings})
        cache = out_dir / "lm_runs" / f"{run.file_stem}.{key}.json"
        if cache.exists():
            result_runs.append(json.loads(cache.read_text()))
            continue
        manager = manager or task_manager(tasks, out_dir, options.include_path)
        lm = InterventionsLM(loaded.model, params=run, tokenizer=_tokenizer(loaded), batch_size=options.batch_size)
        try:
            if lm.handle is not None:
                _set_template(lm.handle, loaded)
            out = evaluate_lm(lm, tasks, manager, options)
        finally:
            lm.close()
        if options.log_samples:
            _write_samples(out_dir / "lm_samples" / run.file_stem, out["samples"])
        entry = {"method": run.label, "stack": [{"method": n, "params": p} for n, p in run.stack],
                 "params": {n: p for n, p in run.stack}, "resolved_params": {n: p for n, p in run.resolved},
                 "run_key": key, "metrics": out["metrics"], "stderr": out["stderr"],
                 "lm_eval_versions": out["versions"], "n_samples": out["n-samples"], "per_sample": out["per_sample"]}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(entry, sort_keys=True))
        result_runs.append(entry)
    attach(result_runs, {r["method"]: lm_table(r["per_sample"]) for r in result_runs})
    results = {
        "schema_version": RESULTS_SCHEMA,
        "benchmark": "lm",
        "tasks": tasks,
        "model": {**model, "family": loaded.family},
        "decoding": {"protocol": "lm-eval loglikelihood / generate_until as each task defines",
                     "batch_size": options.batch_size, "num_fewshot": options.num_fewshot},
        "bootstrap_iters": options.bootstrap_iters,
        "seed": options.seed,
        "samples": {"limit": options.limit,
                    "evaluated": options.limit if options.docs is None else sum(map(len, options.docs.values())),
                    **({"docs": options.docs} if options.docs is not None else {})},
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 2),
        "runs": result_runs,
    }
    write_reports(results, out_dir)
    return results


def _write_samples(folder: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    """One JSON line per sample and task, as lm-eval logs them (its own serialiser for non-JSON values)."""
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        with open(folder / f"{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, sort_keys=True) + "\n")
