"""`interventions show`: one figure of where the model looks, per method: the image with the last prompt row's
attention over the image tokens as a heat map on the family's token grid, and the image-attention share of each
generated token of the description (`iv.attention_map`). Writes `OUT/attention.png` and `OUT/attention.json`
(the plotted values)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: the default scene of the shapes builtins (the first test scene of each organism's data)
DEFAULT_SHAPES_IMAGE = "shapes_000001.png"
DEFAULT_QUESTION = "Please describe this image in detail."


def add_show_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `show` to the `interventions` parser (sets `args.run`)."""
    show = subparsers.add_parser("show", help="attention maps: heat map over the image tokens and image-attention "
                                              "share per generated token, one row per method")
    show.add_argument("--model", required=True, help="a VLM: hub id, local path, builtin:shapes-vlm or "
                                                           "builtin:shapes-smollm2")
    show.add_argument("--image", help=f"image file (shapes builtins: default their test scene "
                                           f"{DEFAULT_SHAPES_IMAGE})")
    show.add_argument("--question", help=f"default {DEFAULT_QUESTION!r} (shapes builtins: their description "
                                                                         "prompt)")
    show.add_argument("--methods", default="none,pai", help="comma-separated runs, e.g. none,pai,var")
    show.add_argument("--params", help='JSON {"method": {"parameter": value}}, a JSON file or a tuned.json')
    show.add_argument("--layers", help="comma-separated decoder layers to average (default: the middle half)")
    show.add_argument("--max-new-tokens", type=int, default=16)
    show.add_argument("--dtype", default="float32")
    show.add_argument("--out", required=True, help="output folder (attention.png, attention.json)")
    show.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> int:
    """Validate, load, map each method, write the figure."""
    from .benchmarks.base import Sample
    from .benchmarks.shapes import DATASETS
    from .cli import SHAPES_DATA, _writable_dir, builtin_organism
    from .runner import build_inputs, parse_methods

    runs = parse_methods(args.methods, args.params)
    layers = _layers(args.layers)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    organism = builtin_organism(args.model)
    if args.image is None and organism is None:
        raise ValueError(f"show needs --image (only {' and '.join(SHAPES_DATA.values())} have a default scene)")
    data = DATASETS[organism] if organism is not None else None
    image = Path(args.image) if args.image is not None else data.images / DEFAULT_SHAPES_IMAGE
    if not image.is_file():
        raise ValueError(f"--image {str(image)!r}: no such file")
    question = args.question or (data.chair_prompt if data is not None else DEFAULT_QUESTION)
    out = _writable_dir(args.out)
    from .loading import load_model

    loaded = load_model(args.model, args.dtype)
    if not loaded.has_images:
        raise ValueError(f"show needs a vision-language model; {args.model} is text-only")
    inputs = build_inputs(loaded, [Sample("show", question, image)])
    maps = compare(loaded, inputs, runs, layers, args.max_new_tokens)
    write(maps, image, loaded.family, out, title=f"{args.model}: {question!r}")
    for label, entry in maps.items():
        print(f"{label}: {entry['text']!r} (image share of the last prompt row {entry['share'][0]:.3f})")
    print(f"wrote {out / 'attention.png'}")
    return 0


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {text!r}") from None


def compare(loaded: Any, inputs: dict[str, Any], runs: list[Any], layers: list[int] | None,
            max_new_tokens: int) -> dict[str, dict[str, Any]]:
    """`iv.attention_map` of every run (each wrapped, mapped, unwrapped) as JSON-ready values."""
    import interventions as iv
    from .runner import _tokenizer

    tokenizer = _tokenizer(loaded)
    maps = {}
    for run in runs:
        handle = iv.wrap(loaded.model, run.stack, processor=loaded.processor) if run.stack else None
        try:
            amap = iv.attention_map(loaded.model, inputs, layers, max_new_tokens)
        finally:
            if handle is not None:
                handle.unwrap()
        maps[run.label] = {"heat": amap.heat.tolist(), "share": amap.share, "layers": list(amap.layers),
                           "tokens": [tokenizer.decode([t]) for t in amap.tokens],
                           "text": tokenizer.decode(amap.tokens, skip_special_tokens=True).strip(),
                           "params": {n: p for n, p in run.stack}}
    return maps


def write(maps: dict[str, dict[str, Any]], image: Path, family: str, out: Path, title: str) -> None:
    """`out/attention.json` (the values) and `out/attention.png` (`figure`)."""
    (out / "attention.json").write_text(json.dumps({"image": str(image), "methods": maps}, indent=1) + "\n")
    fig = figure(maps, image, family, title)
    fig.savefig(out / "attention.png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure(maps: dict[str, dict[str, Any]], image: Path, family: str, title: str) -> Any:
    """One row per method: the image as the model sees it (square) under the heat map (nearest cells, one per
    image token), with a colour bar; beside it the image-attention share per generated token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    with Image.open(image) as img:
        view = _model_view(img.convert("RGB"), family)
    top = max(max(m["share"]) for m in maps.values())
    fig, axes = plt.subplots(len(maps), 2, figsize=(10, 3.1 * len(maps) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.9]})
    for row, (label, entry) in enumerate(maps.items()):
        heat = np.asarray(entry["heat"])
        ax = axes[row][0]
        ax.imshow(view, extent=(0, heat.shape[1], heat.shape[0], 0))
        layer = ax.imshow(heat, cmap="inferno", alpha=0.5, interpolation="nearest",
                          extent=(0, heat.shape[1], heat.shape[0], 0))
        fig.colorbar(layer, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"{label}: last prompt row, layers {_span(entry['layers'])}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax = axes[row][1]
        ax.plot(range(len(entry["share"])), entry["share"], marker="o", color=f"C{row}")
        ax.set_ylim(0, min(1.0, top * 1.1) or 1.0)
        ax.set_xticks(range(len(entry["tokens"])))
        ax.set_xticklabels([t.strip() or repr(t) for t in entry["tokens"]], rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("image attention share", fontsize=8)
        ax.set_xlabel("generated token (share of the row that produced it)", fontsize=8)
        ax.set_title(f"{label}: {entry['text'][:60]!r}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(
        map(str, layers))


def _model_view(image: Any, family: str) -> Any:
    """The square the grid covers: CLIP-style processors (llava) resize the short side and centre-crop; the
    others resize the whole image."""
    if family == "llava":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side))
    return image.resize((max(image.size), max(image.size)))
