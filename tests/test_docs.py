"""The documentation site builds with `mkdocs build --strict`: a broken link or anchor, a page missing from the
nav, a bad API reference or a spec reference that cannot be rendered from the schema fails it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


@pytest.mark.slow
def test_the_site_builds_strictly_with_the_spec_reference_from_the_schema(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    reference = (tmp_path / "site" / "spec-reference" / "index.html").read_text()
    for key in ("search.confirm_seeds", "teacher.cache_mb", "resources.workers", "data.resident"):
        assert f"<code>{key}</code>" in reference, key
    assert "kdtune.distill.Distiller" in (tmp_path / "site" / "api" / "index.html").read_text()
