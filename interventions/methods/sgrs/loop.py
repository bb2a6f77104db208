"""SGRS's decoding loop, run by transformers as `custom_generate` inside the user's own `model.generate`.

It follows transformers' `_sample` (same prefill, input preparation, logits processors, stopping criteria, padding
of finished samples, `return_dict_in_generate` outputs); only the token choice differs (`select.choose`), and
the forwards that feed it run with gradients enabled for the saliency.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ...errors import InputError
from .method import CandidateSaliency
from .select import History, Sampler, choose, sample_seeds

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    from .method import Sgrs


def generate(method: Sgrs, model: Any, input_ids: torch.Tensor, logits_processor: LogitsProcessorList,
             stopping_criteria: StoppingCriteriaList, generation_config: GenerationConfig,
             **model_kwargs: Any) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Generate with SGRS; the signature of a transformers `custom_generate` callable (as `GenerationMixin._sample`).

    Returns:
        The sequences `(batch, prompt + new)`, or a `GenerateDecoderOnlyOutput` with `return_dict_in_generate=True`
        (`scores` and `logits` as transformers records them; attentions and hidden states are not offered).
    """
    cfg = method.config
    _check(generation_config, input_ids)
    probe = bool(method.touched_layers)  # alpha > 0: the saliency is needed
    batch, device = input_ids.shape[0], input_ids.device
    pad = generation_config._pad_token_tensor
    pad = None if pad is None else pad.to(device)
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    use_cache = model_kwargs.get("use_cache", True)
    keep = generation_config.return_dict_in_generate
    scores_out = () if keep and generation_config.output_scores else None
    logits_out = () if keep and generation_config.output_logits else None
    seeds = None if cfg.seed is None else sample_seeds(cfg.seed, input_ids, model_kwargs.get("attention_mask"))
    draw = Sampler(generation_config.do_sample, seeds, device)
    history = History(batch, cfg.window, cfg.alpha, device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    method.stats = {"steps": 0, "rejected": 0, "fallbacks": 0}

    cache = model_kwargs.get("cache")
    if probe and use_cache and cache is not None:
        cache.activate_past_recording()  # sliding-window layers keep what the first step's `crop(-1)` needs
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    first = True
    while True:
        with method.probing() if probe else contextlib.nullcontext() as probes:
            if not first:
                inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1 if use_cache else None,
                                                             **model_kwargs)
                outputs = model(**inputs, return_dict=True)
            graph = outputs
            if first and probe:  # the prefill kept no graph: re-feed its last token, on the rolled-back cache
                graph = _refeed_last_token(model, input_ids, {**model_kwargs, "cache": outputs.get("cache")},
                                           use_cache)
            model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
            logits = outputs.logits[:, -1].detach().to(copy=True, dtype=torch.float32, device=device)
            scores = logits_processor(input_ids, logits)
            if scores_out is not None:
                scores_out += (scores,)
            if logits_out is not None:
                logits_out += (logits,)
            active = unfinished.clone()
            step_saliency = CandidateSaliency(probes, graph.logits[:, -1]) if probe else None
            choice = choose(scores, cfg.top_k, cfg.retries, draw, active, history.thresholds(), step_saliency)
        outputs = graph = step_saliency = None  # free the step's graph
        if probe:
            _release_cache(model_kwargs.get("cache"))
            history.add(choice.saliency, active & (choice.accepted | cfg.history_includes_fallback))
        method.stats["steps"] += 1
        method.stats["rejected"] += int(choice.rejected.sum())
        method.stats["fallbacks"] += int((active & ~choice.accepted).sum())
        tokens = torch.where(unfinished, choice.tokens, pad) if has_eos else choice.tokens
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished &= ~stopping_criteria(input_ids, scores_out)
        first = False
        if not unfinished.any():
            break

    if not keep:
        return input_ids
    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores_out, logits=logits_out,
                                     cache=model_kwargs.get("cache"))


def _check(generation_config: GenerationConfig, input_ids: torch.Tensor) -> None:
    if (generation_config.num_beams or 1) > 1:
        raise InputError("sgrs samples one token per sequence and step; beam search (num_beams > 1) is not supported")
    if generation_config.return_dict_in_generate and (generation_config.output_attentions
                                                      or generation_config.output_hidden_states):
        raise InputError("sgrs's decoding loop does not return attentions or hidden states; call the model itself")
    if input_ids.shape[1] == 0:
        raise InputError("sgrs needs input_ids (the token roles and the saliency's keys come from them), "
                         "not inputs_embeds alone")


def _refeed_last_token(model: Any, input_ids: torch.Tensor, model_kwargs: dict, use_cache: bool) -> Any:
    """Run the prompt's last token again, so that the forward predicting the first token has a graph: with a cache,
    after dropping that token from it (`Cache.crop(-1)`); without one, the whole prompt again."""
    if use_cache:
        model_kwargs["cache"].crop(-1)
    inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1 if use_cache else None,
                                                 **model_kwargs)
    return model(**inputs, return_dict=True)


def _release_cache(cache: Any) -> None:
    """Trim sliding-window layers back to their window (`crop(0)` ends a step while past states are recorded) and
    drop the graph that the keys and values written by a grad-enabled forward carry."""
    if cache is None:
        return
    cache.crop(0)
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                setattr(layer, name, tensor.detach())

