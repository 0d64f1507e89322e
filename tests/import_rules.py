"""The import rules of docs' architecture, checked on the source and by real imports.

Run as a script (``python tests/import_rules.py ROOT``) it prints one violation per line and
exits 1 if there is any. Two checks:

- **Static**: every ``import`` in every module of the package (function-local ones too, since a
  lazy import hides a cycle rather than removing it; ``if TYPE_CHECKING:`` blocks excepted)
  forms a graph. It must have no cycle, and no edge that breaks a rule (:data:`RULES`).
  Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so that edge is counted too, except
  into the importer's own package (Python's package pattern, not a cycle).
- **Real**: a fresh interpreter imports the modules layer by layer and checks what got loaded
  (catches dynamic imports the source does not show): the task code loads no Flower or
  Opacus, ``shared/`` no actor, the server no client code; a second fresh interpreter
  checks the client against the server.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

#: Source folder -> the package it is installed as (pyproject.toml's package-dir).
PACKAGES = {"fedscan": "fedscan", "server": "fedscan.server", "client": "fedscan.client",
            "shared": "fedscan.shared", "simulations": "fedscan.simulations"}

ACTORS = ("fedscan.server", "fedscan.client", "fedscan.simulations")
CLI = ("fedscan.cli", "fedscan.deploy_cli")


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


#: (who, what they must not import, why). ``who``/``what`` are module-name prefixes.
RULES = [
    (("fedscan.shared",), (*ACTORS, *CLI), "shared/ imports no actor"),
    (("fedscan.server",), ("fedscan.client",), "server and client never import each other"),
    (("fedscan.client",), ("fedscan.server",), "server and client never import each other"),
    (("fedscan.shared.tasks",), ("flwr",), "task code imports no Flower"),
    (("fedscan.shared", "fedscan.server", "fedscan.simulations", "fedscan.cli",
      "fedscan.deploy_cli"), ("opacus",), "Opacus only on the client side (client/)"),
    (("fedscan.server", "fedscan.client", "fedscan.shared", "fedscan.simulations"), CLI,
     "nothing imports the CLI"),
]


def modules(root: Path, packages: dict[str, str] = PACKAGES) -> dict[str, Path]:
    """Module name -> source file for every ``.py`` under the package folders."""
    out = {}
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module ``path`` imports (targets of ``from x import y`` as ``x`` and ``x.y``)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> what it imports: external names as written, our modules as modules."""
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for target in imports(path, name, path.name == "__init__.py"):
            if target in mods:
                targets.add(target)
                parts = target.split(".")
                for i in range(1, len(parts)):  # importing a.b.c runs a.b's __init__
                    parent = ".".join(parts[:i])
                    if parent in mods and not _under(name, [parent]):
                        targets.add(parent)
            elif not any(target.startswith(m + ".") for m in mods):  # not `from pkg import x`
                targets.add(target)
        edges[name] = targets - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def static_violations(root: Path, packages: dict[str, str] = PACKAGES) -> list[str]:
    """Rule breaks and cycles in the source under ``root``, one line each."""
    edges = graph(modules(root, packages))
    out = []
    for name, targets in sorted(edges.items()):
        for who, forbidden, why in RULES:
            if _under(name, who):
                out += [f"{name} imports {t}: {why}" for t in sorted(targets)
                        if _under(t, forbidden) and not (name in CLI and t in CLI)]
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return out


#: Layers imported in one fresh interpreter, each followed by what must not be loaded yet.
_LAYERS = [
    [("fedscan.shared.tasks", ("flwr", "opacus", *ACTORS, *CLI)),
     ("fedscan.shared", ("opacus", *ACTORS, *CLI)),
     ("fedscan.server", ("opacus", "fedscan.client", "fedscan.simulations", *CLI))],
    [("fedscan.client", ("fedscan.server", "fedscan.simulations", *CLI)),
     ("fedscan.simulations", CLI),
     ("fedscan", ())],
]

_PROBE = """
import importlib, json, sys, traceback
layers, names = json.loads(sys.argv[1])
problems = []
for prefix, forbidden in layers:
    for name in [n for n in names if n == prefix or n.startswith(prefix + ".")]:
        try:
            importlib.import_module(name)
        except Exception as exc:
            problems.append(f"import {name} failed: {type(exc).__name__}: {exc}")
    loaded = [m for m in sys.modules for f in forbidden if m == f or m.startswith(f + ".")]
    problems += [f"importing {prefix} loaded {m}" for m in sorted(set(loaded))]
print(json.dumps(problems))
"""


def runtime_violations(root: Path) -> list[str]:
    """What fresh interpreters load when importing every module, layer by layer."""
    names = sorted(n for n in modules(root) if n != "fedscan.__main__")  # runs the CLI
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE, json.dumps([layers, names])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for layers in _LAYERS]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            out.append(f"import probe failed: {stderr.strip().splitlines()[-1:]}")
        else:
            out += json.loads(stdout.strip().splitlines()[-1])
    return out


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    found = static_violations(source) + runtime_violations(source)
    print("\n".join(found))
    sys.exit(1 if found else 0)
