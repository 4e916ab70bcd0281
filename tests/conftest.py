"""Shared fixtures: a real MNIST root, a teacher cache shared by the session, and a CLI runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "search_spaces" / "mnist.yaml"
# --smoke at its former cost, for tests of mechanics rather than accuracy (logging, resuming,
# clusters): a 5,000-image slice, one epoch each, in batches of 256.
LIGHT_SMOKE = ["data.train_limit=5000", "teacher.epochs=1", "train.epochs=1", "teacher.batch_size=256",
               "train.batch_size=256"]
QUICK_TIMING = "deploy.timing_seconds=0.3"  # latency sampled briefly: the tests check what is measured, not how well


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A torchvision root that the real loader fills from kdtune's bundled MNIST .gz files."""
    return tmp_path_factory.mktemp("mnist")


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture
def run_cli(mnist_root, teacher_cache):
    """Run `python -m kdtune.sweep ...` in `cwd` with its own MLflow store and results dir."""
    def run(args, cwd: Path, timeout=600, background=False):
        env = {**os.environ, "KDTUNE_CACHE": str(teacher_cache), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "kdtune.sweep",  # the caller's args come last, so they win
                   "--results-dir", str(cwd / "results"), "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}",
                   "--set", f"data.root={mnist_root}", "--set", QUICK_TIMING, *map(str, args)]
        if background:  # the caller signals and waits for it
            return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return run


def assert_exit_2_naming(status: int, err: str, key: str, fragments: list[str]) -> None:
    """A bad input's CLI exit: status 2 and one `kdtune:` line (MLflow may log its store's set-up)
    naming the key path and saying each fragment, no traceback."""
    assert status == 2, err
    assert "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("kdtune:")]
    assert f": {key}: " in line, line
    for fragment in fragments:
        assert fragment in line, line
