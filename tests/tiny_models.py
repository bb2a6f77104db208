"""Tiny random-initialised Hugging Face models, and batches laid out as their real processors lay them out.

Every family is built offline from config classes (no hub access), with the real generation class, a 3-layer
text decoder (4 query heads, 2 key/value heads, hidden size 64, vocabulary of 256 ids) and, for the image
families, a vision tower of 2 layers fed a tiny image, so that a forward pass takes milliseconds on a CPU.

All families share one id layout: ids below ``FIRST_TEXT_ID`` are special (padding, BOS, EOS, the image
placeholder and the boundary tokens around it) and ordinary text ids are drawn from the rest of the vocabulary.
An image prompt is laid out as ``before`` text tokens, then the image block of its family, then ``after`` text
tokens; the image block is what the family's processor produces for one image:

- llava, llava_next: the image token repeated once per image feature (llava_next: any-resolution tiling,
  unpadding and one newline feature per row included in the count);
- qwen2_vl, qwen2_5_vl: ``<|vision_start|>``, the image token once per merged patch, ``<|vision_end|>``;
- idefics3, smolvlm: ``<fake_token_around_image><global-img>``, the image token ``image_seq_len`` times,
  ``<fake_token_around_image>`` (one global image, no splitting into row/column crops);
- gemma3: ``"\\n\\n"``, ``<start_of_image>``, the image token ``mm_tokens_per_image`` times, ``<end_of_image>``,
  ``"\\n\\n"``.

Pixel tensors come from the families' real image-processor classes (their PIL backends, which need no
torchvision), applied to a random image seeded by the prompt.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import PIL.Image
import torch
import transformers
from transformers.image_processing_utils import select_best_resolution

FAMILIES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "mistral",
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
)
LLM_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral")
VLM_FAMILIES: tuple[str, ...] = tuple(family for family in FAMILIES if family not in LLM_FAMILIES)

VOCAB_SIZE = 256
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
IMAGE_ID = 3
"""The image placeholder of every image family: its runs in ``input_ids`` are the image positions."""
VIDEO_ID = 4
VISION_START_ID = 5
VISION_END_ID = 6
FAKE_TOKEN_AROUND_IMAGE_ID = 7
GLOBAL_IMG_ID = 8
BOI_ID = 9
EOI_ID = 10
DOUBLE_NEWLINE_ID = 11
"""Gemma3's ``"\\n\\n"`` around an image: an ordinary token there, kept out of the random text ids here."""
FIRST_TEXT_ID = 16
"""Ordinary text ids are drawn uniformly from ``[FIRST_TEXT_ID, VOCAB_SIZE)``."""

INITIALIZER_RANGE = 0.1
"""Five times the usual init std: attention is clearly non-uniform and logits differ between tokens, while a
prompt's fp32 logits alone and in a padded batch still agree to about 3e-6 (at 0.2 they drift past 1e-5)."""

SOURCE_IMAGE_SIZE = (20, 28)
"""(height, width) of the random image of a prompt, before the family's image processor resizes it."""

_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": INITIALIZER_RANGE,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
_CLIP_VISION_CONFIG: dict[str, Any] = {**_VISION_CONFIG, "image_size": 16, "patch_size": 4}
_QWEN_VL_ROPE: dict[str, Any] = {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [2, 3, 3]}
_QWEN_VL_VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "num_heads": 2,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "initializer_range": INITIALIZER_RANGE,
}
_QWEN_VL_IDS: dict[str, int] = {
    "image_token_id": IMAGE_ID,
    "video_token_id": VIDEO_ID,
    "vision_start_token_id": VISION_START_ID,
    "vision_end_token_id": VISION_END_ID,
}
_LLAVA_NEXT_GRID_PINPOINTS = [[16, 32], [32, 16], [32, 32]]


@dataclass(frozen=True)
class Prompt:
    """One sample of a batch: random text around one random image (or text only).

    ``before`` counts the ordinary text tokens before the image, the BOS token included for the families that
    start with one; ``after`` counts those after it. The image block in between (placeholders and boundary
    tokens) is not counted. ``seed`` seeds both the text ids and the image, so a prompt gives the same tokens
    and pixels alone and in any batch. With ``image=False`` the prompt is ``before + after`` text tokens.
    """

    before: int
    after: int
    seed: int = 0
    image: bool = True


