"""The module map in docs/architecture.md, held against the code: every module of
imagebuild/ is in the table, and every relative import goes to a lower layer or to a
module of its own layer that the table allows. No daemon, no network."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
PACKAGE = REPO / "imagebuild"
_MODULE = re.compile(r"`([a-z_]+)\.py`")
_NAME = re.compile(r"`([a-z_]+)`")


def layer_map(text: str) -> tuple[dict[str, int], dict[str, set[str]]]:
    """module -> layer (0 is the top), module -> the same-layer modules it may import."""
    layers: dict[str, int] = {}
    allowed: dict[str, set[str]] = {}
    level = -1
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not _MODULE.fullmatch(cells[1]):
            continue
        if cells[0]:
            level += 1
        module = _MODULE.fullmatch(cells[1]).group(1)  # type: ignore[union-attr]
        layers[module] = level
        allowed[module] = set(_NAME.findall(cells[3]))
    return layers, allowed


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports (``from . import __version__``: __init__)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name if (PACKAGE / f"{a.name}.py").exists() else "__init__"
                           for a in node.names)
        elif isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom)
                                              and node.level == 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            out.update(n.split(".")[1] for n in names if n.startswith("imagebuild."))
    return out


def violations(layers: dict[str, int], allowed: dict[str, set[str]],
               imports: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(imports.items()):
        if module not in layers:
            out.append(f"{module}.py is not in the module map")
            continue
        for dep in sorted(deps):
            if dep not in layers:
                out.append(f"{module} imports {dep}, which the module map does not list")
            elif layers[dep] < layers[module]:
                out.append(f"{module} imports {dep}, a layer above it")
            elif layers[dep] == layers[module] and dep not in allowed[module]:
                out.append(f"{module} imports {dep} of its own layer, which its row does "
                           f"not allow")
    return out


def test_the_code_follows_the_module_map() -> None:
    layers, allowed = layer_map(DOC.read_text(encoding="utf-8"))
    assert len(layers) > 30 and layers["cli"] == 0 and layers["errors"] == max(layers.values())
    imports = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__main__"}
    assert violations(layers, allowed, imports) == []
    assert set(layers) == set(imports), "the map lists modules that do not exist"


def test_one_module_imports_docker_and_one_spawns_processes() -> None:
    for p in PACKAGE.glob("*.py"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names} | {(n.module or "").split(".")[0] for n in ast.walk(tree)
                                      if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert ("docker" in names) == (p.name == "engine_docker.py"), p.name
        assert ("subprocess" in names) == (p.name == "remote.py"), p.name


TABLE = """\
| layer | module | owns | may import (same layer) |
|---|---|---|---|
| top | `a.py` | x | `b` |
| | `b.py` | x | |
| bottom | `c.py` | x | |
"""


@pytest.mark.parametrize(("imports", "found"), [
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),
    ({"a": set(), "b": {"a"}, "c": set()}, ["b imports a of its own layer, which its row "
                                           "does not allow"]),
    ({"a": set(), "b": set(), "c": {"a"}}, ["c imports a, a layer above it"]),
    ({"a": {"zz"}, "b": set(), "c": set()}, ["a imports zz, which the module map does not "
                                            "list"]),
    ({"a": set(), "b": set(), "c": set(), "d": set()}, ["d.py is not in the module map"]),
])
def test_the_check_finds_what_breaks_the_map(imports: dict[str, set[str]],
                                            found: list[str]) -> None:
    layers, allowed = layer_map(TABLE)
    assert layers == {"a": 0, "b": 0, "c": 1}
    assert violations(layers, allowed, imports) == found
