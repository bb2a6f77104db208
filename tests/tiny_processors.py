"""Real processor classes for the tiny VLMs of `tiny_models`, built offline: a word-level tokenizer that maps each
family's special tokens to the tiny id layout, and the family's own image processor.

SmolVLM's processor needs the `num2words` package; without it `build_processor("smolvlm")` raises ImportError.
The Qwen2-VL and SmolVLM processor classes insist on a video processor, which needs torchvision; the check is
skipped while they are built (images only).
"""

from __future__ import annotations

import functools

from typing import Any
from unittest import mock

import tiny_models as tm
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.processing_utils import ProcessorMixin

#: words of the test prompts, given distinct ids from `FIRST_TEXT_ID` on
WORDS = ("what is in the image ? write a general description of answer question using single word or phrase . "
         "red square where USER: ASSISTANT: Question 0 1").split()

_QWEN = {tm.IMAGE_ID: "<|image_pad|>", tm.VIDEO_ID: "<|video_pad|>", tm.VISION_START_ID: "<|vision_start|>",
         tm.VISION_END_ID: "<|vision_end|>"}
_IDEFICS3 = {tm.IMAGE_ID: "<image>", tm.FAKE_TOKEN_AROUND_IMAGE_ID: "<fake_token_around_image>",
             tm.GLOBAL_IMG_ID: "<global-img>", 12: "<end_of_utterance>"}
SPECIAL: dict[str, dict[int, str]] = {
    "llava": {tm.IMAGE_ID: "<image>"},
    "llava_next": {tm.IMAGE_ID: "<image>"},
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "gemma3": {tm.IMAGE_ID: "<image_soft_token>", tm.BOI_ID: "<start_of_image>", tm.EOI_ID: "<end_of_image>",
               tm.DOUBLE_NEWLINE_ID: "\n\n"},
}
#: the text a user writes where the image goes
PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>"}


def tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny vocabulary, with `family`'s special tokens at their tiny ids."""
    special = {tm.PAD_ID: "<pad>", tm.BOS_ID: "<s>", tm.EOS_ID: "</s>", **SPECIAL[family]}
    names = [special.get(i, f"w{i}") for i in range(tm.VOCAB_SIZE)]
    for offset, word in enumerate(WORDS):
        names[tm.FIRST_TEXT_ID + offset] = word
    core = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra: dict[str, Any] = {}
    if family == "gemma3":
        extra["extra_special_tokens"] = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                         "eoi_token": "<end_of_image>"}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", **extra)
    fast.add_tokens(list(special.values()), special_tokens=True)
    return fast


def build_processor(family: str) -> ProcessorMixin:
    """The processor of `family` for the tiny model of `tiny_models.build_model(family)`."""
    image_processor = tm._FAMILY_SPECS[family].image_processor()
    tok = tokenizer(family)
    if family in ("llava", "llava_next"):
        cls = transformers.LlavaProcessor if family == "llava" else transformers.LlavaNextProcessor
        return cls(image_processor, tok, patch_size=4, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        cls = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        with _without_video_check():
            return cls(image_processor, tok, video_processor=None)
    if family == "idefics3":
        return transformers.Idefics3Processor(image_processor, tok, image_seq_len=16)
    if family == "smolvlm":
        with _without_video_check():
            return transformers.SmolVLMProcessor(image_processor, tok, video_processor=None, image_seq_len=4)
    if family == "gemma3":
        return transformers.Gemma3Processor(image_processor, tok, image_seq_length=16)
    raise ValueError(f"{family} has no image processor")


def _without_video_check() -> Any:
    """Skip the class check of a missing video processor (it needs torchvision, which the tests do without)."""
    check = ProcessorMixin.check_argument_for_proper_class

    def skip_video(self, name, arg):
        return None if name == "video_processor" else check(self, name, arg)

    return mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", skip_video)


def prompt_inputs(processor: ProcessorMixin, family: str, image: Any, question: str) -> dict[str, Any]:
    """`processor` outputs for one prompt: BOS (where the family has one), the image, then `question`."""
    bos = "<s> " if tm._FAMILY_SPECS[family].starts_with_bos else ""
    images = [[image]] if tm._FAMILY_SPECS[family].nested_images else [image]
    return dict(processor(text=[f"{bos}{PLACEHOLDER.get(family, '<image>')} {question}"], images=images,
                          return_tensors="pt"))


def batch_inputs(processor: ProcessorMixin, family: str, images: list[Any], questions: list[str],
                 padding_side: str = "left") -> dict[str, Any]:
    """`processor` outputs for a padded batch of one-image prompts laid out as `prompt_inputs` lays out one."""
    bos = "<s> " if tm._FAMILY_SPECS[family].starts_with_bos else ""
    nested = [[image] for image in images] if tm._FAMILY_SPECS[family].nested_images else list(images)
    saved, processor.tokenizer.padding_side = processor.tokenizer.padding_side, padding_side
    try:
        return dict(processor(text=[f"{bos}{PLACEHOLDER.get(family, '<image>')} {q}" for q in questions],
                              images=nested, return_tensors="pt", padding=True))
    finally:
        processor.tokenizer.padding_side = saved


@functools.cache
def shared_processor(family: str) -> ProcessorMixin:
    """One `build_processor(family)` per test session (processors are not modified by the tests)."""
    return build_processor(family)


def random_image(seed: int = 0, size: tuple[int, int] = (20, 28)) -> Any:
    """A reproducible random RGB image of `size` (height, width)."""
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))
