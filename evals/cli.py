"""`interventions eval pope|chair|lm`: argparse → validated inputs → runner. Validation happens before the model
loads, so bad input costs nothing; every error reaches the user as one `error: ...` line."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from pathlib import Path

#: what `eval lm --model builtin:smollm2` runs without --tasks (COPA: 100 questions, about a minute on 2 cores)
DEFAULT_LM_TASKS = ("copa_local",)


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval pope`, `eval chair` and `eval lm` to the `interventions` parser."""
    evaluate = subparsers.add_parser("eval", help="score methods against the unmodified model")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True)

    pope = benchmarks.add_parser("pope", help="POPE yes/no object questions")
    chair = benchmarks.add_parser("chair", help="CHAIR object hallucination in image descriptions")
    lm = benchmarks.add_parser("lm", help="reasoning tasks through lm-eval (shipped offline: "
                                          "arc_easy_local, boolq_local, copa_local)")
    add_data_arguments(pope, chair, lm)
    for parser in (pope, chair, lm):
        parser.add_argument("--methods", required=True, help="comma-separated columns: none, a method, a stack a+b, "
                                                             "or a labelled variant pai@alpha=0.5 (the same method "
                                                             "may appear with different parameters)")
        parser.add_argument("--params", help='JSON {"method": {"parameter": value}} for every column of the method, '
                                             "a JSON file holding it, a tune's tuned.json, or a saved "
                                             "interventions_config.json (or its folder)")
        parser.add_argument("--out", help="output folder (predictions, results.json/.md/.png); default "
                                          "runs/<today's date>-<short run key>, one folder per configuration")


