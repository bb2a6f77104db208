"""The layering the design states, checked on the source: the core imports only itself (type-only imports included),
the library imports nothing of the evals, and no method compares a family or model-type name (a family's knowledge
lives in its adapter file)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import interventions as iv
from interventions.families import FAMILIES

PACKAGE = Path(iv.__file__).resolve().parent


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Absolute names of every module `path` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    package = ["interventions", *path.relative_to(PACKAGE).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]  # `from . import methods`
    return names


@pytest.mark.parametrize("path", _modules(PACKAGE / "core"), ids=lambda p: p.name)
def test_core_imports_only_itself(path):
    forbidden = ("interventions.methods", "interventions.families", "evals")
    bad = [name for name in _imports(path) if name.startswith(forbidden)]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _modules(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_imports_no_eval_code(path):
    bad = [name for name in _imports(path) if name == "evals" or name.startswith("evals.")]
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def _family_names() -> set[str]:
    return set(FAMILIES.names()) | {FAMILIES.get(t).name for t in FAMILIES.names()}


def _is_family_literal(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_family_literal(e, names) for e in node.elts)
    return isinstance(node, ast.Name) and node.id.isupper()  # a module constant: checked where it is defined


def _mentions_family(node: ast.AST) -> bool:
    text = ast.unparse(node)
    return "family" in text or "model_type" in text


def _family_comparisons(source: str) -> list[str]:
    names = _family_names()
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_mentions_family(s) for s in sides) and any(_is_family_literal(s, names) or (
                    isinstance(s, ast.Constant) and isinstance(s.value, str)) for s in sides):
                bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Assign) and _is_family_literal(node.value, names) and not isinstance(
                node.value, ast.Name):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")  # e.g. _QWEN = ("qwen2_vl", "qwen2_5_vl")
    return bad


@pytest.mark.parametrize("path", _modules(PACKAGE / "methods"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_methods_compare_no_family_names(path):
    """No `family == "llava"`, `family in ("qwen2_vl", ...)`, `config.model_type != "clip_vision_model"` in a
    method: the family adapter says it (`ModelInfo.layout`). Data keyed by family (presets) is fine."""
    bad = _family_comparisons(path.read_text())
    assert not bad, "\n".join(bad)


def test_the_family_check_flags_what_it_names():
    source = ('if model.family == "llava":\n    pass\n_QWEN = ("qwen2_vl", "qwen2_5_vl")\n'
              'ok = vision.model_type != "clip_vision_model"\nif family in _QWEN:\n    pass\n'
              'beta = presets["families"].get(model.family)\n')
    assert sorted(line.split(":")[0] for line in _family_comparisons(source)) == ["line 1", "line 3", "line 4", "line 5"]
