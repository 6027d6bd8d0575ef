"""The package layout's rules: layers import only downward, and no module imports itself
back through others. Every import counts, including those inside functions: a lazy
import still ties the two modules together.

The order, lowest first; a package may import its own modules and any package of a lower
layer, never one of its own layer or above. docs/architecture.md explains it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptjax"

LAYERS = [
    {"errors", "version"},
    {"config"},
    {"cpu", "data", "parallel"},
    {"model"},
    {"generation", "hf"},
    {"training"},
    {"runs"},
    {"finetune"},
    {"eval", "bench", "serve", "inspection"},
    {"cli"},
    {"__init__", "__main__"},  # the public names and `python -m gptjax` reach everything
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The layer unit of a gptjax module: its package below gptjax, or the top-level
    module's own name (errors, config)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The gptjax modules that module `name` (with this source) imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` names a module
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f.read_text(), module_name(f), f.name == "__init__.py", modules)
            for f in files}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in g.items():
        here = unit_of(module)
        for target in imported:
            there = unit_of(target)
            if there != here and LAYER_OF[there] >= LAYER_OF[here]:
                found.append(f"{module} -> {target}")
    return sorted(found)


def cycles(g: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                found.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    return found


def test_every_package_has_a_layer():
    units = {unit_of(m) for m in graph()}
    assert units <= set(LAYER_OF), f"packages missing from LAYERS: {sorted(units - set(LAYER_OF))}"


def test_layers_import_only_downward():
    found = upward_imports(graph())
    assert not found, "imports from the same or a higher layer:\n" + "\n".join(found)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(found)


MODULES = {"gptjax.model", "gptjax.model.gpt", "gptjax.runs.load", "gptjax.config"}


@pytest.mark.parametrize("source, expected", [
    ("from gptjax.model import gpt\n", {"gptjax.model.gpt"}),
    ("from gptjax.model import init\n", {"gptjax.model"}),
    ("import gptjax.config as C\n", {"gptjax.config"}),
    ("def f():\n    from gptjax.runs.load import load\n", {"gptjax.runs.load"}),
    ("from . import gpt\n", {"gptjax.model.gpt"}),
    ("from .. import config\n", {"gptjax.config"}),
])
def test_the_checker_sees_every_kind_of_import(source, expected):
    """The rules are only as good as the import finder: lazy and relative imports count."""
    assert imports_of(source, "gptjax.model.lora", False, MODULES) == expected


def test_planted_violations_are_caught():
    fake = {"gptjax.model.gpt": {"gptjax.training.step", "gptjax.config"},
            "gptjax.training.step": {"gptjax.model.gpt"}, "gptjax.config": set()}
    assert upward_imports(fake) == ["gptjax.model.gpt -> gptjax.training.step"]
    assert cycles(fake) == ["gptjax.model.gpt -> gptjax.training.step -> gptjax.model.gpt"]
    same_layer = {"gptjax.hf.io": {"gptjax.generation.decoder"}, "gptjax.generation.decoder": set()}
    assert upward_imports(same_layer) == ["gptjax.hf.io -> gptjax.generation.decoder"]
