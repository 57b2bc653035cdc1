"""The package's shape: each folder imports only the layers below it, and nothing imports in a loop.

Every `import` counts, those inside functions too (a lazy import still ties two modules together).
The layers, bottom to top (ARCHITECTURE.md draws them):
  model/     the ViT in Flax: imports nothing else of vit_jax
  base       sharding, distributed, checkpoints, trained, integrity, progress: each other and model/
  data/      the input pipeline: the base
  interop/   checkpoints in and out (formats, downloads, the input convention): model/ and the base
  train/     the trainer: everything above except tools/
  tools/     the command lines: anything; nothing imports tools/
"""

import ast
import pathlib
import re

import pytest
from helpers import REPO

PACKAGE = REPO / "vit_jax"
BASE = {"sharding", "distributed", "checkpoints", "trained", "integrity", "progress"}
ALLOWED = {  # layer -> the layers its modules may import (its own always)
    "model": set(),
    "base": {"model"},
    "data": {"base"},
    "interop": {"model", "base"},
    "train": {"model", "base", "data", "interop"},
    "tools": {"model", "base", "data", "interop", "train"},
    "api": {"model", "interop"},  # vit_jax/__init__.py: the public names
}
MAX_TOP_LEVEL_ENTRIES = 12


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return "base" if parts[1] in BASE else parts[1]


def imports_of(path: pathlib.Path) -> set[str]:
    """The vit_jax modules `path` imports, anywhere in the file (`from a import b` counts a.b when
    a.b is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return {m for m in found if m == "vit_jax" or m.startswith("vit_jax.")}


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(f) for f in FILES}
# A module that imports itself (`python -m` re-entering under its import name) is no loop.
GRAPH = {module_name(f): imports_of(f) - {module_name(f)} for f in FILES}


def test_the_package_top_level_stays_small():
    entries = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= MAX_TOP_LEVEL_ENTRIES, sorted(entries)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_each_module_imports_only_the_layers_below_it(module):
    layer = layer_of(module)
    wrong = {
        target
        for target in GRAPH[module]
        if target != "vit_jax" and layer_of(target) not in ALLOWED[layer] | {layer}
    }
    # A package's __init__ is its own face: `from vit_jax import data` is the data layer's.
    assert not wrong, f"{module} ({layer}) imports {sorted(wrong)}"


def test_nothing_outside_tools_imports_tools():
    users = {m for m, targets in GRAPH.items() if layer_of(m) != "tools"}
    assert not {m for m in users if any(layer_of(t) == "tools" for t in GRAPH[m])}


def test_no_module_imports_the_package_root():
    # `from vit_jax import x` names a module; the root's public names are for users.
    assert not {m for m, targets in GRAPH.items() if m != "vit_jax" and "vit_jax" in targets}


def test_there_is_no_import_loop():
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import loop: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_architecture_md_names_every_module_where_it_is():
    """The map stays true: each folder's row in ARCHITECTURE.md lists exactly its modules."""
    rows = {}
    for line in (REPO / "ARCHITECTURE.md").read_text().splitlines():
        first = line.split("|")[1].strip() if line.startswith("| ") else ""
        if first.startswith("`vit_jax/") and first.endswith("/`"):
            rows[first.strip("`").removeprefix("vit_jax/").rstrip("/")] = line.split("|")[2]
        elif first.startswith("base:"):
            rows[""] = first
    assert set(rows) == {"model", "data", "interop", "train", "tools", ""}
    for folder, text in rows.items():
        named = {n for n in re.findall(r"`([a-z_]+)\.py`", text)}
        present = {p.stem for p in (PACKAGE / folder).glob("*.py")} - {"__init__"}
        assert named == present, f"vit_jax/{folder}: listed {sorted(named ^ present)} wrongly"
