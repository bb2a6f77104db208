"""The organism's model and processor: a real `LlavaForConditionalGeneration` (CLIP tower 64 wide, 3 layers;
Llama decoder 128 wide, 4 layers, 4 query / 2 key-value heads, RoPE, tied embeddings), a word-level tokenizer
built with `tokenizers`, a chat template and a CLIP image processor, saved as an ordinary HF model folder.

The prompt layout is ``<s> <image>×36 is there a apple`` → ``yes </s>`` and ``<s> <image>×36 describe the image .``
→ ``apple cake </s>``. The generation prompt adds nothing: the answer is read right after the question's last
word (organism.md: a "?" or another token between the object word and the answer stopped presence learning).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from .world import IMAGE_SIZE, WORDS

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<s>", "</s>", "<image>", "<unk>"
SPECIAL = (PAD, BOS, EOS, IMAGE, UNK)
PROMPT_WORDS = ("is", "there", "a", "describe", "the", "image", ".", "yes", "no")
VOCAB: tuple[str, ...] = SPECIAL + PROMPT_WORDS + WORDS
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 36: CLIP's CLS feature is dropped ("default" strategy)
PRESENCE_PROMPT = "is there a {}"
DESCRIBE_PROMPT = "describe the image ."
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if m['content'] is string %} {{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endif %}{% endfor %}"
)  # the generation prompt is empty on purpose (see the module docstring)
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer over `VOCAB` (whitespace split; unknown words → ``<unk>``) with the chat template."""
    core = Tokenizer(models.WordLevel(dict(TOKEN_ID), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                                unk_token=UNK, extra_special_tokens={"image_token": IMAGE})
    fast.add_tokens([IMAGE], special_tokens=True)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor() -> transformers.LlavaProcessor:
    """`LlavaProcessor`: CLIP image processor at 48 × 48 (no resize or crop needed) + the tokenizer."""
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.LlavaProcessor(image_processor, build_tokenizer(), patch_size=PATCH_SIZE,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=CHAT_TEMPLATE)


def build_config() -> transformers.LlavaConfig:
    """The organism's `LlavaConfig` (0.93 M parameters)."""
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                           projection_dim=64)
    text = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=384,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, rope_theta=10_000.0, tie_word_embeddings=True,
                                    pad_token_id=TOKEN_ID[PAD], bos_token_id=TOKEN_ID[BOS],
                                    eos_token_id=TOKEN_ID[EOS])
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=TOKEN_ID[IMAGE],
                                     vision_feature_layer=-1, vision_feature_select_strategy="default",
                                     projector_hidden_act="gelu", tie_word_embeddings=True)


def generation_config() -> transformers.GenerationConfig:
    """Greedy, stops at ``</s>``; tokens that are never an answer (the image token above all: emitting it would
    crash the next forward) are suppressed."""
    never = [TOKEN_ID[t] for t in (PAD, BOS, IMAGE, UNK)]
    return transformers.GenerationConfig(do_sample=False, eos_token_id=TOKEN_ID[EOS], pad_token_id=TOKEN_ID[PAD],
                                         bos_token_id=TOKEN_ID[BOS], suppress_tokens=never, max_new_tokens=8)


def build_model(seed: int) -> transformers.LlavaForConditionalGeneration:
    """A freshly initialised model (weights depend only on `seed`)."""
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(build_config())
    model.generation_config = generation_config()
    return model


# CLIP's normalisation, as the image processor applies it (rescale 1/255, then (x - mean) / std)
_MEAN = np.array(transformers.CLIPImageProcessorPil().image_mean, dtype=np.float32)
_STD = np.array(transformers.CLIPImageProcessorPil().image_std, dtype=np.float32)


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """`(batch, 3, 48, 48)` float32 pixels, equal to the processor's output for 48 × 48 images (tested)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(((arr - _MEAN) / _STD).transpose(0, 3, 1, 2).copy())


def prompt_ids(text: str) -> list[int]:
    """Token ids of a full prompt: ``<s>``, the expanded image, then the words of `text` (as the processor does)."""
    return [TOKEN_ID[BOS]] + [TOKEN_ID[IMAGE]] * IMAGE_TOKENS + [TOKEN_ID[w] for w in text.split()]


def save(model: transformers.LlavaForConditionalGeneration, folder: Path, provenance: dict) -> None:
    """Write the model, processor, generation config and a provenance note to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_processor().save_pretrained(folder)
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
