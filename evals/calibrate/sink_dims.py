"""Find a model's massive-activation hidden dimensions (VAR's D_sink) and write them as a preset file that
`iv.wrap(model, "var", sink_dims="dims.json")` reads.

Rule (shared/specs/var.md §6, discovery procedure): run a handful of prompts; at the input of each decoder layer in
`layers` (default 2..L-1) take, per channel d, its peak `max_t |x_{t,d}| / RMS(x_t)` over the prompt's tokens (RMS
without the learned norm weight, exactly VAR's sink test). A channel *fires* on a (prompt, layer) pair when its peak
reaches `threshold` (default VAR's tau = 20, so the dims found flag tokens under VAR's own test). Sink dims are the
channels firing on at least `min_fraction` of the (prompt, layer) pairs, ranked by that fraction and then by their
median peak, at most `top_k`. The tokens on which they fire are reported: on trained LLMs, the BOS-like first token
and a few delimiters. The ratio is bounded by sqrt(hidden_size), so small models need a lower threshold.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from interventions.errors import ConfigError
from interventions.families import resolve
from interventions.methods.var import rms_ratio
from interventions.version import __version__

from ..loading import load_model

#: generic short prompts (no benchmark data), used when none are given
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Describe a busy street market in two sentences.",
    "Write a haiku about autumn leaves.",
    "Explain why the sky is blue.",
    "List four animals that live in the ocean.",
    "How many legs does a spider have?",
    "Summarise the plot of a fairy tale you know.",
)

Prompt = str | Mapping[str, torch.Tensor]


def find_sink_dims(model: torch.nn.Module, tokenizer: Any = None, prompts: Sequence[Prompt] = DEFAULT_PROMPTS, *,
                   threshold: float = 20.0, min_fraction: float = 0.5, top_k: int = 4,
                   layers: Sequence[int] | None = None, chat_template: bool = True,
                   model_id: str | None = None) -> dict[str, Any]:
    """Find the hidden dimensions with massive activations, with the rule of this module's docstring.

    Args:
        model (`transformers.PreTrainedModel`): a model of a supported family (unwrapped).
        tokenizer (*optional*): tokenizes string prompts (a processor holding one works too).
        prompts (`Sequence[str | Mapping]`, *optional*, defaults to `DEFAULT_PROMPTS`): texts, or ready model
            inputs of one sample each (e.g. a processor's output with an image).
        threshold (`float`, *optional*, defaults to `20.0`): peak `|x_d|/RMS(x)` at which a channel fires.
        min_fraction (`float`, *optional*, defaults to `0.5`): share of (prompt, layer) pairs a sink dim fires on.
        top_k (`int`, *optional*, defaults to `4`): at most this many dims.
        layers (`Sequence[int]`, *optional*): decoder layers whose inputs are read; default 2..L-1.
        chat_template (`bool`, *optional*, defaults to `True`): render string prompts as a user turn of the
            tokenizer's chat template when it has one.
        model_id (`str`, *optional*): recorded as the model; default `model.config._name_or_path`.

    Returns:
        `dict`: `sink_dims` plus provenance (model, layers, threshold, prompt-token hash, date, versions), the
        ranked `candidates` and the `sink_tokens` where the dims fire. `write_preset` saves it.

    Raises:
        ConfigError: bad arguments, or no channel fires often enough (the message lists the strongest ones).

    Example:
        >>> result = find_sink_dims(model, tokenizer, top_k=2)
        >>> write_preset(result, "dims.json")
        >>> iv.wrap(model, "var", sink_dims="dims.json")
    """
    check_options(threshold, min_fraction, top_k)
    adapter = resolve(model)
    decoder_layers = adapter.decoder(model).layers
    hidden_size = adapter.text_config(model).hidden_size
    layers = tuple(range(2, len(decoder_layers))) if layers is None else tuple(layers)
    if not layers or any(not 0 <= i < len(decoder_layers) for i in layers):
        raise ConfigError(
            f"sink-dims: layers={list(layers)} invalid; this model has layers 0..{len(decoder_layers) - 1}")
    if not prompts:
        raise ConfigError("sink-dims: give at least one prompt")
    if threshold >= math.sqrt(hidden_size):
        raise ConfigError(f"sink-dims: threshold={threshold} is never reached: |x_d|/RMS(x) <= sqrt(hidden_size) = "
                          f"{math.sqrt(hidden_size):.1f} for this model; use a lower threshold (and tau for var)")

    captured: dict[int, torch.Tensor] = {}
    hooks = [decoder_layers[i].register_forward_pre_hook(functools.partial(_keep, captured, i), with_kwargs=True)
             for i in layers]
    peaks, fired, digest, texts = [], [], hashlib.sha256(), []
    device = next(model.parameters()).device
    try:
        for prompt in prompts:
            inputs = _encode(prompt, tokenizer, chat_template, adapter.has_images, device)
            ids = inputs["input_ids"]
            if ids.shape[0] != 1:
                raise ConfigError(f"sink-dims: each prompt is one sample; got a batch of {ids.shape[0]}")
            digest.update(json.dumps(ids[0].tolist()).encode())
            texts.append(prompt if isinstance(prompt, str) else None)
            captured.clear()
            with torch.no_grad():
                model(**inputs)
            mask = inputs.get("attention_mask")
            valid = (torch.ones_like(ids[0]) if mask is None else mask[0]).bool().cpu()
            # only entries at or above the threshold are kept: massive activations are rare
            hits = []
            for layer in layers:
                ratio = rms_ratio(captured[layer][0]).cpu()[valid]  # (valid tokens, hidden)
                peaks.append(ratio.amax(0))
                t, d = (ratio >= threshold).nonzero(as_tuple=True)
                hits.append((layer, valid.nonzero().flatten()[t].tolist(), d.tolist()))
            fired.append((ids[0].tolist(), hits))
    finally:
        for hook in hooks:
            hook.remove()

    peak = torch.stack(peaks).float()  # (prompts × layers, hidden)
    fraction = (peak >= threshold).float().mean(0)
    median = peak.median(0).values
    order = sorted(range(hidden_size), key=lambda d: (-float(fraction[d]), -float(median[d])))
    candidates = [{"dim": d, "fraction": round(float(fraction[d]), 4), "median_peak_ratio": round(float(median[d]), 3)}
                  for d in order[:max(top_k, 8)]]
    dims = sorted(d for d in order[:top_k] if float(fraction[d]) >= min_fraction)
    if not dims:
        raise ConfigError(
            f"sink-dims: no hidden dimension reaches |x_d|/RMS(x) >= {threshold} on {min_fraction:.0%} of the "
            f"{peak.shape[0]} (prompt, layer) pairs; strongest: {candidates[:3]}; lower threshold or min_fraction"
        )
    return {
        "sink_dims": dims,
        "source": "discovered",
        "model": model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "family": adapter.name,
        "model_type": model.config.model_type,
        "hidden_size": hidden_size,
        "num_layers": len(decoder_layers),
        "layers": list(layers),
        "threshold": threshold,
        "min_fraction": min_fraction,
        "top_k": top_k,
        "num_prompts": len(prompts),
        "prompts": texts,
        "prompt_tokens_sha256": digest.hexdigest(),
        "chat_template": chat_template,
        "candidates": candidates,
        "sink_tokens": _sink_tokens(fired, set(dims), tokenizer),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"interventions": __version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


def write_preset(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a `find_sink_dims` result as JSON (sorted keys) that `iv.wrap(model, "var", sink_dims=path)` reads.

    Returns:
        `Path`: the file written.
    """
    if not result.get("sink_dims"):
        raise ConfigError("sink-dims: the result has no sink_dims to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def _keep(store: dict[int, torch.Tensor], layer: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    store[layer] = (args[0] if args else kwargs["hidden_states"]).detach()


def _encode(prompt: Prompt, tokenizer: Any, chat_template: bool, has_images: bool,
            device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(prompt, str):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompt.items()}
    if tokenizer is None:
        raise ConfigError("sink-dims: string prompts need a tokenizer")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if chat_template and getattr(tokenizer, "chat_template", None):
        # VLM templates take a list of typed parts, LLM templates a plain string
        content: Any = [{"type": "text", "text": prompt}] if has_images else prompt
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items()}


def _sink_tokens(fired: list, dims: set[int], tokenizer: Any) -> list[dict[str, Any]]:
    """Per prompt, the positions where a sink dim fires, with the token and the number of layers."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    out = []
    for index, (ids, hits) in enumerate(fired):
        counts: Counter[int] = Counter()
        for _, positions, channels in hits:
            counts.update({p for p, d in zip(positions, channels) if d in dims})
        for position, n in sorted(counts.items()):
            token = tokenizer.convert_ids_to_tokens(ids[position]) if tokenizer is not None else ids[position]
            out.append({"prompt": index, "position": position, "token": token, "layers": n})
    return out


# ---- command line: `interventions calibrate sink-dims` ----------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `interventions calibrate sink-dims`."""
    parser.add_argument("--model", required=True,
                        help="hub id, local path, or builtin:smollm2 (the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--output", "-o", required=True, help="JSON file to write (pass it as var's sink_dims)")
    parser.add_argument("--prompts", help="text file with one prompt per line (default: 8 built-in prompts)")
    parser.add_argument("--threshold", type=float, default=20.0, help="peak |x_d|/RMS(x) at which a channel fires")
    parser.add_argument("--min-fraction", type=float, default=0.5,
                        help="share of (prompt, layer) pairs a sink dim must fire on")
    parser.add_argument("--top-k", type=int, default=4, help="at most this many dims")
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layers to read (default 2..L-1)")
    parser.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as plain text")
    parser.add_argument("--dtype", default="float32", help="torch dtype to load the model in")
    parser.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. 'auto')")


