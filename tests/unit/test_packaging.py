"""What the project installs: one import name, `leveret`, and every module in it.

pyproject.toml maps directories onto packages (`shared/` -> `leveret`,
`services/<name>/` -> `leveret.<name>`) and lists the packages by hand. An editable
install finds any module under a mapped directory, but a wheel holds only the
listed packages: a sub-package added without being listed works in development
and is missing from the image. These tests build a real wheel to catch that, and
check that `shared` and `services` never become importable names.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
SERVICES = ("scheduler", "worker", "tracker", "cli")
FORBIDDEN_TOP_LEVEL = {"shared", "services"}
BUILD_TIMEOUT_S = 60
_IGNORE = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info", "build", "dist")


def _build_requirements_installed() -> bool:
    """Whether this interpreter already has pyproject's build requirements, so the
    wheel can be built without an isolated environment (and without the network)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return False
    for spec in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(spec)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(version, prereleases=True):
            return False
    return True


def _build_command(src: Path, out: Path) -> list[str]:
    isolated = not _build_requirements_installed()
    if importlib.util.find_spec("build") is not None:
        command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)]
        return command if isolated else [*command, "--no-isolation"]
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out)]
    return [*command, str(src)] if isolated else [*command, "--no-build-isolation", str(src)]


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the wheel is built from. Building in the working tree would
    leave build/ and *.egg-info there, and race with anyone editing it."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / PYPROJECT["project"]["readme"], src)
    for directory in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / directory, src / directory, ignore=_IGNORE, dirs_exist_ok=True)
    return src


@pytest.fixture(scope="module")
def wheel(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built by the standard frontend (PyPI only for the backend)."""
    out = tmp_path_factory.mktemp("dist")
    try:
        done = subprocess.run(
            _build_command(source_tree, out),
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"building the wheel took over {BUILD_TIMEOUT_S} s")
    if done.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _dist_info(names: list[str]) -> str:
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    return dist_info


@pytest.mark.timeout(BUILD_TIMEOUT_S + 30)
def test_wheel_holds_only_the_leveret_package(wheel: Path, wheel_names: list[str]) -> None:
    dist_info = _dist_info(wheel_names)
    outside = [n for n in wheel_names if not n.startswith(("leveret/", f"{dist_info}/"))]
    assert not outside, f"files outside leveret/: {outside}"
    assert all(n.startswith("leveret/") for n in wheel_names if n.endswith(".py"))
    # setuptools writes top_level.txt; it names the one import name the wheel installs
    top_level = f"{dist_info}/top_level.txt"
    assert top_level in wheel_names
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(top_level).decode().split() == ["leveret"]


@pytest.mark.timeout(BUILD_TIMEOUT_S + 30)
def test_wheel_holds_every_service_and_the_typing_marker(wheel_names: list[str]) -> None:
    for service in SERVICES:
        assert f"leveret/{service}/__init__.py" in wheel_names, f"leveret.{service} missing"
    assert "leveret/py.typed" in wheel_names


@pytest.mark.timeout(BUILD_TIMEOUT_S + 30)
def test_wheel_holds_every_source_module(source_tree: Path, wheel_names: list[str]) -> None:
    mapped = {(source_tree / d).resolve() for d in PACKAGE_DIRS.values()}
    missing = []
    for package, directory in PACKAGE_DIRS.items():
        base = (source_tree / directory).resolve()
        for module in base.rglob("*.py"):
            # a nested directory mapped to a package of its own is checked under that one
            owner = max((m for m in mapped if module.is_relative_to(m)), key=lambda m: len(m.parts))
            if owner != base:
                continue
            target = "/".join([*package.split("."), *module.relative_to(base).parts])
            if target not in set(wheel_names):
                missing.append(f"{directory}/{module.relative_to(base).as_posix()}")
    assert not missing, (
        f"not in the wheel (list their packages under [tool.setuptools] packages): {missing}"
    )


@pytest.mark.timeout(BUILD_TIMEOUT_S + 30)
def test_wheel_declares_the_console_script(wheel: Path, wheel_names: list[str]) -> None:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"{_dist_info(wheel_names)}/entry_points.txt").decode()
    entry_points = configparser.ConfigParser()
    entry_points.read_string(text)
    assert entry_points["console_scripts"]["leveret"] == PYPROJECT["project"]["scripts"]["leveret"]


@pytest.mark.timeout(BUILD_TIMEOUT_S + 60)
def test_wheel_installs_only_leveret_into_site_packages(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    before = set(os.listdir(purelib))
    # This interpreter's pip installs into the new venv; --no-deps keeps it offline.
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"),
            *("-q", "--disable-pip-version-check", str(wheel)),
        ],
        check=True,
        timeout=60,
    )
    added = set(os.listdir(purelib)) - before
    assert "leveret" in added
    assert not added & FORBIDDEN_TOP_LEVEL
    others = {a for a in added if a != "leveret" and not a.startswith("leveret-")}
    assert not others, f"installed beside leveret: {others}"
    for service in SERVICES:
        assert (purelib / "leveret" / service / "__init__.py").is_file()
    assert (purelib / "leveret" / "py.typed").is_file()
    assert (venv / "bin" / "leveret").is_file()


_FIND_SPECS = """
import importlib.util, json, sys
names = sys.argv[1:]
specs = {n: importlib.util.find_spec(n) for n in names}
print(json.dumps({n: s.origin if s else None for n, s in specs.items()}))
"""


def test_editable_install_exposes_only_leveret(tmp_path: Path) -> None:
    # A fresh interpreter away from the repository: the working directory on
    # sys.path would make `shared` importable however the project is installed.
    names = [*sorted(FORBIDDEN_TOP_LEVEL), "leveret", *(f"leveret.{s}" for s in SERVICES)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [sys.executable, "-I", "-c", _FIND_SPECS, *names],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    origins = json.loads(done.stdout)
    for name in FORBIDDEN_TOP_LEVEL:
        assert origins[name] is None, f"`import {name}` works: {origins[name]}"
    for name in ["leveret", *(f"leveret.{s}" for s in SERVICES)]:
        assert origins[name], f"{name} is not importable"


def _imported_top_levels(tree: ast.AST) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def test_no_code_imports_the_source_directories() -> None:
    # From the repository root `import shared` works (the working directory is on
    # sys.path), so such an import passes locally and breaks once installed.
    offenders = []
    for directory in ("shared", "services", "tests"):
        for path in sorted((ROOT / directory).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            tree = ast.parse(path.read_text(), str(path))
            for name, line in sorted(_imported_top_levels(tree)):
                if name in FORBIDDEN_TOP_LEVEL:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, offenders