def add_data_arguments(pope: argparse.ArgumentParser, chair: argparse.ArgumentParser,
                       lm: argparse.ArgumentParser) -> None:
    """The data, model and decoding arguments shared by `eval` and `tune` (one parser per benchmark)."""
    pope.add_argument("--questions", help="POPE question file (JSON Lines or JSON array), or a folder of "
                                          "*_pope_{random,popular,adversarial}.json files; default for "
                                          "builtin:shapes-vlm / builtin:shapes-smollm2: its shipped shapes-POPE")
    pope.add_argument("--images", help="folder of the images the questions name")
    pope.add_argument("--parser", default="official", help="official | lmms-eval | vlmevalkit")
    pope.add_argument("--prompt", help="prompt template with {question}; default LLaVA-1.5's (shapes-POPE: "
                                       "'{question}')")

    chair.add_argument("--images", help="folder of COCO val2014 images")
    chair.add_argument("--image-ids", help="file with one COCO image id per line")
    truth = chair.add_mutually_exclusive_group()
    truth.add_argument("--objects", help="per-image ground-truth objects (the shipped coco2014_objects.json.gz)")
    truth.add_argument("--annotations", help="folder with COCO 2014 instances_*/captions_* JSON files")
    chair.add_argument("--prompt", help="default 'Please describe this image in detail.' (shapes-CHAIR: the "
                                        "organism's own, e.g. 'describe the image .')")

    lm.add_argument("--tasks", help="comma-separated lm-eval task names (default for builtin:smollm2: "
                                    f"{','.join(DEFAULT_LM_TASKS)})")
    lm.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    lm.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (exact: padded batches give the "
                                                              "log-likelihoods of batch size 1)")
    lm.add_argument("--num-fewshot", type=int, help="few-shot examples per question (default: each task's own)")
    lm.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval's stderr: closed form for means, "
                                                                      "this many bootstrap resamples otherwise; 0: "
                                                                      "no stderr")
    lm.add_argument("--log-samples", action="store_true", help="per-sample logs to OUT/lm_samples/<method>/<task>"
                                                               ".jsonl")

    for parser in (pope, chair, lm):
        parser.add_argument("--model", required=True, help="hub id, local path, builtin:smollm2, "
                                                              "builtin:shapes-vlm or builtin:shapes-smollm2")
        parser.add_argument("--limit", type=int, help="evaluate the first N samples of each split only")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 | auto")
        parser.add_argument("--device-map", help="e.g. auto (accelerate)")
        parser.add_argument("--load-in-4bit", action="store_true")
        parser.add_argument("--load-in-8bit", action="store_true")
    for parser in (pope, chair):
        parser.add_argument("--batch-size", type=int, help="default 1 (shapes data: 100)")
        parser.add_argument("--max-new-tokens", type=int, default=None)
        parser.add_argument("--gen-kwargs", help="generate() options, lm-eval style: num_beams=5,do_sample=False "
                                                 "(default greedy); recorded in the run key")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar (also INTERVENTIONS_NO_PROGRESS=1)")
        parser.add_argument("--shapes", nargs="?", const="shapes-vlm", choices=sorted(SHAPES_DATA),
                            help="an organism's shipped shapes data (the default of its builtin), e.g. for a "
                                 "retrained organism; alone: shapes-vlm's")
        parser.add_argument("--full", action="store_true", help="with the shapes data: the full test split "
                                                                "(default: the quick set)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an eval; the message says where the predictions written so far are."""


def run_eval(args: argparse.Namespace) -> int:
    """Validate everything, lock the output folder, load, run, print the markdown table."""
    from .folder_lock import locked
    from .loading import check_load_options
    from .method_specs import parse_methods

    started = time.time()
    runs = parse_methods(args.methods, args.params)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.benchmark == "lm":
        check_load_options(args.model, args.dtype, args.device_map, args.load_in_4bit, args.load_in_8bit)
        tasks = _lm_tasks(args)
        for flag in ("batch_size", "num_fewshot", "bootstrap_iters"):
            value = getattr(args, flag)
            if value is not None and value < (1 if flag == "batch_size" else 0):
                raise ValueError(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'batch_size' else 0}, got {value}")
        from .run_keys import digest
        from .runner import LmOptions, run_lm

        options = LmOptions(limit=args.limit, include_path=args.include_path, seed=args.seed,
                            batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                            bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples)
        run_id = digest([args.model, args.dtype, args.device_map, args.load_in_4bit, args.load_in_8bit, tasks,
                         [r.resolved for r in runs], args.limit, args.seed, args.num_fewshot], 8)
        out = _writable_dir(args.out or _default_out(run_id))
        with locked(out, ".lock" if rank == 0 else f".lock.rank{rank}"), _interrupted_in(out):
            loaded = _load(args)
            results = run_lm(loaded, tasks, runs, out, options)
    else:
        from .decoding import parse_gen_kwargs
        from .runner import ModelSpec, check_folder, execute_plan, plan_generation

        gen_kwargs = parse_gen_kwargs(args.gen_kwargs)
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        benchmark = _benchmark(args)  # data and prompt template checked first, then the model's options
        check_load_options(args.model, args.dtype, args.device_map, args.load_in_4bit, args.load_in_8bit)
        if args.batch_size is None:  # the organism's prompts are short and equal in length: batch them
            from .benchmarks.shapes import is_shipped

            args.batch_size = SHAPES_BATCH_SIZE if is_shipped(benchmark.images) else 1
        spec = ModelSpec(args.model, args.dtype, args.device_map, args.load_in_4bit, args.load_in_8bit)
        plan = plan_generation(benchmark, runs, spec, args.batch_size, args.limit, args.max_new_tokens, gen_kwargs,
                               args.seed)
        out = _writable_dir(args.out or _default_out(plan.folder_id))
        with locked(out, ".lock" if rank == 0 else f".lock.rank{rank}"), _interrupted_in(out):
            check_folder(plan, out, rank, world)
            loaded = _load(args)
            if not loaded.has_images:
                raise ValueError(f"eval {args.benchmark} needs a vision-language model; {args.model} is text-only")
            progress = not (args.no_progress or os.environ.get("INTERVENTIONS_NO_PROGRESS") == "1")
            results = execute_plan(loaded, plan, out, progress, started)
    if results is not None:
        print((out / "results.md").read_text(), end="")
    return 0


def _lm_tasks(args: argparse.Namespace) -> list[str]:
    if args.tasks is None and args.model != "builtin:smollm2":
        raise ValueError("eval lm needs --tasks (only builtin:smollm2 has default tasks)")
    tasks = [t.strip() for t in (args.tasks or ",".join(DEFAULT_LM_TASKS)).split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty")
    return tasks


def _default_out(run_id: str) -> str:
    """`runs/<today>-<run id>`: one folder per configuration, so runs with other parameters never meet."""
    return str(Path("runs") / f"{datetime.date.today().isoformat()}-{run_id}")


@contextlib.contextmanager
def _interrupted_in(out: Path) -> Iterator[None]:
    """Turn Ctrl-C inside the block into `Interrupted`, naming the folder that keeps the predictions."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"the predictions written so far are kept in {out}; rerun the same command to "
                          "resume") from None


SHAPES_MODEL = "builtin:shapes-vlm"
#: organism → its builtin name; an organism's builtin defaults to its own shapes data
SHAPES_DATA = {"shapes-vlm": SHAPES_MODEL, "shapes-smollm2": "builtin:shapes-smollm2"}
SHAPES_BATCH_SIZE = 100
_DATA_ARGS = {"pope": ("questions", "images"), "chair": ("images", "image_ids", "objects", "annotations")}


def builtin_organism(model_id: str) -> str | None:
    """The organism whose shipped shapes data is `model_id`'s default (a shapes builtin), else `None`."""
    return next((name for name, model in SHAPES_DATA.items() if model == model_id), None)


def shapes_organism(args: argparse.Namespace) -> str | None:
    """The organism whose shipped data `args` selects: `--shapes NAME`, else the builtin's own, else `None`."""
    return args.shapes or builtin_organism(args.model)


def _benchmark(args: argparse.Namespace):
    """The benchmark of the data arguments; without any, the shipped shapes data for `builtin:shapes-vlm`."""
    from .benchmarks import generation, shapes

    given = [a for a in _DATA_ARGS[args.benchmark] if getattr(args, a) is not None]
    if args.shapes and given:
        raise ValueError(f"--shapes replaces the data arguments; drop --{given[0].replace('_', '-')}")
    if not given:
        organism = shapes_organism(args)
        if organism is None:
            needed = "--questions and --images" if args.benchmark == "pope" else \
                "--images, --image-ids and one of --objects / --annotations"
            raise ValueError(f"eval {args.benchmark} needs {needed} (or --shapes; "
                             f"{' and '.join(SHAPES_DATA.values())} default to their own)")
        if args.benchmark == "pope":
            if args.prompt is not None:
                raise ValueError("--prompt applies to your own question files; shapes-POPE uses the organism's")
            return shapes.shapes_pope(full=args.full, parser=args.parser, organism=organism)
        if args.prompt is not None:
            raise ValueError("--prompt applies to your own images; shapes-CHAIR uses the organism's")
        return shapes.shapes_chair(full=args.full, organism=organism)
    if args.full:
        raise ValueError("--full selects the size of the shipped shapes data; it does not apply to other data")
    if args.benchmark == "pope":
        missing = [f"--{a}" for a in _DATA_ARGS["pope"] if getattr(args, a) is None]
        if missing:
            raise ValueError(f"eval pope needs {' and '.join(missing)} too")
        return generation.pope_benchmark(Path(args.questions), Path(args.images), args.parser, args.prompt)
    if args.images is None or args.image_ids is None or (args.objects is None and args.annotations is None):
        raise ValueError("eval chair needs --images, --image-ids and one of --objects / --annotations")
    return generation.chair_benchmark(Path(args.images), Path(args.image_ids), args.prompt,
                                      objects=args.objects, annotations=args.annotations)


def _load(args: argparse.Namespace):
    from evals.loading import load_model

    device_map = args.device_map
    if device_map is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch: own device
        from .runner import process_state

        device_map = {"": str(process_state().device)}
    return load_model(args.model, args.dtype, device_map, args.load_in_4bit, args.load_in_8bit)


def _writable_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {path!r} is not writable: {e.strerror}") from None
    return out