def check_options(threshold: float, min_fraction: float, top_k: int) -> None:
    """The options that need no model: `threshold` > 0 (a ratio |x_d|/RMS(x)), `min_fraction` in (0, 1],
    `top_k` >= 1."""
    if not math.isfinite(threshold) or threshold <= 0:
        raise ConfigError(f"sink-dims: threshold={threshold} is invalid; expected a ratio |x_d|/RMS(x) > 0 "
                          "(default 20, VAR's tau)")
    if not 0 < min_fraction <= 1:
        raise ConfigError(f"sink-dims: min_fraction={min_fraction} is invalid; expected 0 < min_fraction <= 1")
    if top_k < 1:
        raise ConfigError(f"sink-dims: top_k={top_k} is invalid; expected an integer >= 1")


def main(args: argparse.Namespace) -> int:
    """Run `find_sink_dims` from parsed `add_arguments` options, write the file and print a summary."""
    from ..loading import check_load_options
    from .devset import check_output_file

    check_options(args.threshold, args.min_fraction, args.top_k)
    check_output_file(args.output)
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise ConfigError(f"sink-dims: --prompts {args.prompts!r} is not a file")
    check_load_options(args.model, args.dtype, args.device_map)
    loaded = load_model(args.model, args.dtype, args.device_map)
    model, tokenizer, model_id = loaded.model, getattr(loaded.processor, "tokenizer", loaded.processor), args.model
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = tuple(line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip())
    result = find_sink_dims(model, tokenizer, prompts, threshold=args.threshold, min_fraction=args.min_fraction,
                            top_k=args.top_k, layers=args.layers, chat_template=not args.no_chat_template,
                            model_id=model_id)
    path = write_preset(result, args.output)
    tokens = Counter((t["position"], t["token"]) for t in result["sink_tokens"])
    print(f"sink dims of {model_id}: {result['sink_dims']} -> {path}")
    from .devset import write_calibrated_config

    print(write_calibrated_config(model, "var", {"sink_dims": result["sink_dims"]}, path, model_id))
    print("flagged tokens (position 'token': prompts):",
          ", ".join(f"{pos} {tok!r}: {n}" for (pos, tok), n in tokens.most_common(6)) or "none")
    return 0
