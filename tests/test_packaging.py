"""The wheel and the sdist hold what a user and a tester need: configs, py.typed, LICENSE; the sdist the tests."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build", reason="`build` is in the `test` extra")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_wheel_contents(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"lightning_soo/configs/{n}.yaml" for n in ("kfac", "shampoo", "gauss_newton", "psgd", "curvature")}
    assert {"lightning_soo/py.typed", "lightning_soo/__main__.py", *configs} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    metadata = next(zipfile.ZipFile(wheel).read(n) for n in names if n.endswith(".dist-info/METADATA")).decode()
    assert "Framework :: Pytest" not in metadata and "Typing :: Typed" in metadata
    assert "../shared" not in metadata


def test_sdist_holds_the_tests(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {
        "LICENSE",
        "mkdocs.yml",
        "tests/conftest.py",
        "tests/reference.py",
        "tests/cases.py",
        "tests/cli_project/train.py",
        "tests/cli_project/user.yaml",
        "tests/engine/ddp_run.py",
        "callbacks/kfac.yaml",
        "examples/dashboard.py",
        "benchmarks/common.py",
        "docs/hooks.py",
    }
    assert needed <= names, needed - names
    test_files = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")}
    assert test_files <= names, test_files - names
