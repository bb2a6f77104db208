"""Decoding settings of `eval pope|chair`: greedy by default, changed with `--gen-kwargs` in lm-eval's convention
(`num_beams=5,do_sample=False`), checked by transformers' `GenerationConfig` before the model loads."""

from __future__ import annotations

from typing import Any

from interventions.errors import did_you_mean

#: keys that would change what `generate` returns rather than how it decodes (the runner scores one text a sample)
REFUSED = {
    "num_return_sequences": "the runner scores one answer per sample",
    "max_length": "it counts the prompt; use max_new_tokens",
    "return_dict_in_generate": "the runner reads only the generated ids",
    "output_scores": "the runner reads only the generated ids",
    "output_logits": "the runner reads only the generated ids",
    "output_attentions": "the runner reads only the generated ids",
    "output_hidden_states": "the runner reads only the generated ids",
}


def parse_gen_kwargs(text: str | None) -> dict[str, Any]:
    """`"num_beams=5,do_sample=False,temperature=0.7"` → `{"num_beams": 5, "do_sample": False, ...}`.

    Values: `true`/`false` (any case), `none`, integers and floats are converted, anything else stays a string.

    Raises:
        ValueError: an entry that is not `key=value`, a key twice, a key `GenerationConfig` does not know.
    """
    if not text or not text.strip():
        return {}
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}
    out: dict[str, Any] = {}
    for entry in text.split(","):
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--gen-kwargs: {entry.strip()!r} is not key=value (e.g. num_beams=5,do_sample=False)")
        if key in out:
            raise ValueError(f"--gen-kwargs gives {key} twice")
        if key not in known:
            raise ValueError(f"--gen-kwargs: unknown generation option {key!r}{did_you_mean(key, known)}")
        if key in REFUSED:
            raise ValueError(f"--gen-kwargs: {key} is not accepted here: {REFUSED[key]}")
        out[key] = _value(value.strip())
    return out


def decoding_settings(default_max_new_tokens: int, max_new_tokens: int | None = None,
                      gen_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of every `generate` call: greedy, the benchmark's token budget, then `gen_kwargs`.

    Raises:
        ValueError: `--max-new-tokens` and `--gen-kwargs max_new_tokens` both given, a count below 1, or a
            combination `GenerationConfig.validate` rejects (e.g. `temperature` without `do_sample=True`).
    """
    gen_kwargs = dict(gen_kwargs or {})
    if max_new_tokens is not None and "max_new_tokens" in gen_kwargs:
        raise ValueError("give max_new_tokens once: --max-new-tokens or --gen-kwargs max_new_tokens=...")
    settings = {"do_sample": False, "num_beams": 1,
                "max_new_tokens": max_new_tokens if max_new_tokens is not None else default_max_new_tokens,
                **gen_kwargs}
    for key in ("num_beams", "max_new_tokens"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    from transformers import GenerationConfig

    try:
        GenerationConfig(**settings).validate(strict=True)
    except ValueError as e:
        reason = " ".join(line.strip("- ") for line in str(e).splitlines()[1:] if line.strip()) or str(e)
        raise ValueError(f"decoding settings {settings} are invalid: {reason}") from None
    return settings


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
