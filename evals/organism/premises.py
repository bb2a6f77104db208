"""Measure, on the unmodified model, the phenomena the methods act on, and print them as markdown tables.

    python -m evals.organism.premises --model builtin:shapes-smollm2 [--scenes 40]

Over the first `--scenes` shapes-CHAIR test scenes of the model's organism, eager attention, greedy decoding of the
description prompt:

- VAR's sink test: the share of (layer, token) pairs whose layer input has `phi = max_d |x_d| / RMS(x) >= tau`
  (`--tau`, 20) on the sink dims (VAR's preset for the model, else `--sink-dims`), over all prompt tokens and over
  the image tokens;
- ACT's sinks: the (layer, head) pairs with a sink besides position 0, a key whose mean attention over the prompt
  rows that see it exceeds `--act-threshold` (0.1, ACT's default), and where those sinks are (image / text);
- the image-attention share of the last row per generated position (mean over layers, heads and scenes): the share
  of the row's attention mass on the image tokens as the description grows.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import numpy as np
import torch
import transformers

#: the name under which this transformers release takes the KV cache (`cache` from 5.2x, `past_key_values` before)
CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.LlavaForConditionalGeneration.forward).parameters \
    else "past_key_values"


def measure(loaded, data, scenes: int, sink_dims: tuple[int, ...], tau: float, act_threshold: float,
            max_new_tokens: int) -> dict:
    """The three premises over the first `scenes` CHAIR test scenes of `data` (a `ShapesData`); the model's
    attention implementation is eager while measuring, and restored after."""
    model = loaded.model
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")  # attention probabilities are read, never changed
    try:
        return _measure(loaded, data, scenes, sink_dims, tau, act_threshold, max_new_tokens)
    finally:
        model.set_attn_implementation(previous)


def _measure(loaded, data, scenes: int, sink_dims: tuple[int, ...], tau: float, act_threshold: float,
             max_new_tokens: int) -> dict:
    from ..benchmarks.base import Sample
    from ..benchmarks.chair import read_image_ids
    from ..benchmarks.shapes import IMAGE_NAME
    from ..runner import build_inputs
    from interventions.methods.var import sink_scores

    model = loaded.model
    image_id = model.config.image_token_index
    ids = read_image_ids(data.folder / "chair" / "image_ids.txt")[:scenes]
    phi_all, phi_image, act_pairs, act_where, shares = [], [], set(), {"image": 0, "text": 0}, []
    eos = model.generation_config.eos_token_id
    for n, scene in enumerate(ids):
        sample = Sample(str(scene), data.chair_prompt, data.images / IMAGE_NAME.format(image_id=int(scene)))
        inputs = build_inputs(loaded, [sample])
        is_image = (inputs["input_ids"][0] == image_id)
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states[:-1]  # the input of each decoder layer
        for x in hidden:
            phi = sink_scores(x, sink_dims)[0]  # VAR's own φ
            phi_all.append((phi >= tau).float())
            phi_image.append((phi[is_image] >= tau).float())
        for layer, attn in enumerate(out.attentions):
            probs = attn[0].float()  # (heads, rows, keys)
            length = probs.shape[-1]
            seen_by = torch.arange(length, 0, -1, dtype=probs.dtype)  # rows at or after each key
            mean = probs.sum(1) / seen_by
            for head in range(probs.shape[0]):
                sinks = (mean[head] > act_threshold).nonzero().flatten().tolist()
                others = [k for k in sinks if k != 0]
                if others:
                    act_pairs.add((layer, head))
                    for k in others:
                        act_where["image" if is_image[k] else "text"] += 1
        share = []
        current = dict(inputs)
        cache = transformers.DynamicCache(config=model.config.text_config)  # filled in place, step by step
        for _ in range(max_new_tokens):
            with torch.no_grad():
                step = model(**current, **{CACHE_ARG: cache}, use_cache=True, output_attentions=True)
            last = torch.stack([a[0, :, -1].float() for a in step.attentions])  # (layers, heads, keys)
            share.append(last[..., : is_image.numel()][..., is_image].sum(-1).mean().item())
            token = step.logits[0, -1].argmax()
            if int(token) == eos:
                break
            mask = torch.cat([current["attention_mask"], current["attention_mask"].new_ones(1, 1)], 1)
            current = {"input_ids": token.view(1, 1), "attention_mask": mask}
        shares.append(share)
        print(f"scene {n + 1}/{len(ids)}: {len(share)} generated tokens", flush=True)
    width = max(len(s) for s in shares)
    per_position = [float(np.mean([s[i] for s in shares if len(s) > i])) for i in range(width)]
    counts = [sum(len(s) > i for s in shares) for i in range(width)]
    layers, heads = len(out.attentions), out.attentions[0].shape[1]
    return {"scenes": len(ids), "sink_dims": list(sink_dims), "tau": tau,
            "var_sink_share_all": float(torch.cat(phi_all).mean()),
            "var_sink_share_image": float(torch.cat(phi_image).mean()),
            "act_threshold": act_threshold, "act_heads_with_sink": len(act_pairs), "heads": layers * heads,
            "act_sinks_image": act_where["image"], "act_sinks_text": act_where["text"],
            "image_share_per_position": per_position, "scenes_per_position": counts}


def markdown(result: dict, model_id: str) -> str:
    """The README tables."""
    shares = result["image_share_per_position"]
    half = max(1, len(shares) // 2)
    lines = [f"Premises of `{model_id}` (unmodified, {result['scenes']} shapes-CHAIR test scenes, description "
             "prompt, greedy):", "",
             "| premise | measured |", "|---|---|",
             f"| VAR sink test φ ≥ {result['tau']:g} on dims {result['sink_dims']}: share of (layer, token) pairs, "
             f"all prompt tokens | {result['var_sink_share_all']:.3f} |",
             f"| same, image tokens only | {result['var_sink_share_image']:.3f} |",
             f"| ACT: heads with a sink besides position 0 (column mean > {result['act_threshold']:g}) | "
             f"{result['act_heads_with_sink']} of {result['heads']} |",
             f"| ACT sinks (besides 0) on image / text tokens, summed over scenes | {result['act_sinks_image']} / "
             f"{result['act_sinks_text']} |", "",
             "| generated position | " + " | ".join(str(i + 1) for i in range(len(result["image_share_per_position"])))
             + " |", "|---|" + "---|" * len(result["image_share_per_position"]),
             "| image-attention share of the last row | " + " | ".join(
                 f"{v:.3f}" for v in result["image_share_per_position"]) + " |",
             "| scenes still generating | " + " | ".join(str(c) for c in result["scenes_per_position"]) + " |", "",
             f"Mean share over generated positions 1-{half}: {np.mean(shares[:half]):.3f}; over positions "
             f"{half + 1}-{len(shares)}: {np.mean(shares[half:]):.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:shapes-smollm2")
    parser.add_argument("--organism", help="whose shapes data (default: the builtin's own)")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--tau", type=float, default=20.0)
    parser.add_argument("--sink-dims", help="comma-separated dims (default: VAR's preset for the model)")
    parser.add_argument("--act-threshold", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    from ..benchmarks.shapes import DATASETS
    from ..cli import builtin_organism
    from ..loading import load_model

    organism = args.organism or builtin_organism(args.model)
    if organism is None:
        parser.error(f"--organism is needed for {args.model} (one of {', '.join(DATASETS)})")
    loaded = load_model(args.model)
    if args.sink_dims:
        dims = tuple(int(d) for d in args.sink_dims.split(","))
    else:
        from interventions.core.contract import ModelInfo
        from interventions.errors import ConfigError
        from interventions.methods.var import preset_sink_dims

        text = loaded.model.config.text_config
        info = ModelInfo(loaded.family, text.num_hidden_layers, text.num_attention_heads,
                         text.num_key_value_heads, True)
        try:
            dims = preset_sink_dims(info)[0]
        except ConfigError as e:
            parser.error(str(e))
    result = measure(loaded, DATASETS[organism], args.scenes, tuple(dims), args.tau, args.act_threshold,
                     args.max_new_tokens)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result, args.model))


if __name__ == "__main__":
    main()
