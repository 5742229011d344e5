"""harness/ shows its parts: the imports between core, peers and bench go one way only.

Every ``import`` statement in harness/ (module level or inside a function) is
read from the source with ``ast``, so a late import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import harness

ROOT = Path(harness.__file__).resolve().parent
#: Which harness parts each part may import (a part may always import itself).
ALLOWED = {"core": {"core"}, "peers": set(), "bench": {"core", "peers"}}


def part_of(module: str) -> str:
    """``core``, ``peers`` or ``bench`` for a ``harness...`` module name."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 2 and pieces[1] in ("peers", "bench") else "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def harness_imports(path: Path) -> set[str]:
    """The ``harness...`` modules ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "harness")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harness":
            found.add(node.module)
    return found


def test_imports_go_one_way() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        if name in ("harness", "harness.peers", "harness.bench"):
            continue  # the package docstrings
        here = part_of(name)
        for target in harness_imports(path):
            there = part_of(target) if target != "harness" else "core"
            if there != here and there not in ALLOWED[here]:
                wrong.append("%s (%s) imports %s (%s)" % (name, here, target, there))
    assert not wrong, "\n".join(wrong)


def test_the_parts_are_where_the_readme_says() -> None:
    names = {module_name(p) for p in ROOT.rglob("*.py")}
    assert {"harness.peers.answer", "harness.peers.server", "harness.peers.client", "harness.peers.flags"} <= names
    assert {"harness.bench.bench", "harness.bench.loadgen", "harness.bench.swarm", "harness.bench.locustfile"} <= names
    assert {"harness.processes", "harness.binaries", "harness.sigusr2", "harness.tasks", "harness.cli"} <= names
    assert "harness.stats" not in names  # fooproxy.stats is the Stats; the harness's reader says what it is
