"""One non-neutral stack per method for the tiny models of `tiny_models`, and the families each one runs on, shared
by the tests that check a property of every (method, family) pair (cache layouts, padding, precision).

CARVE is not here: its decoding loop needs a processor and runs three passes (tests/test_carve.py).
"""

from __future__ import annotations

from tiny_models import LLM_FAMILIES

#: case id → stack; layers and heads fit the 3-layer tiny decoders (and the 6-layer hybrid Gemma3)
STACKS: dict[str, list[tuple[str, dict]]] = {
    "pai": [("pai", {"alpha": 0.5, "start_layer": 1})],
    "pai-cfg": [("pai", {"alpha": 0.5, "start_layer": 1, "use_cfg": True, "gamma": 2.0})],
    "act": [("act", {"beta": 0.3, "threshold": 0.05, "layers": [0, 1, 2]})],
    "pai+act": [("pai", {"alpha": 0.5}), ("act", {"beta": 0.3, "heads": [[0, 1], [1, 0], [1, 3], [2, 2]]})],
    "vhr": [("vhr", {"alpha": 2.0, "layers": [0, 1, 2]})],
    "pag": [("pag", {"heads": [[0, 1], [1, 2], [2, 3]], "u": 1.0, "w": 2.0})],
    "pag-uniform": [("pag", {"heads": [[0, 1], [2, 3]], "u": 0.7, "w": 1.5, "target": "uniform"})],
    "paint": [("paint", {"alpha": 0.7, "beta": 0.4, "start_layer": 1})],
    "var": [("var", {"sink_dims": list(range(16)), "tau": 3.0, "layers": [1, 2]})],
    "locore": [("locore", {"beta": 1.0, "apply_on_prefill_last_row": True})],
    "gift": [("gift", {"alpha": 3.0, "saliency_layers": [0], "enhancement_layers": [1, 2]})],
    "cca": [("cca", {})],
    "sgrs": [("sgrs", {"alpha": 1.5, "layers": [1, 2]})],
}

#: cases that need no image (the rest need image tokens)
TEXT_CASES = frozenset({"act", "pag", "pag-uniform", "locore"})
#: families a case does not run on, and why (the method refuses them with a ConfigError at wrap)
UNSUPPORTED: dict[str, frozenset[str]] = {
    "cca": frozenset({"qwen2_vl", "qwen2_5_vl"}),  # 3-D M-RoPE: no 1-D position to remap
}

#: cases that refuse a right-padded batch (their branch aligns the streams at the last token)
REFUSE_RIGHT_PADDING = frozenset({"pai-cfg", "vhr"})


def applies(case: str, family: str) -> bool:
    """Whether the stack `case` runs on the tiny `family` model."""
    if family in LLM_FAMILIES and case not in TEXT_CASES:
        return False
    return family not in UNSUPPORTED.get(case, frozenset())


def cases(families: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every applicable `(family, case)` pair over `families`."""
    return [(family, case) for family in families for case in STACKS if applies(case, family)]
