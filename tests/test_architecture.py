"""The layers of docs/architecture.md, enforced over the import graph.

Dependencies flow one way: a module may import its own layer or a lower one, never a higher
one, not even inside a function; no function-level import of unmask remains; no import
cycle remains. The checks are plain functions over ``{module: source}`` so the tests at the
bottom can show each of them fails on a planted violation.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import unmask.attacks
import unmask.bench
import unmask.defenses
import unmask.explain

#: Lowest first. A module belongs to the longest prefix that names it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("unmask.bench.core",),
    ("unmask.bench.data",),
    ("unmask.attacks",),
    ("unmask.explain",),
    ("unmask.defenses",),
    ("unmask.bench.zoo",),
    ("unmask.bench.suite",),
    ("unmask.bench.report",),
    ("unmask.bench.perf",),
    ("unmask.bench.cli", "unmask.bench.__main__"),
)
#: ``unmask.bench`` itself only re-exports the core (and the version).
PACKAGE_LAYER = {"unmask.bench": 0}

#: Function-level imports that are allowed: optional or heavy third-party dependencies only,
#: never unmask's own modules (the tests below check that no unmask import is deferred).
OWN = "unmask"


def sources() -> dict[str, str]:
    """``{module name: source}`` for every module of the installed package."""
    out: dict[str, str] = {}
    for pkg in (unmask.bench, unmask.attacks, unmask.defenses, unmask.explain):
        out[pkg.__name__] = _read(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".",
                                          onerror=_reraise):
            out[info.name] = _read(info.name)
    return out


def _reraise(name: str) -> None:
    raise  # a package that fails to import must fail the test, not be skipped silently


def _read(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def layer_of(module: str) -> int:
    """Index of ``module``'s layer in :data:`LAYERS`; ``KeyError`` if it is in none."""
    if module in PACKAGE_LAYER:
        return PACKAGE_LAYER[module]
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise KeyError(f"{module} is in no layer of LAYERS; add it to docs/architecture.md")
    return best


def imports(module: str, source: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(target module, line, deferred)`` for every import of an unmask module in ``source``.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module.
    ``deferred`` is true for an import inside a function or class body.
    """
    tree = ast.parse(source)
    is_pkg = any(m.startswith(module + ".") for m in modules) or module in PACKAGE_LAYER
    top = {id(node) for node in tree.body}
    # Imports under a module-level ``if``/``try`` still run at import time.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t == OWN or t.startswith(OWN + "."):
                out.append((t, node.lineno, id(node) not in top))
    return out


def upward_imports(srcs: dict[str, str]) -> list[str]:
    """Every import of a higher layer, as ``"importer:line -> target"``."""
    modules = set(srcs)
    bad = []
    for module, source in srcs.items():
        here = layer_of(module)
        for target, line, _ in imports(module, source, modules):
            if layer_of(target) > here:
                bad.append(f"{module}:{line} -> {target}")
    return bad


def deferred_imports(srcs: dict[str, str]) -> list[str]:
    """Every function-level import of an unmask module."""
    modules = set(srcs)
    return [f"{module}:{line} -> {target}" for module, source in srcs.items()
            for target, line, deferred in imports(module, source, modules) if deferred]


def unexplained_deferred_imports(srcs: dict[str, str]) -> list[str]:
    """Function-level imports of other packages without a ``# Deferred: <why>`` comment on the
    line above (a heavy or optional dependency is the only reason to defer one)."""
    bad = []
    for module, source in srcs.items():
        tree = ast.parse(source)
        lines = source.splitlines()
        top = {id(node) for node in tree.body}
        for node in tree.body:
            if isinstance(node, (ast.If, ast.Try)):
                top |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if not above.startswith("# Deferred:") and "# Deferred:" not in lines[node.lineno - 1]:
                bad.append(f"{module}:{node.lineno}")
    return bad


def cycles(srcs: dict[str, str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan) in the import graph."""
    modules = set(srcs)
    graph = {m: sorted({t for t, _, _ in imports(m, s, modules) if t in modules and t != m})
             for m, s in srcs.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def srcs() -> dict[str, str]:
    return sources()


def test_every_module_is_in_a_layer(srcs):
    for module in srcs:
        layer_of(module)


def test_no_module_imports_a_higher_layer(srcs):
    assert upward_imports(srcs) == []


def test_no_function_level_import_of_unmask_remains(srcs):
    assert deferred_imports(srcs) == []


def test_every_deferred_import_says_why(srcs):
    assert unexplained_deferred_imports(srcs) == []


def test_no_import_cycle(srcs):
    assert cycles(srcs) == []


def test_the_bench_flat_folder_is_gone(srcs):
    """Only the package itself, its ``__main__`` and ``data`` sit directly in ``unmask.bench``."""
    flat = sorted(m for m in srcs if m.count(".") == 2 and m.startswith("unmask.bench.")
                  and not any(other.startswith(m + ".") for other in srcs))
    assert flat == ["unmask.bench.__main__", "unmask.bench.data"]


def installed_packages() -> set[str]:
    """The packages ``pyproject.toml`` installs (``[tool.setuptools] packages``)."""
    root = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with open(root, "rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def test_pyproject_installs_every_package(srcs):
    """A package missing from the list works in an editable install and breaks in a wheel."""
    packages = {m for m in srcs if any(o.startswith(m + ".") for o in srcs)}
    assert packages - installed_packages() == set()


# --- each check fails on a planted violation ---------------------------------------------


def test_the_checks_catch_planted_violations(srcs):
    planted = dict(srcs)
    planted["unmask.attacks.pgd"] = srcs["unmask.attacks.pgd"] + (
        "\nfrom ..bench.suite import runner\n"
        "def _late():\n    from ..defenses import masking\n")
    up = upward_imports(planted)
    assert "unmask.attacks.pgd" in " ".join(up) and len(up) == 2
    assert [d for d in deferred_imports(planted) if d.startswith("unmask.attacks.pgd")]
    planted["unmask.attacks.fgsm"] = srcs["unmask.attacks.fgsm"] + (
        "\ndef _late():\n    import json\n")
    assert [d for d in unexplained_deferred_imports(planted)
            if d.startswith("unmask.attacks.fgsm")]
    planted["unmask.bench.core.enums"] = srcs["unmask.bench.core.enums"] + (
        "\nfrom . import threat\n")
    assert ["unmask.bench.core.enums", "unmask.bench.core.threat"] in cycles(planted)
    with pytest.raises(KeyError, match="no layer"):
        layer_of("unmask.somewhere_new")