@dataclass(frozen=True)
class _Family:
    """How to build one family's model and lay out its inputs."""

    model_class: type[transformers.PreTrainedModel]
    config: Callable[[], transformers.PreTrainedConfig]
    starts_with_bos: bool
    image_processor: Callable[[], transformers.BaseImageProcessor] | None = None
    vision_keys: tuple[str, ...] = ()
    """The image-processor outputs the model takes."""
    nested_images: bool = False
    """Whether the image processor takes one list of images per sample (Idefics3, SmolVLM) or a flat list."""
    token_type_key: str | None = None
    """The input marking image tokens with 1 and all others with 0, where the processor returns one."""


def _llama_config() -> transformers.PreTrainedConfig:
    return transformers.LlamaConfig(**_TEXT_CONFIG)


def _qwen2_config() -> transformers.PreTrainedConfig:
    return transformers.Qwen2Config(**{**_TEXT_CONFIG, "bos_token_id": None})


def _mistral_config() -> transformers.PreTrainedConfig:
    return transformers.MistralConfig(**_TEXT_CONFIG)


def _llava_config() -> transformers.PreTrainedConfig:
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_CLIP_VISION_CONFIG),
        text_config=_llama_config(),
        image_token_index=IMAGE_ID,
    )


def _llava_next_config() -> transformers.PreTrainedConfig:
    return transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**_CLIP_VISION_CONFIG),
        text_config=_mistral_config(),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=_LLAVA_NEXT_GRID_PINPOINTS,
    )


def _qwen2_vl_config() -> transformers.PreTrainedConfig:
    return transformers.Qwen2VLConfig(
        text_config=transformers.Qwen2VLTextConfig(
            **{**_TEXT_CONFIG, "bos_token_id": None}, rope_parameters=dict(_QWEN_VL_ROPE)
        ),
        # Qwen2-VL's vision `hidden_size` is the width of the merger's output, i.e. of the text model.
        vision_config=transformers.Qwen2VLVisionConfig(
            **_QWEN_VL_VISION_CONFIG, embed_dim=32, mlp_ratio=2, hidden_size=_TEXT_CONFIG["hidden_size"]
        ),
        **_QWEN_VL_IDS,
    )


def _qwen2_5_vl_config() -> transformers.PreTrainedConfig:
    return transformers.Qwen2_5_VLConfig(
        text_config=transformers.Qwen2_5_VLTextConfig(
            **{**_TEXT_CONFIG, "bos_token_id": None}, rope_parameters=dict(_QWEN_VL_ROPE)
        ),
        vision_config=transformers.Qwen2_5_VLVisionConfig(
            **_QWEN_VL_VISION_CONFIG,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=_TEXT_CONFIG["hidden_size"],
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        **_QWEN_VL_IDS,
    )


def _idefics3_config() -> transformers.PreTrainedConfig:
    return transformers.Idefics3Config(
        vision_config=transformers.Idefics3VisionConfig(
            **_VISION_CONFIG, image_size=32, patch_size=4, initializer_range=INITIALIZER_RANGE
        ),
        text_config=_llama_config(),
        image_token_id=IMAGE_ID,
        scale_factor=2,
    )


def _smolvlm_config() -> transformers.PreTrainedConfig:
    return transformers.SmolVLMConfig(
        vision_config=transformers.SmolVLMVisionConfig(
            **_VISION_CONFIG, image_size=32, patch_size=4, initializer_range=INITIALIZER_RANGE
        ),
        text_config=transformers.LlamaConfig(**{**_TEXT_CONFIG, "bos_token_id": None}),
        image_token_id=IMAGE_ID,
        scale_factor=4,
    )


def _gemma3_config() -> transformers.PreTrainedConfig:
    return transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(
            **_TEXT_CONFIG,
            head_dim=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
        vision_config=transformers.SiglipVisionConfig(
            **_VISION_CONFIG, image_size=32, patch_size=4, vision_use_head=False
        ),
        mm_tokens_per_image=16,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        image_token_index=IMAGE_ID,
        initializer_range=INITIALIZER_RANGE,
    )


def _clip_image_processor() -> transformers.BaseImageProcessor:
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def _llava_next_image_processor() -> transformers.BaseImageProcessor:
    return transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=_LLAVA_NEXT_GRID_PINPOINTS,
    )


def _qwen2_vl_image_processor() -> transformers.BaseImageProcessor:
    return transformers.Qwen2VLImageProcessorPil(
        min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2
    )


def _idefics3_image_processor() -> transformers.BaseImageProcessor:
    return transformers.Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )


def _smolvlm_image_processor() -> transformers.BaseImageProcessor:
    return transformers.SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )


def _gemma3_image_processor() -> transformers.BaseImageProcessor:
    return transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})


