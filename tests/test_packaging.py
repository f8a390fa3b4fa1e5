"""The installed distribution: everything lives under ``blaze_jobs``, so installing Blaze Jobs
claims no generic top-level name (``api``, ``workers``, ``celeryconfig``) in site-packages,
and what is installed runs without the source tree beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Not sources: the checkout's caches, virtual environment, models and earlier builds.
NOT_SOURCES = shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info", "*.png")


def installed_paths() -> Iterator[tuple[str, str]]:
    """Each source and data file of the checkout's packages, with the path it has inside the wheel."""
    for folder, package in (("blaze_jobs", "blaze_jobs"), ("api", "blaze_jobs/api"), ("workers", "blaze_jobs/workers")):
        for path in sorted((ROOT / folder).rglob("*")):
            # The Lua scripts and the console's files are package data: a wheel without them fails.
            if path.suffix in (".py", ".lua", ".html", ".js", ".css", ".svg") and "__pycache__" not in path.parts:
                relative = path.relative_to(ROOT / folder).as_posix()
                yield f"{folder}/{relative}", f"{package}/{relative}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel pip builds from a copy of this checkout (a copy, so the build leaves nothing here)."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-q"]
        + ["-w", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (work / "dist").glob("blaze_jobs-*.whl")
    yield found


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's files as an installer lays them out in site-packages."""
    target = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_the_wheel_installs_only_the_blaze_jobs_package(wheel: Path) -> None:
    # Given the wheel pip builds from this checkout
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (dist_info,) = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()

    # Then every file but its metadata is under blaze_jobs/, and its metadata says so too
    assert {name.split("/")[0] for name in names} - {dist_info} == {"blaze_jobs"}
    assert top_level == ["blaze_jobs"]
    # and the API, the workers and the Celery configuration are in it, under blaze_jobs
    for module in ("api/__main__.py", "api/app.py", "workers/engine.py", "workers/webhooks.py", "celeryconfig.py"):
        assert f"blaze_jobs/{module}" in names, module
    # and so is every module and Lua script of the three folders (a package left out of
    # pyproject.toml's list would be missing here)
    missing = [source for source, installed in installed_paths() if installed not in names]
    assert not missing, missing
    assert "blaze = blaze_jobs.cli:main" in entry_points


def test_the_installed_package_runs_away_from_the_source_tree(unpacked: Path, tmp_path: Path) -> None:
    # Given the wheel's files first on the path, and a working directory with no sources in it
    env = {**os.environ, "PYTHONPATH": str(unpacked)}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    # When the modules the CLI and Celery name are imported
    code = (
        "import importlib.util, sys\n"
        "import blaze_jobs.api.app, blaze_jobs.workers.webhooks, blaze_jobs.celery_app\n"
        "print(blaze_jobs.api.app.__file__)\n"
        "print(blaze_jobs.celery_app.app.conf.task_default_queue)\n"
        "print([name for name in ('api', 'workers', 'celeryconfig') if importlib.util.find_spec(name)])\n"
    )
    imported = run("-c", code)

    # Then they come from the installed files, Celery reads its configuration from
    # blaze_jobs.celeryconfig, and the generic names are nowhere to be found
    assert imported.returncode == 0, imported.stderr
    module_file, default_queue, generic = imported.stdout.split("\n")[:3]
    assert Path(module_file) == unpacked / "blaze_jobs" / "api" / "app.py"
    assert default_queue == "echo"
    assert generic == "[]"

    # And the entry points `blaze api` and `blaze worker` exec start and answer --help
    for module in ("blaze_jobs.api", "blaze_jobs.workers.engine", "blaze_jobs.workers.webhooks"):
        helped = run("-m", module, "--help")
        assert helped.returncode == 0 and "usage: blaze" in helped.stdout, (module, helped.stderr)
