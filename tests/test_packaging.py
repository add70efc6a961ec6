"""The wheel installs one top-level name, `scdm`, with its data files and the `scdm` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # build from a copy: a stale build/ folder in the checkout could otherwise leak old files into the wheel
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True)
    (path,) = out.glob("scdm-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_the_scdm_package(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("scdm-")
    assert top - dist_info == {"scdm"}


def test_the_wheel_carries_every_package_file_and_the_command(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    package = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "scdm").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert "scdm/store/_data/A375_melanoma_GSE108383.h5ad" in package and "scdm/__main__.py" in package
    assert package - names == set(), "package files missing from the wheel (add them to package-data)"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "scdm = scdm.cli:main" in wheel.read(entry_points).decode()
