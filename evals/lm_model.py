"""The lm-eval model type `interventions`: lm-eval's HF model with a method stack wrapped on it, and exact batches.

    lm_eval --model interventions --model_args pretrained=PATH_OR_BUILTIN,methods=act,params=params.json ...

lm-eval's own `HFLM` scores log-likelihoods on right-padded batches without an attention mask: harmless for an
unmodified causal model (a row never sees the padding after it) but not for methods that read token roles, since
padding would count as prompt rows (ACT's column means, the "last prompt row" of last-row methods). This class scores
each batch left-padded with its attention mask and matching position ids, so every sample has the masks and roles it
would have alone and any `batch_size` gives the per-sample log-likelihoods of batch size 1. Generation goes through
`HFLM.generate_until`, which already passes the mask of its left-padded batches.

Registered under `interventions` when this module is imported, and declared as an `lm_eval.models` entry point in
`pyproject.toml` for lm-eval releases that discover plugins; with lm-eval 0.4.13, which does not, run
`interventions lm-eval ...` (lm-eval's CLI after this import) or import this module before `simple_evaluate`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import interventions as iv

from .runner import MethodRun, parse_methods

MODEL_TYPE = "interventions"


@register_model(MODEL_TYPE)
class InterventionsLM(HFLM):
    """An `HFLM` whose model carries a method stack, scored with exact padded batches.

    Args:
        pretrained (`str` or `transformers.PreTrainedModel`): a hub id or local path (loaded by lm-eval's HF
            loader, with its `dtype`, `revision`, `device`, `parallelize`, ... options), `builtin:smollm2`, or a
            loaded model.
        methods (`str`, *optional*): one run as in `--methods`: `none`, a method, or a stack `a+b`; default: the
            stack of the saved config given as `params`, else `none`.
        params (`str`, `dict` or `MethodRun`, *optional*): parameters as `--params` takes them (JSON text, a JSON
            file `{"method": {...}}`, or a saved `interventions_config.json` / its folder), or an already parsed run.
        tokenizer: passed to `HFLM`; needed with a loaded model.
        **kwargs: every other `HFLM` option (`batch_size`, `max_length`, `dtype`, ...).

    Raises:
        ValueError: more than one run in `methods`, bad parameters, a config made for another model shape, or a
            vision-language model.
    """

    def __init__(self, pretrained: Any, methods: str | None = None, params: Any = None, tokenizer: Any = None,
                 **kwargs: Any) -> None:
        run = params if isinstance(params, MethodRun) else _one_run(methods, params)
        if isinstance(pretrained, str) and pretrained.startswith("builtin:"):
            from .loading import load_model

            loaded = load_model(pretrained, kwargs.pop("dtype", "float32") or "float32")
            if loaded.has_images:
                raise ValueError(f"the lm-eval model type {MODEL_TYPE!r} runs text-only models; {pretrained} is a VLM")
            pretrained, tokenizer = loaded.model, tokenizer or loaded.processor
        if kwargs.get("device") is None:  # HFLM's default is "cuda", which fails on a machine without one
            kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"the lm-eval model type {MODEL_TYPE!r} runs decoder-only models; got {self.backend}")
        self.run = run
        self.handle = iv.wrap(self.model, run.wrap_target()) if run.stack else None

    def close(self) -> None:
        """Unwrap the model (it is then the unmodified model again). Safe to call twice."""
        if self.handle is not None:
            self.handle.unwrap()

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        """`(log p(continuation | context), continuation is greedy)` per request, in request order, from
        left-padded batches with their attention mask (longest first, as lm-eval orders them)."""
        size = override_bs or (self._detect_batch_size() if self.batch_size == "auto" else int(self.batch_size))
        rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            logprobs = F.log_softmax(self._masked_logits([rows[i] for i in batch]), dim=-1, dtype=self.softmax_dtype)
            width = logprobs.shape[1]
            for b, i in enumerate(batch):
                key, _, continuation = requests[i]
                target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
                scores = logprobs[b, width - len(continuation):]
                answer = (float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results  # type: ignore[return-value]

    def _masked_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits `(batch, longest, vocab)` of left-padded `rows`, each with the positions it has alone."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def _one_run(methods: str | None, params: Any) -> MethodRun:
    """The single run of `methods` and `params` (a saved config alone gives its own stack)."""
    if isinstance(params, dict):
        import json

        params = json.dumps(params)
    if methods is None:
        runs = parse_methods(None, params) if params is not None else [MethodRun("none")]
    else:
        runs = parse_methods(str(methods), params)
    if len(runs) != 1:
        raise ValueError(f"model_args methods= names one run (none, a method, or a stack a+b); got {methods!r}")
    return runs[0]
