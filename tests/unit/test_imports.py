"""kiln's modules import one another without cycles, and each imports on its own.

A cycle hidden behind imports inside functions still ties modules together; one at module level
fails (or half-initialises a module) depending on which module is imported first. Only
module-level imports count here: an import inside a function is the way to defer one (DeepSpeed
after the environment it reads, start-up time), not to break a cycle.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys

import pytest

import kiln


def kiln_modules() -> list[str]:
    return sorted({"kiln", *(m.name for m in pkgutil.walk_packages(kiln.__path__, "kiln."))})


def _module_level_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported: top-level ones, and those in top-level
    try/with blocks and `if`s other than `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name != "TYPE_CHECKING":
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from _module_level_imports(node.body)


def imports_of(name: str, modules: set[str], source: str | None = None) -> set[str]:
    """The kiln modules that importing `name` imports directly (with the packages above them,
    whose __init__ runs first)."""
    spec = importlib.util.find_spec(name)
    is_package = spec.submodule_search_locations is not None
    if source is None:
        with open(spec.origin, encoding="utf-8") as f:
            source = f.read()
    package = name if is_package else name.rpartition(".")[0]
    explicit, implicit = set(), set()
    for node in _module_level_imports(ast.parse(source, spec.origin).body):
        if isinstance(node, ast.Import):
            named = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import module` imports the module; `from module import name`, the module.
            named = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in named:
            explicit.add(target)
            parts = target.split(".")
            implicit.update(".".join(parts[:i]) for i in range(1, len(parts)))
    # The packages above `name` are imported before it runs: no edge to them unless it names them.
    implicit = {m for m in implicit if not name.startswith(m + ".")}
    return {m for m in explicit | implicit if m in modules and m != name}


def import_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the kiln modules it imports at module level; `sources` replaces some modules' text."""
    modules = set(kiln_modules())
    sources = sources or {}
    return {m: imports_of(m, modules, sources.get(m)) for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_kiln_modules_import_one_another_without_a_cycle():
    graph = import_graph()
    assert "kiln.checkpoint.weights" in graph and graph["kiln.checkpoint.export"]  # the walk found them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among kiln's modules: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle():
    """The check itself: a module-level import back from weights.py to export.py is a cycle."""
    spec = importlib.util.find_spec("kiln.checkpoint.weights")
    with open(spec.origin, encoding="utf-8") as f:
        text = f.read() + "\nfrom kiln.checkpoint.export import export_checkpoint\n"
    cycle = find_cycle(import_graph({"kiln.checkpoint.weights": text}))
    assert cycle is not None and {"kiln.checkpoint.weights", "kiln.checkpoint.export"} <= set(cycle), cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.timeout(240)
def test_every_module_imports_in_a_fresh_process():
    """Each module, first in its own process would be too slow (torch): one process imports
    them all, each from a clean slate of kiln's modules, so no module leans on another having
    been imported before it."""
    script = (
        "import importlib, json, sys, traceback\n"
        "failed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    for loaded in [m for m in sys.modules if m == 'kiln' or m.startswith('kiln.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failed[name] = traceback.format_exc(limit=-3)\n"
        "print(json.dumps(failed))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(kiln_modules())],
                          capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{tb}" for name, tb in failed.items())
