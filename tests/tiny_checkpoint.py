"""A tiny LLaVA saved as a real checkpoint folder (model + processor with a word-level tokenizer and a chat
template), so the eval runner and CLI can load it by path like any hub model, offline."""

from __future__ import annotations

from pathlib import Path

import transformers
from tiny_models import BOS_ID, EOS_ID, FIRST_TEXT_ID, IMAGE_ID, PAD_ID, VOCAB_SIZE, build_model
from tokenizers import Tokenizer, models, pre_tokenizers

#: words the POPE / CHAIR prompts and answers use, so that prompts tokenize to distinct ids
WORDS = ("USER: ASSISTANT: is there a an the in image ? yes no . , please describe this detail answer question using single word or "
         "phrase person dog cat car chair table").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    special = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>", IMAGE_ID: "<image>"}
    names = [special.get(i, f"w{i}") for i in range(VOCAB_SIZE)]
    for offset, word in enumerate(WORDS):
        names[FIRST_TEXT_ID + offset] = word
    vocab = {name: i for i, name in enumerate(names)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    fast.add_tokens(list(special.values()), special_tokens=True)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llava(folder: Path) -> Path:
    """Write model + processor to `folder` and return it."""
    model = build_model("llava")
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16,
                                                                                                "width": 16})
    processor = transformers.LlavaProcessor(image_processor, tokenizer(), patch_size=4,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=CHAT_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