_FAMILY_SPECS: dict[str, _Family] = {
    "llama": _Family(transformers.LlamaForCausalLM, _llama_config, starts_with_bos=True),
    "qwen2": _Family(transformers.Qwen2ForCausalLM, _qwen2_config, starts_with_bos=False),
    "mistral": _Family(transformers.MistralForCausalLM, _mistral_config, starts_with_bos=True),
    "llava": _Family(
        transformers.LlavaForConditionalGeneration,
        _llava_config,
        starts_with_bos=True,
        image_processor=_clip_image_processor,
        vision_keys=("pixel_values",),
    ),
    "llava_next": _Family(
        transformers.LlavaNextForConditionalGeneration,
        _llava_next_config,
        starts_with_bos=True,
        image_processor=_llava_next_image_processor,
        vision_keys=("pixel_values", "image_sizes"),
    ),
    "qwen2_vl": _Family(
        transformers.Qwen2VLForConditionalGeneration,
        _qwen2_vl_config,
        starts_with_bos=False,
        image_processor=_qwen2_vl_image_processor,
        vision_keys=("pixel_values", "image_grid_thw"),
        token_type_key="mm_token_type_ids",
    ),
    "qwen2_5_vl": _Family(
        transformers.Qwen2_5_VLForConditionalGeneration,
        _qwen2_5_vl_config,
        starts_with_bos=False,
        image_processor=_qwen2_vl_image_processor,
        vision_keys=("pixel_values", "image_grid_thw"),
        token_type_key="mm_token_type_ids",
    ),
    "idefics3": _Family(
        transformers.Idefics3ForConditionalGeneration,
        _idefics3_config,
        starts_with_bos=True,
        image_processor=_idefics3_image_processor,
        vision_keys=("pixel_values", "pixel_attention_mask"),
        nested_images=True,
    ),
    "smolvlm": _Family(
        transformers.SmolVLMForConditionalGeneration,
        _smolvlm_config,
        starts_with_bos=False,
        image_processor=_smolvlm_image_processor,
        vision_keys=("pixel_values", "pixel_attention_mask"),
        nested_images=True,
    ),
    "gemma3": _Family(
        transformers.Gemma3ForConditionalGeneration,
        _gemma3_config,
        starts_with_bos=True,
        image_processor=_gemma3_image_processor,
        vision_keys=("pixel_values",),
        token_type_key="token_type_ids",
    ),
}


def build_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **text_config: Any
) -> transformers.PreTrainedModel:
    """Build the tiny random-initialised model of ``family`` on CPU, in eval mode, with SDPA attention.

    The weights depend only on ``seed`` (and on the shape ``text_config`` gives). ``text_config`` overrides
    attributes of the text decoder's config, e.g. ``sliding_window=6`` or ``num_hidden_layers`` with its
    ``layer_types``.
    """
    spec = _FAMILY_SPECS[family]
    torch.manual_seed(seed)
    config = spec.config()
    for name, value in text_config.items():
        setattr(config.get_text_config(), name, value)
    model = spec.model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    if family == "gemma3":
        # Gemma3 zero-initialises its vision-to-text projection, which would embed every image as zeros.
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=INITIALIZER_RANGE)
    return model.eval()


def image_token_id(model: transformers.PreTrainedModel) -> int | None:
    """The id whose runs in ``input_ids`` are the image positions, or None for a text-only model."""
    return getattr(model.config, "image_token_id", None)


def make_inputs(
    model: transformers.PreTrainedModel,
    family: str,
    prompts: Sequence[Prompt],
    *,
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, torch.Tensor]:
    """A padded batch of ``prompts`` for ``model(**inputs)`` and ``model.generate(**inputs)``.

    Holds ``input_ids`` and ``attention_mask`` (0 on padding, which uses ``PAD_ID``), plus what the family's
    processor adds: ``mm_token_type_ids`` (Qwen2-VL, Qwen2.5-VL) or ``token_type_ids`` (Gemma3), 1 on image
    tokens; and, when some prompt has an image, ``pixel_values`` (in the model's dtype) with ``image_sizes``
    (LLaVA-NeXT), ``image_grid_thw`` (Qwen2-VL, Qwen2.5-VL) or ``pixel_attention_mask`` (Idefics3, SmolVLM).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    spec = _FAMILY_SPECS[family]
    vision = _vision_inputs(spec, family, prompts, model.dtype)
    image_blocks = iter(_image_blocks(model.config, family, vision, sum(prompt.image for prompt in prompts)))

    rows = []
    for prompt in prompts:
        before, after = _text_ids(prompt, spec.starts_with_bos)
        rows.append(before + (next(image_blocks) if prompt.image else []) + after)

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, span] = 1

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if spec.token_type_key is not None:
        inputs[spec.token_type_key] = (input_ids == IMAGE_ID).long()
    return inputs | vision


def _vision_inputs(
    spec: _Family, family: str, prompts: Sequence[Prompt], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The image-processor outputs for the images of ``prompts``; empty when none has an image."""
    images = {index: _random_image(prompt.seed) for index, prompt in enumerate(prompts) if prompt.image}
    if not images:
        return {}
    if spec.image_processor is None:
        raise ValueError(f"{family} is a text-only family: its prompts need image=False")
    if spec.nested_images:
        batch_images: list[Any] = [[images[index]] if index in images else [] for index in range(len(prompts))]
    else:
        batch_images = list(images.values())
    processed = spec.image_processor()(batch_images, return_tensors="pt")
    vision = {key: processed[key] for key in spec.vision_keys}
    vision["pixel_values"] = vision["pixel_values"].to(dtype)
    return vision


