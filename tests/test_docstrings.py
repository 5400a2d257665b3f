"""Every public class, function and method of the package has a docstring.

Public: no leading underscore, defined in the module that is walked (not imported into it),
module-level classes and functions and the methods/properties of public classes. The modules
are found by walking the package, never from a list of files, so a module added or moved
anywhere under ``unmask`` is covered the day it appears.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import unmask

# The package's top-level sub-packages (DESIGN.md). An editable install exposes ``unmask`` as
# a namespace whose path hook pkgutil cannot list, so they are named here as well as found.
SUBPACKAGES = ("attacks", "bench", "defenses", "explain")


def package_modules() -> list[str]:
    """Names of every module of the package, found by walking it."""
    tops = {f"unmask.{name}" for name in SUBPACKAGES}
    tops |= {info.name for info in pkgutil.iter_modules(unmask.__path__, "unmask.")}
    names: set[str] = set()
    for top in sorted(tops):
        package = importlib.import_module(top)
        names.add(top)
        if hasattr(package, "__path__"):
            def fail(name: str) -> None:
                raise ImportError(f"cannot import {name} while walking the package")

            names.update(info.name for info in
                         pkgutil.walk_packages(package.__path__, f"{top}.", onerror=fail))
    # ``python -m`` entry points run the program when imported; they define nothing public.
    return sorted(n for n in names if not n.endswith(".__main__"))


def _has_own_doc(obj) -> bool:
    """The object's docstring is written, not generated (dataclass/namedtuple signatures)."""
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    if not doc or not doc.strip():
        return False
    if inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or issubclass(obj, tuple)):
        return not doc.startswith(f"{obj.__name__}(")
    return True


def _member_docs(cls) -> list[tuple[str, str | None]]:
    """(name, docstring) of the public methods, class/static methods and properties defined
    in ``cls`` itself. An override of a documented base method or property inherits its
    docstring (as :func:`inspect.getdoc` does for methods)."""
    out = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            docs = (getattr(vars(base).get(name), "__doc__", None) for base in cls.__mro__)
            out.append((name, next((d for d in docs if d), None)))
        elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
            out.append((name, inspect.getdoc(getattr(cls, name))))
    return out


def undocumented(module_name: str) -> list[str]:
    """Qualified names of the public classes/functions/methods of a module without docstring."""
    module = importlib.import_module(module_name)
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not _has_own_doc(obj):
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj):
            for member_name, doc in _member_docs(obj):
                if not doc or not doc.strip():
                    missing.append(f"{module_name}.{name}.{member_name}")
    return missing


def test_the_walk_finds_every_layer():
    modules = package_modules()
    for sub in SUBPACKAGES:
        assert sum(m.startswith(f"unmask.{sub}.") for m in modules) >= 3, sub
    assert "unmask.attacks.pgd" in modules


def test_every_public_object_has_a_docstring():
    missing = [name for module in package_modules() for name in undocumented(module)]
    assert not missing, (f"{len(missing)} public classes/functions/methods have no docstring:\n"
                         + "\n".join(missing))


def test_the_check_sees_a_missing_docstring(tmp_path, monkeypatch):
    """The checker itself: an undocumented public function, method or dataclass is reported,
    private names and imported names are not."""
    pkg = tmp_path / "docprobe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""probe."""\n')
    (pkg / "mod.py").write_text(
        '"""probe module."""\n'
        "import dataclasses\n"
        "from os.path import join\n"
        "def bare(): pass\n"
        "def _private(): pass\n"
        "def documented():\n    'yes'\n"
        "@dataclasses.dataclass\nclass Record:\n    a: int = 0\n"
        "class Thing:\n    'documented class'\n"
        "    def method(self): pass\n"
        "    @property\n    def prop(self): return 1\n"
        "    def _hidden(self): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert sorted(undocumented("docprobe_pkg.mod")) == [
        "docprobe_pkg.mod.Record", "docprobe_pkg.mod.Thing.method",
        "docprobe_pkg.mod.Thing.prop", "docprobe_pkg.mod.bare"]
