"""CARVE on the shipped shapes organism (offline, CPU, a few seconds); writes the mask overlay and the refined image.

    python examples/carve_shapes.py [image.png] [--out carve_out]

The organism is a 4-layer LLaVA, so the paper's layers 20..25 do not exist: layers 2 and 3 are read. Its
vocabulary has no "Write a general description of the image.", so the general instruction is its own
"describe the image ." (the answer suffix is dropped for the same reason).
"""

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import interventions as iv
from evals.loading import load_model

parser = argparse.ArgumentParser()
parser.add_argument("image", nargs="?", help="an image file (default: a drawn sun and key on grey)")
parser.add_argument("--question", default="is there a sun")
parser.add_argument("--out", default="carve_out")
args = parser.parse_args()

loaded = load_model("builtin:shapes-vlm")
model, processor = loaded.model, loaded.processor
if args.image:
    image = Image.open(args.image).convert("RGB")
else:
    image = Image.new("RGB", (48, 48), (220, 220, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 18, 18), fill=(220, 110, 0))  # the organism's "sun": an orange disc
    draw.rectangle((28, 34, 42, 38), fill=(200, 0, 0))  # its "key": a red bar
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
start = inputs["input_ids"].shape[1]

with torch.no_grad(), iv.apply(model, "carve", processor=processor, layers=[2, 3], keep=0.4,
                               regions=2, general_prompt="describe the image .", answer_suffix="") as handle:
    out = model.generate(**inputs, images=image, max_new_tokens=8, do_sample=False)  # images=: crop the original
    result = handle.methods[0].result

folder = Path(args.out)
folder.mkdir(parents=True, exist_ok=True)
result.overlay().resize((result.image.width * 4, result.image.height * 4), Image.Resampling.NEAREST).save(
    folder / "carve_mask.png")
result.refined.save(folder / "carve_refined.png")
print("question:       ", args.question)
print("pass Q (plain): ", processor.decode(result.answer_ids, skip_special_tokens=True))
print("CARVE:          ", processor.decode(out[0, start:], skip_special_tokens=True))
print(f"kept {result.mask.mean():.0%} of the pixels, crop {result.box}; wrote {folder}/carve_mask.png, "
      f"{folder}/carve_refined.png")
