"""`--methods` and `--params`: the columns of a comparison, each `none`, a method or a stack `a+b`, optionally with
labelled parameters (`pai@alpha=0.5`, `act@beta=0.3@threshold=0.05+pai@alpha=0.2`), so one method can appear
several times with different parameters."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import interventions as iv

from .run_keys import canonical, digest


@dataclass(frozen=True)
class MethodRun:
    """One column of the comparison: `none` (unmodified) or a stack of methods with their parameters.

    Attributes:
        label (`str`): the column name, as written in `--methods`.
        stack (`list[tuple[str, dict]]`): `(method, parameters as given)`, in stack order.
        resolved (`list[tuple[str, dict]]`): the same with every parameter of the method's config (defaults
            filled, numbers normalised, parameter files read); what is applied and what the run key covers.
    """

    label: str
    stack: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    resolved: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: the `model` block of the saved config the parameters came from (its shape is checked at wrap)
    made_for: dict[str, Any] | None = None

    def wrap_target(self) -> Any:
        """What `iv.wrap` takes for this run: the resolved stack, as a config with its `model` block when it has
        one."""
        if self.made_for is None:
            return self.resolved
        return {"model": self.made_for, "stack": [{"method": n, "params": p} for n, p in self.resolved]}

    @property
    def file_stem(self) -> str:
        """File name for this column's predictions: the label, with characters unsafe in file names replaced
        (and then a hash of the label, so two labels never share a file)."""
        safe = re.sub(r"[^A-Za-z0-9._@=+,-]", "_", self.label)
        return safe if safe == self.label else f"{safe}-{digest(self.label, 8)}"


def parse_methods(methods: str | None, params_json: str | None = None) -> list[MethodRun]:
    """`"none,pai,pai@alpha=0.5+act"` plus `'{"pai": {"alpha": 0.5}}'` → validated runs.

    `--params` gives a method's parameters for every column it appears in; `@name=value` after a method sets a
    parameter of that column only (values are JSON, e.g. `heads=[[2,3]]`; anything else is a string, e.g. a path).
    `--params` may also be a JSON file holding that, a tune's `tuned.json`, or a saved config
    (`interventions_config.json` or its folder); with `methods=None` the saved config's own stack is the one column.

    Raises:
        ValueError: unknown method, malformed JSON or `@` parameter, a method twice in one stack, two columns with
            the same configuration, parameters for a method not in the list, bad parameters.
    """
    params, made_for, saved_stack = _read_params(params_json)
    if methods is None:
        if saved_stack is None:
            raise ValueError("give --methods (only a saved config as --params brings its own stack)")
        methods = "+".join(saved_stack)
    labels = [m.strip() for m in _split(methods, ",") if m.strip()]
    if not labels:
        raise ValueError("--methods is empty; give e.g. none,pai")
    runs: list[MethodRun] = []
    used: set[str] = set()
    seen: dict[str, str] = {}
    for label in labels:
        run = MethodRun("none") if label == "none" else _parse_stack(label, params, made_for)
        used.update(name for name, _ in run.stack)
        identity = digest(run.resolved)
        if identity in seen:
            same = "twice" if seen[identity] == label else f"as {seen[identity]!r} and {label!r}, the same configuration"
            raise ValueError(f"--methods lists {label!r} {same}")
        seen[identity] = label
        runs.append(run)
    unused = set(params) - used
    if unused:
        raise ValueError(f"--params names {sorted(unused)}, which --methods does not list")
    stems = [r.file_stem for r in runs]
    if len(set(stems)) != len(stems):  # only labels that differ in case can collide
        raise ValueError(f"--methods: two labels give the same file name: {stems}")
    return runs


def _parse_stack(label: str, params: dict[str, dict[str, Any]], made_for: dict[str, Any] | None) -> MethodRun:
    stack, resolved = [], []
    for item in _split(label, "+"):
        name, *assignments = _split(item.strip(), "@")
        name = name.strip()
        given = dict(params.get(name, {}))
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--methods {label!r}: {assignment!r} is not name=value")
            given[key.strip()] = _value(value.strip())
        full = iv.method_params(name, given)  # validate now, before any model work
        if name in (n for n, _ in stack):
            raise ValueError(f"--methods {label!r} applies {name} twice; a stack lists each method once "
                             f"(compare variants as separate columns: {name}@...,{name}@...)")
        stack.append((name, given))
        resolved.append((name, canonical(full)))
    return MethodRun(label, stack, resolved, made_for)


def _read_params(given: str | None) -> tuple[dict[str, dict], dict[str, Any] | None, list[str] | None]:
    """`(params by method, model block, stack names)` of `--params`: JSON text, a JSON file, a tune's `tuned.json`
    or a saved config."""
    from interventions.saved import config_path

    if not given:
        return {}, None, None
    text = given
    if not given.lstrip().startswith("{"):
        path = config_path(given)
        if path is None or not path.is_file():
            raise ValueError(f"--params is neither JSON nor a JSON file / saved config folder: {given!r}")
        text = path.read_text()
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--params is not valid JSON: {e.msg} at column {e.colno}") from None
    if isinstance(params, dict) and {"method", "params", "dev"} <= set(params):  # a tune's tuned.json
        return {params["method"]: params["params"]}, None, None
    if isinstance(params, dict) and "stack" in params:  # a saved interventions config
        entries = params
        if not isinstance(entries["stack"], list) or not all(isinstance(e, dict) and "method" in e
                                                              for e in entries["stack"]):
            raise ValueError("the saved config's stack must be a list of {\"method\": name, \"params\": {...}}")
        names = [e["method"] for e in entries["stack"]]
        if len(set(names)) != len(names):
            raise ValueError(f"the saved config stacks {names}; --params maps one parameter set per method name")
        return {e["method"]: dict(e.get("params", {})) for e in entries["stack"]}, entries.get("model"), names
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ValueError('--params must be a JSON object {"method": {"parameter": value}}')
    return params, None, None


def _value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, lists), Python's True/False/None, else the text itself."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets (so `heads=[[2,3],[4,5]]` stays whole)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts
