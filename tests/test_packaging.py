"""Packaging: the wheel holds only ``unmask`` (the four folders as its sub-packages) and
imports on its own; the installed package imports from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("bench", "attacks", "defenses", "explain")
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".benchmarks", "*.sqlite*", "*.pyc")


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INDEX": "1", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy of the working tree: the build writes build/ and *.egg-info next to
    # the sources, which must not race with other builds in the repository.
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(REPO, src, ignore=IGNORED)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out)],
        cwd=src, capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("unmask-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_only_unmask(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and dist_info[0].startswith("unmask-")
    assert top == {"unmask", dist_info[0]}, top
    assert not [n for n in names if "/tests/" in n or n.endswith("conftest.py")]


def test_wheel_has_every_module_of_the_four_subpackages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in SUBPACKAGES:
        assert f"unmask/{pkg}/__init__.py" in names
        # Every source file of the folder ships, including any nested sub-package.
        for path in (REPO / pkg).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(REPO / pkg).as_posix()
            assert f"unmask/{pkg}/{rel}" in names, f"{pkg}/{rel} is missing from the wheel"
    for module in ("core/__init__", "data", "zoo/__init__", "core/registry", "core/training",
                   "zoo/archs", "cli/__init__", "cli/main", "__main__", "suite/runner",
                   "report/leaderboard", "perf/harness"):
        assert f"unmask/bench/{module}.py" in names
    assert "unmask/bench/suites/default.toml" in names


def test_wheel_metadata(wheel):
    zf = zipfile.ZipFile(wheel)
    dist_info = next(n.split("/")[0] for n in zf.namelist() if ".dist-info/" in n)
    entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert "unmask = unmask.bench.cli:main" in entry_points
    metadata = zf.read(f"{dist_info}/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: torch") for r in requires)
    assert not any("==2.13" in r for r in requires if "torch" in r)
    assert "Requires-Python: >=3.10" in metadata


def test_wheel_imports_on_its_own(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S: no site-packages processing, so the editable install's path hooks are not there;
    # the dependencies come from this interpreter's site-packages, unmask from the wheel only.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        f"sys.path.extend({sorted(deps)!r})\n"
        "import unmask.bench, unmask.attacks, unmask.defenses, unmask.explain\n"
        "from unmask.bench import cli, data, zoo\n"
        "for m in (unmask.bench, unmask.attacks, unmask.defenses, unmask.explain, zoo):\n"
        f"    assert m.__file__.startswith({str(site)!r}), m.__file__\n"
        "t = unmask.bench.Threat('linf', 0.1)\n"
        "assert 'mnist-cnn' in zoo.list()\n"
        "raise SystemExit(cli.main(['data', 'list']))\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=_env(PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr
    assert "mnist5k" in proc.stdout


def test_installed_package_imports_from_another_directory(tmp_path):
    code = (
        "import unmask.bench, unmask.attacks, unmask.defenses, unmask.explain\n"
        "from unmask.bench import zoo\n"
        "print(unmask.bench.__version__)\n"
        "print(zoo.list())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=_env(PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr
    version, names = proc.stdout.strip().splitlines()[-2:]
    assert version != "0+unknown" and "mnist-cnn" in names