def _random_image(seed: int) -> PIL.Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*SOURCE_IMAGE_SIZE, 3), generator=generator, dtype=torch.uint8)
    return PIL.Image.fromarray(pixels.numpy())


def _text_ids(prompt: Prompt, starts_with_bos: bool) -> tuple[list[int], list[int]]:
    """The text ids before and after the image of ``prompt``."""
    if starts_with_bos and prompt.before < 1:
        raise ValueError("this family starts every prompt with BOS, counted in `before`: it must be at least 1")
    generator = torch.Generator().manual_seed(prompt.seed)
    count = prompt.before + prompt.after - int(starts_with_bos)
    ids = torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (count,), generator=generator).tolist()
    if starts_with_bos:
        ids = [BOS_ID, *ids]
    return ids[: prompt.before], ids[prompt.before :]


def _image_blocks(
    config: transformers.PreTrainedConfig, family: str, vision: dict[str, torch.Tensor], image_count: int
) -> list[list[int]]:
    """The token ids standing for each of the ``image_count`` images in ``vision``, in order, as the family's
    processor writes them."""
    if image_count == 0:
        return []
    pixel_values = vision["pixel_values"]
    if family == "llava":
        height, width = pixel_values.shape[-2:]
        patch = config.vision_config.patch_size
        # CLIP's CLS feature is dropped by the "default" feature selection.
        count = (height // patch) * (width // patch) + (config.vision_feature_select_strategy == "full")
        return [[IMAGE_ID] * count] * image_count
    if family == "llava_next":
        return [
            [IMAGE_ID] * _llava_next_feature_count(config, (int(h), int(w)), pixel_values.shape[-2:])
            for h, w in vision["image_sizes"]
        ]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        merged = config.vision_config.spatial_merge_size**2
        return [
            [VISION_START_ID, *[IMAGE_ID] * (int(grid.prod()) // merged), VISION_END_ID]
            for grid in vision["image_grid_thw"]
        ]
    if family in ("idefics3", "smolvlm"):
        vision_config = config.vision_config
        seq_len = (vision_config.image_size // vision_config.patch_size) ** 2 // config.scale_factor**2
        block = [FAKE_TOKEN_AROUND_IMAGE_ID, GLOBAL_IMG_ID, *[IMAGE_ID] * seq_len, FAKE_TOKEN_AROUND_IMAGE_ID]
        return [block] * image_count
    if family == "gemma3":
        block = [DOUBLE_NEWLINE_ID, BOI_ID, *[IMAGE_ID] * config.mm_tokens_per_image, EOI_ID, DOUBLE_NEWLINE_ID]
        return [block] * image_count
    raise ValueError(f"{family} has no images")


def _llava_next_feature_count(
    config: transformers.PreTrainedConfig, image_size: tuple[int, int], crop_size: Sequence[int]
) -> int:
    """Image features of one LLaVA-NeXT image, as ``LlavaNextProcessor._get_number_of_features`` counts them.

    The base crop gives one feature per patch; the any-resolution grid gives one per patch of the tiled
    image once the padding added to keep its aspect ratio is cut away, plus one newline feature per row.
    """
    orig_height, orig_width = image_size
    crop_height, crop_width = crop_size
    best_height, best_width = select_best_resolution(image_size, config.image_grid_pinpoints)
    patch = config.vision_config.patch_size
    height = (crop_height // patch) * (best_height // crop_height)
    width = (crop_width // patch) * (best_width // crop_width)
    if orig_width / orig_height > width / height:
        padding = (height - int(round(orig_height * (width / orig_width), 7))) // 2
        height -= 2 * padding
    else:
        padding = (width - int(round(orig_width * (height / orig_height), 7))) // 2
        width -= 2 * padding
    base = (crop_height // patch) * (crop_width // patch) + (config.vision_feature_select_strategy == "full")
    return base + height * width + height
