"""CARVE, contrastive attention refinement for visual enhancement (Ge et al., arXiv 2509.06461), to
shared/specs/carve.md.

Inside the user's own `model.generate(**inputs)` (a `decoding_loop`), for each prompt (one image each; a batch runs
prompt by prompt, its rows right-padded to one width):
1. passes Q and G: greedy generation (≤ `capture_new_tokens`, each up to its EOS) of the prompt (Q) and of the
   prompt with its question replaced by the general instruction (G); at every step, in each of `layers`, the last
   row's attention over the image tokens, mean over heads. The rows are read-only, so pass Q's answer is the
   unmodified model's. What the two share is computed once: the image encoding (for one prompt without beams the
   user's own `generate` call already made it, so the vision tower does not run again) and the prefill of the
   prompt up to the question (its KV cache is repeated for both); the two tails and their generations then run as
   one batch of two;
2. `Â = A_Q / (A_G + λ)` over the paired steps, fused `Σ_t w_t Σ_l Â`, mapped onto the image the model saw through
   the family's token grids, thresholded at the top `keep` fraction of pixels (spec: `top_percent`), the top
   `regions` kept, the rest blacked out, cropped and magnified (`refine`);
3. pass F: the user's generation (their generation config: sampling, beams, number of new tokens) on the prompt
   with the refined image (or the original and the refined image, `final_images="original+refined"`), spliced
   in at token level with the processor (`prompts`).
The returned sequences are the user's prompt followed by pass F's new tokens. `Carve.results` (one per prompt of the
last call; `Carve.result` is the last) hold the map, the mask, the box, both images and the captured rows;
`CarveResult.overlay()` draws the mask. Other methods of a stack act in all three passes.

The image to refine: the original, when given as `model.generate(**inputs, images=image)` (as in the paper, which
crops the original file: more pixels to magnify from); else the image the model saw, rebuilt exactly from the
processor's `pixel_values` (the family adapter's `Layout.pixel_view`), so that a plain `generate(**inputs)` works.
A plain forward (`model(**inputs)`) is unchanged: CARVE acts only through `generate`.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.generation.utils import GENERATION_MODES_MAPPING

from ...core.branch import MAIN
from ...core.params import (
    MethodConfig,
    boolean,
    choice,
    int_list,
    number,
    optional,
    param,
    text,
)
from ...errors import ConfigError, InputError
from ..base import AttentionCall, Method, ModelInfo, RowRequest, layer_range, register
from . import prompts
from .refine import (
    contrast,
    fuse,
    keep_regions,
    overlay,
    pixel_map,
    refine,
    threshold,
)

#: decoder layers read by default, 0-based inclusive 20..25 [code] DEFAULT_LAYERS
DEFAULT_LAYERS = range(20, 26)
#: pass G results kept with `cache_general` (least recently used dropped first)
_CACHE_SIZE = 64


@dataclass(frozen=True)
class CarveConfig(MethodConfig):
    """Config of `carve` (`keep` is the spec's `top_percent` p, `regions` its `max_regions` K; the short names are the
    issue's public API). Neutral: `keep = 1.0` (every pixel kept, no crop: with `final_images="refined"`
    the capture passes are skipped and `generate` is the unmodified model's)."""

    NAME = "carve"
    STRENGTH = "keep"
    NEUTRAL = 1.0

    keep: float = param(0.2, "fraction p of the pixels kept by the threshold S >= percentile(S, 100(1-p)) (the "
                        "spec's top_percent)", "[code] top_percent 0.2; [paper] best p in [0.2, 0.6] (Fig. 7)",
                        number(0.0, 1.0, lo_open=True))
    regions: int = param(3, "K: connected regions kept (a maximum in 'max' mode, a minimum in 'official_min'; the "
                         "spec's max_regions)", "[paper] K in {2, 3}; [code] min_keep_regions=3",
                         number(1, integer=True))
    region_count_mode: str = param("max", "'max': keep the top min(K, n) regions (paper); 'official_min': keep "
                                   "max(K, int(n·p)) (official code)", "[paper] §4; [code] masking.py",
                                   choice("max", "official_min"))
    layers: tuple | None = param(None, "decoder layers whose last-row attention is read; None = 20..25, or on a model "
                                 "with fewer than 26 layers the same relative depth [floor(20L/32), ceil(26L/32))",
                                 "[code] DEFAULT_LAYERS = range(20, 26) (32-layer LLaVA-1.5); [paper] Table 2; "
                                 "[project] relative depth for smaller models, unvalidated",
                                 optional(int_list()))
    lam: float = param(1e-8, "λ in A_Q / (A_G + λ)", "[code] 1e-8; [paper] Eq. 4.6", number(0.0, lo_open=True))
    time_steps: str = param("full", "step weights: 'full' w_t = t+1, 'start' first step, 'end' last paired step "
                            "(paper's t_end; no such option in the code)", "[paper] §4.3, Table 1; [code] v4",
                            choice("full", "start", "end"))
    final_images: str = param("refined", "images of the final pass: the 'refined' image only (paper Alg. 1) or "
                              "'original+refined' (official code, ViCrop's two-image protocol)",
                              "[paper] Alg. 1; [code] pipeline.py", choice("refined", "original+refined"))
    capture_new_tokens: int = param(32, "greedy tokens of each capture pass (stops earlier at EOS)",
                                    "[code] max_new_tokens=32", number(1, integer=True))
    cache_general: bool = param(False, "keep pass G's rows per (image, general prompt) and reuse them for later "
                                "questions on the same image (pass Q then runs alone)",
                                "[paper] App. C (up to 1.59× faster with several questions per image); spec §5",
                                boolean)
    general_prompt: str = param("Write a general description of the image.", "instruction of pass G",
                                "[code]; [paper] App. D", text)
    answer_suffix: str = param("Answer the question using a single word or phrase.", "appended to the general "
                               "instruction (the official code also appends it to the task question: write it "
                               "into your own prompt for fidelity)", "[code] pipeline.py", text)

    @property
    def is_neutral(self) -> bool:
        """True at `keep = 1` with the refined image alone (the final pass is then the user's prompt)."""
        return self.keep == 1.0 and self.final_images == "refined"


@dataclass(frozen=True)
class CarveResult:
    """What CARVE computed for the last prompt.

    Attributes:
        image (`PIL.Image.Image`): the image refined: the original given as `generate(images=...)`, else the image
            the model saw (rebuilt from `pixel_values`).
        saliency (`np.ndarray` of shape `(height, width)`): the fused contrast map S over `image`.
        mask (`np.ndarray` of shape `(height, width)`, bool): the kept pixels.
        box (`tuple[int, int, int, int]`): `(left, top, right, bottom)` crop of `image`.
        refined (`PIL.Image.Image`): the masked, cropped and magnified image of the final pass.
        answer_ids (`torch.LongTensor`): the tokens of pass Q (the baseline answer).
        task_attention (`torch.Tensor` of shape `(steps_q, layers, image_tokens)`): pass Q's head-mean last rows
            over the image tokens, layers in increasing order.
        general_attention (`torch.Tensor` of shape `(steps_g, layers, image_tokens)`): the same for pass G.
    """

    image: PIL.Image.Image
    saliency: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int]
    refined: PIL.Image.Image
    answer_ids: torch.Tensor
    task_attention: torch.Tensor
    general_attention: torch.Tensor

    def overlay(self, alpha: float = 0.5) -> PIL.Image.Image:
        """`image` with the dropped pixels tinted red; `.save("mask.png")` writes the PNG."""
        return overlay(self.image, self.mask, alpha)


