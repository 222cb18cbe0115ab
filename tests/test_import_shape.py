"""The shape of src/deltatune: no import cycles (imports inside functions count), no module over ~400
lines, and only the registry side (the method packages, the package ``__init__`` that imports them, the
command line) imports a method package: the core learns about methods from the registry."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "deltatune"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}``; a package is named by its ``__init__.py``."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The deltatune modules ``module`` imports anywhere in its file (inside functions too).

    ``from . import x`` counts as importing ``x`` when ``x`` is a module; an import of a package this
    module lives in is not an edge (Python has run that ``__init__`` before this module anyway).
    """
    is_package = path.name == "__init__.py"
    targets = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets += [source] + [f"{source}.{alias.name}" for alias in node.names]
    out = set()
    for target in targets:
        while target and target not in known:  # `from .x import name`: the module is x
            target = target.rpartition(".")[0]
        if target and target != module and not module.startswith(target + "."):
            out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imported(m, p, known) for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"    {m} -> {sorted(graph[m] & members)}" for m in component]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


def test_imports_inside_functions_and_relative_imports_are_edges(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from .b import x\n    from . import c\n")
    known = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py",
             "pkg.c": tmp_path / "c.py"}
    assert _imported("pkg.a", tmp_path / "a.py", known) == {"pkg.b", "pkg.c"}
    graph = _graph()
    assert "deltatune.registry" in graph["deltatune.config"]
    assert "deltatune.checkpoint.errors" in graph["deltatune.checkpoint.keys"]


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) in src/deltatune:\n" + "\n".join(
        _describe(c, graph) for c in cycles)


def test_no_module_over_the_size_limit():
    sizes = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in _modules().items()}
    big = sorted((n, m) for m, n in sizes.items() if n > MAX_LINES)
    assert not big, f"modules over {MAX_LINES} lines (split them by job): " + ", ".join(f"{m} ({n})" for n, m in big)


def test_only_the_registry_side_imports_method_packages():
    """The core (config, checkpoint, model, tasks, ...) gets what it needs about methods from the registry."""
    allowed = (f"{PACKAGE}.methods", f"{PACKAGE}.cli")
    offenders = {
        m: sorted(t for t in targets if t.startswith(f"{PACKAGE}.methods"))
        for m, targets in _graph().items()
        if m != PACKAGE and not m.startswith(allowed)
    }
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, "core modules import method packages: " + "; ".join(f"{m} -> {t}" for m, t in offenders.items())


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
