"""The documentation site (mkdocs-material + mkdocstrings, the `docs` extra, also in `test`) builds with warnings
as errors, and its guide pages carry the README's sections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ScaledDamping" in (site / "guides" / "methods" / "index.html").read_text()
    assert "KFACCallback" in (site / "api" / "callbacks" / "index.html").read_text()
    assert (site / "images" / "tensorboard_custom_scalars.png").exists()
