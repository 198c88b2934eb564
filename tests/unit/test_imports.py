"""Who imports whom: the rules docs/development.md states, read from the code with `ast`.

Every import counts, those inside functions too (the project imports heavy libraries
lazily; a lazy import is still a dependency). A unit is a top-level module or subpackage
of `genderclf` (`stages`, `tracking`, `pipeline`, ...), or `flows`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "genderclf"

# The units each unit may import, bottom to top (docs/development.md, "Who imports whom").
# Nothing imports `cli`; only `cli` imports the stage commands (`pipeline`) and the tools;
# only `pipeline` imports `stages`; only the tools and the flows import `services`; the
# flows reach the stages through DVC alone.
ALLOWED: dict[str, set[str]] = {
    "catalog": set(),
    "console": set(),
    "config": {"catalog"},
    "engine": {"config"},
    "io": {"config", "engine"},
    "images": {"config"},
    "contracts": {"config", "io"},
    "faces": {"config", "console"},
    "data": {"catalog", "config", "console", "contracts", "images", "io"},
    "model": {"catalog", "config", "contracts", "data", "engine", "io"},
    "inference": {"config", "contracts", "data", "faces", "images", "io", "model"},
    "monitor": {"config", "data", "images", "inference", "io", "model"},
    "promotion": {"config", "contracts", "data", "inference", "model"},
    "stages": {
        "config",
        "contracts",
        "data",
        "engine",
        "inference",
        "io",
        "model",
        "monitor",
        "promotion",
    },
    "tracking": {
        "catalog",
        "config",
        "console",
        "contracts",
        "images",
        "inference",
        "io",
        "model",
    },
    "command": {"config"},
    "pipeline": {"command", "config", "console", "data", "stages", "tracking"},
    "services": {
        "config",
        "console",
        "contracts",
        "io",
        "model",
        "monitor",
        "promotion",
        "tracking",
    },
    "tools": {
        "command",
        "config",
        "console",
        "engine",
        "inference",
        "io",
        "monitor",
        "services",
        "tracking",
    },
    "cli": {"pipeline", "tools"},
    "flows": {"config", "contracts", "io", "monitor", "services", "tracking"},
}
# Third-party packages only some units may import.
ONLY = {
    "mlflow": ("genderclf.tracking",),
    "prefect": ("flows.",),
    "dvc": ("flows.dvc_ops",),
    "typer": ("genderclf.cli", "genderclf.command", "genderclf.pipeline", "genderclf.tools"),
}


def _modules() -> dict[str, Path]:
    """{module name: file} of the package and of flows/."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    for f in (REPO_ROOT / "flows").glob("*.py"):
        out["flows" if f.stem == "__init__" else f"flows.{f.stem}"] = f
    return out


MODULES = _modules()


def _imported(path: Path) -> set[str]:
    """Every absolute import in a file, at any depth (`from a import b` counts as `a` and,
    where that is a module, `a.b`)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in MODULES
            }
    return out


IMPORTS = {m: _imported(f) for m, f in MODULES.items()}


def _own(name: str) -> str | None:
    """The project module an imported name is (or is in), or None for a third party."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _unit(module: str) -> str:
    parts = module.split(".")
    return "flows" if parts[0] == "flows" else (parts[1] if len(parts) > 1 else "genderclf")


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for m, names in IMPORTS.items():
        for name in names:
            own = _own(name)
            if own and own != m and own != "genderclf":
                graph[m].add(own)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_unit_has_its_place_in_the_rules():
    units = {_unit(m) for m in MODULES} - {"genderclf"}
    assert units == set(ALLOWED), f"place {units - set(ALLOWED)} in ALLOWED (and the docs)"


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_each_unit_imports_only_what_the_rules_allow(unit):
    used = {
        _unit(own) for m, targets in _module_graph().items() if _unit(m) == unit for own in targets
    } - {unit}
    assert used <= ALLOWED[unit], f"{unit} imports {sorted(used - ALLOWED[unit])}"


@pytest.mark.parametrize("package", sorted(ONLY))
def test_some_libraries_are_imported_in_one_place_only(package):
    users = sorted(
        m
        for m, names in IMPORTS.items()
        if any(n == package or n.startswith(f"{package}.") for n in names)
    )
    allowed = ONLY[package]
    assert [m for m in users if not m.startswith(allowed) and m not in allowed] == [], users


def test_no_cycles_between_modules_or_units():
    graph = _module_graph()
    assert _cycles(graph) == []
    units: dict[str, set[str]] = defaultdict(set)
    for m, targets in graph.items():
        units[_unit(m)] |= {_unit(t) for t in targets} - {_unit(m)}
    assert _cycles(units) == []
    assert _cycles(ALLOWED) == []  # the rules themselves are a hierarchy


def test_nothing_imports_the_command_line_app_or_the_stages_but_their_commands():
    importers = defaultdict(set)
    for m, targets in _module_graph().items():
        for t in targets:
            importers[_unit(t)].add(_unit(m))
    assert importers["cli"] == set()
    assert importers["stages"] <= {"stages", "pipeline"}
    assert importers["pipeline"] <= {"cli"} and importers["tools"] <= {"cli"}
