"""VAR on `builtin:shapes-smollm2`, the LLaVA on SmolLM2-135M-Instruct (offline, CPU; under a minute with the load).

    python examples/var_shapes_smollm2.py [--scene 1]

Describes one shapes-CHAIR test scene with the unmodified model and under VAR (its sink dims for this model are a
preset, measured with `interventions calibrate sink-dims`), and prints how many (layer, token) pairs of the prompt
pass VAR's sink test, the premise the method rests on.
"""

import argparse
import json

import torch

import interventions as iv
from evals.benchmarks.base import Sample
from evals.benchmarks.shapes import DATASETS, IMAGE_NAME
from evals.loading import load_model
from evals.runner import build_inputs
from interventions.methods.var import sink_scores

parser = argparse.ArgumentParser()
parser.add_argument("--scene", type=int, default=1, help="a shapes-CHAIR test scene id")
args = parser.parse_args()

data = DATASETS["shapes-smollm2"]
loaded = load_model("builtin:shapes-smollm2")
model, processor = loaded.model, loaded.processor
sample = Sample(str(args.scene), data.chair_prompt, data.images / IMAGE_NAME.format(image_id=args.scene))
inputs = build_inputs(loaded, [sample])
start = inputs["input_ids"].shape[1]


def describe() -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24)
    return processor.decode(out[0, start:], skip_special_tokens=True)


truth = json.loads((data.folder / "chair" / "objects.json").read_text())
print("drawn:", ", ".join(truth[str(args.scene)]))
print("none:", describe())
with iv.apply(model, "var"):
    print("var: ", describe())
dims = (507,)  # interventions/presets/var_sink_dims.json, entry builtin:shapes-smollm2
with torch.no_grad():
    hidden = model(**inputs, output_hidden_states=True).hidden_states[:-1]  # each decoder layer's input
phi = torch.stack([sink_scores(h, dims)[0] for h in hidden])  # (layers, tokens): VAR's own test statistic
print(f"VAR's sink test phi >= 20 holds on {int((phi >= 20).sum())} of {phi.numel()} (layer, token) pairs")
