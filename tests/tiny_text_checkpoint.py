"""A tiny random text model saved as a real checkpoint folder (model + a character-level tokenizer), so that
lm-eval's own loader and the `interventions` lm-eval model type load it by path like any hub model, offline."""

from __future__ import annotations

import string
from pathlib import Path

import transformers
from tiny_models import BOS_ID, EOS_ID, FIRST_TEXT_ID, PAD_ID, VOCAB_SIZE, build_model
from tokenizers import Tokenizer, decoders, models

#: one token per printable ASCII character (the shipped lm-eval tasks' text), unknown characters → <pad>
CHARACTERS = string.printable


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every character its own id in [FIRST_TEXT_ID, VOCAB_SIZE); specials as in `tiny_models`."""
    special = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}
    vocab = {name: i for i, name in special.items()}
    vocab.update({c: FIRST_TEXT_ID + i for i, c in enumerate(CHARACTERS)})
    assert max(vocab.values()) < VOCAB_SIZE
    core = Tokenizer(models.BPE(vocab={k: v for k, v in vocab.items()}, merges=[], unk_token="<pad>"))
    core.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": list(special.values())})
    return fast


def save_tiny_text_model(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """Write the tiny `family` model (`tiny_models.build_model`) and the character tokenizer to `folder`."""
    model = build_model(family, seed=seed)
    model.config.max_position_embeddings = 512
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder
