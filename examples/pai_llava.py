"""PAI on LLaVA-1.5-7B (needs a GPU and the weights from the Hugging Face hub; not runnable offline).

    python examples/pai_llava.py path/to/image.jpg

PAI raises the last row's image-key logits by alpha·|z| in layers 2..31 (paper/code default alpha 0.2).
"""

import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import interventions as iv

model_id = "llava-hf/llava-1.5-7b-hf"
model = LlavaForConditionalGeneration.from_pretrained(model_id, dtype=torch.float16, device_map="auto",
                                                      attn_implementation="sdpa")
processor = AutoProcessor.from_pretrained(model_id)
image = Image.open(sys.argv[1]).convert("RGB")
prompt = "USER: <image>\nPlease help me describe the image in detail. ASSISTANT:"
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device, torch.float16)
start = inputs["input_ids"].shape[1]

with torch.no_grad():
    plain = model.generate(**inputs, max_new_tokens=128, do_sample=False)
    with iv.apply(model, "pai", alpha=0.2):
        pai = model.generate(**inputs, max_new_tokens=128, do_sample=False)
print("unmodified:", processor.decode(plain[0, start:], skip_special_tokens=True))
print("PAI:       ", processor.decode(pai[0, start:], skip_special_tokens=True))
