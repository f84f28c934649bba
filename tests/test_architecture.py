"""The package's shape: no import cycles (function-level imports included), small modules and functions,
a thin CLI, and every module importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cervl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every cervl module ``path`` imports, at any depth of the file (function-level imports too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # Importing a.b.c first imports its packages a.b and a: count those edges too, except a package's
    # own __init__ importing its children (that is how packages re-export).
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    # A package re-exporting its children (cervl.predict -> cervl.predict.scoring) is not a cycle unless
    # a child imports another module that imports the package back; drop only the parent -> child edges.
    pruned = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    assert _cycles(pruned) == []


# The pipeline, bottom to top: a package may import its own layer's and lower layers' modules, never a
# higher layer's (docs/architecture.md explains each). Packages in one layer do not import each other.
LAYERS = [("core",), ("faces",), ("data",), ("models",), ("run",), ("predict",), ("evaluate",), ("explain",),
          ("train",), ("experiments",), ("scale", "serve"), ("cli",)]


def _layer_of(module: str) -> tuple[int, str]:
    if module == "cervl":  # the root package holds only __version__
        return 0, "core"
    part = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if part in names:
            return i, part
    return len(LAYERS), part


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        (lm, pm) = _layer_of(mod)
        for dep in deps:
            (ld, pd) = _layer_of(dep)
            if ld > lm or (ld == lm and pd != pm):
                bad.append(f"{mod} ({pm}) imports {dep} ({pd})")
    return sorted(bad)


def test_packages_are_layered_as_the_pipeline():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert packages | modules == {n for names in LAYERS for n in names}, "LAYERS names every package"
    assert layering_violations(import_graph()) == []
    for pkg in packages:  # each package says what it owns and what it may import
        doc = ast.get_docstring(ast.parse((SRC / pkg / "__init__.py").read_text())) or ""
        assert "Imports:" in doc, f"cervl.{pkg}'s docstring does not say what it owns and may import"


def test_layering_check_finds_an_upward_import():
    assert layering_violations({"cervl.core.labels": {"cervl.train.config"}, "cervl.train.recipe": {"cervl.core.labels"}}) \
        == ["cervl.core.labels (core) imports cervl.train.config (train)"]
    assert layering_violations({"cervl.serve.app": {"cervl.scale.pipeline"}}) != []


def test_cycle_detector_finds_hidden_cycles():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_module_and_function_sizes():
    too_long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()
                if len(p.read_text().splitlines()) > 620}
    assert too_long == {}
    long_functions = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 85:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert long_functions == []


def test_class_sizes():
    # issue 20: StageTrainer had grown to ~285 lines doing three jobs; classes stay about 200 lines
    long_classes = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
                    for name, path in _modules().items() for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 210]
    assert long_classes == []


def test_cli_is_parsing_and_printing_only():
    cli = SRC / "cli" / "__init__.py"
    assert len(cli.read_text().splitlines()) <= 350
    # the CLI calls the library; it does not build records, manifests or submissions itself
    text = cli.read_text()
    for forbidden in ("Record(", "write_manifest(", "atomic_write_text(", "ABAW_HEADER"):
        assert forbidden not in text


@pytest.mark.parametrize("module", sorted(m for m in _modules() if not m.endswith("__main__")))
def test_each_module_imports_on_its_own(module):
    # a fresh interpreter per module: an import that only works after some other import fails here
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