@register
class Carve(Method):
    """Three-pass contrastive attention crop; see `CarveConfig` and the module docstring."""

    config_class = CarveConfig
    needs = frozenset({"rows", "decoding_loop"})
    needs_processor = True
    needs_image_family = True

    def use_processor(self, processor: Any) -> None:
        missing = [a for a in ("image_processor", "tokenizer") if getattr(processor, a, None) is None]
        if missing or getattr(processor, "image_token", None) is None:
            raise ConfigError(f"carve: processor={type(processor).__name__} is not a VLM processor (needs "
                              "image_processor, tokenizer and image_token); pass AutoProcessor.from_pretrained(...)")
        self.processor = processor

    def bind(self, model: ModelInfo) -> None:
        cfg: CarveConfig = self.config
        default = DEFAULT_LAYERS
        if model.num_layers < DEFAULT_LAYERS.stop:  # the official layers' relative depth in LLaVA-1.5's 32 layers
            default = range(20 * model.num_layers // 32, -(-26 * model.num_layers // 32))
        self.layers = layer_range(model, "carve", cfg.layers, default)
        self.touched_layers = self.layers
        self._layout, self._model_config = model.layout, model.config
        self._image_id = int(getattr(model.config, "image_token_id", None) or model.config.image_token_index)
        tokenizer = self.processor.tokenizer
        probe = prompts.image_block(self.processor, [PIL.Image.new("RGB", (32, 32))], model.layout.nests_images)
        if not bool((probe["input_ids"] == self._image_id).any()):
            written = sorted(set(probe["input_ids"][0].tolist()))
            raise ConfigError(f"carve: the processor writes an image as ids {written}, without the model's "
                              f"image_token_id {self._image_id}; pass this model's processor")
        self._general_ids = torch.tensor(tokenizer(f"{cfg.general_prompt} {cfg.answer_suffix}".strip(),
                                                   add_special_tokens=False)["input_ids"], dtype=torch.long)
        plain = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, self._image_id}
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._special = special - plain
        self._suffix = prompts.template_suffix(self.processor)
        self._pixels: dict[str, Any] = {}
        self._capture: dict[int, list[torch.Tensor]] | None = None
        self._general_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._running = False
        self.results: list[CarveResult] = []

    # ---- capture rows ----------------------------------------------------------------------------------------
    def read_inputs(self, inputs: Any) -> None:
        if not self._running and inputs.get("pixel_values") is not None:
            self._pixels = {key: inputs[key] for key in self._layout.pixel_inputs if inputs.get(key) is not None}

    def request(self, call: AttentionCall) -> RowRequest | None:
        if self._capture is None or call.stream != MAIN:
            return None
        rows = torch.zeros(call.query_positions.numel(), dtype=torch.bool, device=call.query_positions.device)
        rows[-1] = True
        return RowRequest(rows, read_only=True)

    def edit(self, call: AttentionCall, view: Any, request: RowRequest) -> None:
        row = int((view.rows == call.query_positions[-1]).nonzero()[0, 0])
        image = call.roles.prompt_image
        probs = view.probs()[:, :, row]  # (batch, heads, kv_len)
        self._capture[call.layer].append(torch.stack([probs[b][:, image[b]].mean(0) for b in range(len(probs))]))

    # ---- the three passes ------------------------------------------------------------------------------------
    def decoding_loop(self, model: Any, input_ids: torch.Tensor, logits_processor: Any = None,
                      stopping_criteria: Any = None, generation_config: Any = None, images: Any = None,
                      **model_kwargs: Any) -> Any:
        """The transformers `custom_generate` callable installed in the user's `generate` (see module docstring).

        `images` (`PIL.Image.Image`, or a list with one per prompt, *optional*): the original images the processor
        was given, passed as `model.generate(**inputs, images=image)`; CARVE then maps, crops and magnifies them at
        their own resolution instead of the images rebuilt from `pixel_values`.
        """
        if self.config.is_neutral:
            mode = getattr(type(model), GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])
            return mode(model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                        generation_config=generation_config, **model_kwargs)
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        batch = input_ids.shape[0] // expand
        if batch > 1 and generation_config.return_dict_in_generate:
            raise InputError(f"carve: a batch of {batch} prompts runs prompt by prompt, whose generate outputs "
                             "cannot be merged into one dict; use return_dict_in_generate=False or one prompt per call")
        originals = _originals(images, batch)
        self._running, self.results = True, []
        try:
            outs = []
            for b in range(batch):
                first = b * expand  # generate repeats each prompt `expand` times in a row
                own = {key: value[first:first + 1] for key, value in model_kwargs.items()
                       if isinstance(value, torch.Tensor) and value.shape[:1] == input_ids.shape[:1]}
                if batch == 1 and expand == 1:
                    own["mm_encoder_outputs"] = model_kwargs.get("mm_encoder_outputs")
                pixels = self._pixels if batch == 1 else self._layout.sample_pixels(self._pixels, b, batch, "carve")
                inputs = self._run(model, input_ids[first:first + 1], own, pixels, originals[b])
                out = model.generate(**inputs, generation_config=_final_config(generation_config,
                                                                                input_ids.shape[1]))
                outs.append(_with_user_prompt(out, input_ids[first:first + expand], inputs["input_ids"].shape[1]))
        finally:
            self._running, self._pixels = False, {}
        if batch == 1:
            return outs[0]
        pad = generation_config.pad_token_id
        pad = pad if pad is not None else _first(generation_config.eos_token_id)
        width = max(out.shape[1] for out in outs)
        return torch.cat([torch.nn.functional.pad(out, (0, width - out.shape[1]), value=pad) for out in outs])

    @property
    def result(self) -> CarveResult | None:
        """What CARVE computed for the last prompt of the last `generate` call (`results` holds every prompt)."""
        return self.results[-1] if self.results else None

    def _run(self, model: Any, input_ids: torch.Tensor, model_kwargs: dict[str, Any], pixels: dict[str, Any],
             original: PIL.Image.Image | None) -> dict[str, Any]:
        """Passes Q and G and the refinement of one prompt (`input_ids` and `model_kwargs` of batch 1; with
        `mm_encoder_outputs` when the user's call encoded this image alone); returns the inputs of pass F."""
        cfg: CarveConfig = self.config
        mask = model_kwargs.get("attention_mask")
        valid = torch.ones_like(input_ids[0], dtype=torch.bool) if mask is None else mask[0].bool()
        ids = input_ids[0][valid]
        per_position = {key: value[0][valid] for key, value in model_kwargs.items()
                        if key not in ("attention_mask", "position_ids") and isinstance(value, torch.Tensor)
                        and value.shape == input_ids.shape}
        view = self._layout.pixel_view(self._model_config, self.processor.image_processor, pixels, "carve")
        nested = self._layout.nests_images
        prompt = prompts.split_prompt(ids, per_position, prompts.image_block(self.processor, [view.image], nested),
                                      self._image_id, self._special, self._suffix)
        task_inputs = {"input_ids": ids[None], **{key: value[None] for key, value in per_position.items()}}
        general_inputs = prompts.general_inputs(prompt, self._general_ids)
        key = _cache_key(general_inputs["input_ids"], pixels) if cfg.cache_general else None
        cached = key is not None and key in self._general_cache
        batch = [task_inputs] if cached else [task_inputs, general_inputs]
        # passes Q and G see the same image: it is encoded once (reusing the user's call's encoding when there is
        # one) in the prefill of their shared prefix, which the two continue as one batch
        vision = dict(pixels)
        if model_kwargs.get("mm_encoder_outputs"):
            vision.pop("pixel_values")  # the layout inputs stay: Qwen2-VL's M-RoPE positions need image_grid_thw
            vision["mm_encoder_outputs"] = model_kwargs["mm_encoder_outputs"]
        captured = self._capture_passes(model, batch, vision, prompt.question[0])
        task, answer = captured[0]
        general = self._general_cache[key] if cached else captured[1][0]
        if key is not None:
            self._general_cache[key] = general
            self._general_cache.move_to_end(key)
            while len(self._general_cache) > _CACHE_SIZE:
                self._general_cache.popitem(last=False)
        con = contrast(task, general, cfg.lam)
        image, placed = view.image, view.placed
        if original is not None:
            image = original
            placed = self._layout.on_original(view, self.processor.image_processor, (image.height, image.width))
        saliency = pixel_map(fuse(con, cfg.time_steps), placed, (image.height, image.width))
        kept = keep_regions(saliency, threshold(saliency, cfg.keep), cfg.regions, cfg.region_count_mode,
                            cfg.keep)
        refined, box = refine(image, kept)
        self.results.append(CarveResult(image, saliency, kept, box, refined, answer, task, general))
        images = [refined] if cfg.final_images == "refined" else [image, refined]
        blocks = [prompts.image_block(self.processor, [one], nested) for one in images]
        together = blocks[0] if len(images) == 1 else prompts.image_block(self.processor, images, nested)
        final = prompts.final_inputs(prompt, blocks, together)
        return {name: _to_model(value, model) for name, value in final.items()}

    def _capture_passes(self, model: Any, batch: list[dict[str, torch.Tensor]], vision: dict[str, Any],
                        shared: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Greedy generation of the prompts of `batch` (one image, `vision`, in their first `shared` tokens) with
        the last rows recorded; per prompt, `(steps, layers, image tokens)` up to its first EOS and its new tokens.

        Several prompts: the shared prefix is prefilled once, its cache repeated for each prompt, and the rest of
        each prompt (left-padded after the prefix) generated as one batch."""
        extra: dict[str, Any] = {}
        if len(batch) == 1:
            inputs = {**batch[0], "attention_mask": torch.ones_like(batch[0]["input_ids"]), **vision}
        else:
            prefix = {key: value[:, :shared] for key, value in batch[0].items()}
            prefix["attention_mask"] = torch.ones_like(prefix["input_ids"])
            with torch.no_grad():
                cache = model(**{key: _to_model(value, model) for key, value in {**prefix, **vision}.items()},
                              use_cache=True, logits_to_keep=1).cache
            cache.batch_repeat_interleave(len(batch))
            rest = _left_pad([{key: value[:, shared:] for key, value in item.items()} for item in batch],
                             self.processor.tokenizer.pad_token_id or 0)
            inputs = {key: torch.cat([prefix[key].expand(len(batch), -1), rest[key]], 1) for key in rest}
            extra["cache"] = cache
        inputs = {key: _to_model(value, model) for key, value in inputs.items()}
        self._capture = {layer: [] for layer in self.layers}
        try:
            out = model.generate(**inputs, **extra, max_new_tokens=self.config.capture_new_tokens, do_sample=False,
                                 num_beams=1, num_return_sequences=1)
        finally:
            captured, self._capture = self._capture, None
        steps = min(len(rows) for rows in captured.values())
        rows = torch.stack([torch.stack(captured[layer][:steps]) for layer in sorted(self.layers)], 1)
        new = out[:, inputs["input_ids"].shape[1]:]
        eos = torch.tensor(model.generation_config.eos_token_id or [], dtype=torch.long, device=new.device).flatten()
        results = []
        for b in range(len(batch)):
            hits = torch.isin(new[b], eos).nonzero()
            length = int(hits[0, 0]) + 1 if len(hits) else new.shape[1]  # finished rows are padded afterwards
            results.append((rows[:length, :, b], new[b, :length]))
        return results


def _left_pad(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of single prompts (`(1, len)` tensors per key), padded on the left, with its attention mask."""
    width = max(item["input_ids"].shape[1] for item in batch)
    out: dict[str, list[torch.Tensor]] = {}
    for item in batch:
        pad = width - item["input_ids"].shape[1]
        item = {**item, "attention_mask": torch.ones_like(item["input_ids"])}
        for key, value in item.items():
            fill = pad_id if key == "input_ids" else 0
            out.setdefault(key, []).append(torch.cat([value.new_full((1, pad), fill), value], 1))
    return {key: torch.cat(values) for key, values in out.items()}


def _cache_key(general_ids: torch.Tensor, pixels: dict[str, Any]) -> str:
    """Digest of pass G's inputs: its token ids and the image's pixel inputs."""
    digest = hashlib.sha256(general_ids.cpu().numpy().tobytes())
    for name in sorted(pixels):
        digest.update(name.encode())
        digest.update(pixels[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _originals(images: Any, batch: int) -> list[PIL.Image.Image | None]:
    """The original images given to `generate(images=...)`, one per prompt, as RGB (Nones when not given)."""
    if images is None:
        return [None] * batch
    if isinstance(images, PIL.Image.Image):
        images = [images]
    images = list(images)
    if len(images) != batch:
        raise InputError(f"carve: images= holds {len(images)} images for {batch} prompt(s); CARVE refines one image "
                         "per prompt")
    bad = [type(image).__name__ for image in images if not isinstance(image, PIL.Image.Image)]
    if bad:
        raise InputError(f"carve: images= must hold PIL images (those given to the processor), not {bad[0]}")
    return [image.convert("RGB") for image in images]


def _first(ids: Any) -> int:
    return ids[0] if isinstance(ids, (list, tuple)) else ids


def _final_config(config: Any, prompt_len: int) -> Any:
    """The user's generation config for pass F's prompt (of another length): the number of new tokens is kept."""
    config = copy.deepcopy(config)
    if config.max_new_tokens is None:
        config.max_new_tokens = config.max_length - prompt_len
    if config.min_new_tokens is None and config.min_length:
        config.min_new_tokens = max(config.min_length - prompt_len, 0)
    config.max_length = config.min_length = None
    return config


def _to_model(value: Any, model: Any) -> Any:
    """Tensors onto the model's device; floating ones (pixels) in its dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(model.device, model.dtype if value.is_floating_point() else None)


def _with_user_prompt(out: Any, input_ids: torch.Tensor, final_len: int) -> Any:
    """Pass F's output with its prompt replaced by the user's (so `out[:, prompt_len:]` is the answer)."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    rows = sequences.shape[0]
    merged = torch.cat([input_ids[:1].expand(rows, -1), sequences[:, final_len:]], 1)
    if isinstance(out, torch.Tensor):
        return merged
    out.sequences = merged
    return out
