"""`python -m kdtune.sweep SPEC`: validate, prepare data and teacher, search, report.

Bad input (spec, data, teacher checkpoint, tracking URI) exits with status 2 and one
message, before Ray starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

SMOKE = ["data.train_limit=5000", "data.val_size=1000", "data.test_limit=1000", "teacher.epochs=1",
         "train.epochs=1", "search.num_samples=4", "search.scheduler=null"]


def log(message: str) -> None:
    print(f"kdtune: {message}", flush=True)


@dataclass
class Options:
    results_dir: str = "results"
    tracking_uri: str | None = None
    address: str | None = None
    storage: str | None = None
    resume: bool = False


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m kdtune.sweep",
                                     description="Search distillation recipes with Ray Tune + Optuna, log to MLflow.")
    parser.add_argument("spec", help="YAML spec, e.g. search_spaces/mnist.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a spec key (validated like the file); repeatable")
    parser.add_argument("--results-dir", default="results", help="results/<name>/ goes here (default: results)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--smoke", action="store_true",
                        help="the same sweep shrunk to about a minute on 2 cores: a data slice, 1 epoch, 4 samples")
    parser.add_argument("--address", help="join an existing Ray cluster (default: a private local one)")
    parser.add_argument("--storage", help="where Ray keeps trial state: shared path or s3:// / gs:// URI")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    return parser.parse_args(argv)


def versions() -> dict:
    names = ["kdtune", "torch", "torchvision", "ray", "optuna", "mlflow", "pandas", "pydantic"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": platform.python_version(), **found}


def init_ray(address: str | None):
    """Join `address`, or start a private local Ray in kdtune's own temp dir (never attach by accident)."""
    import ray

    # Snapshot the experiment state at every step, not every 10+ s: a driver killed between two
    # snapshots loses the trials started since, and --resume would sample them anew.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        # Token auth (Ray >= 2.52): `ray start --head` turns it on when a token is at hand (RAY_AUTH_TOKEN,
        # RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), but ray.init(address=...) sends the token only with
        # RAY_AUTH_MODE=token. Do as the head does unless RAY_AUTH_MODE is set (e.g. disabled); a cluster
        # without auth ignores the token.
        has_token = (bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
                     or (Path.home() / ".ray" / "auth_token").is_file())
        if has_token and "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = "token"
            ray._raylet.Config.initialize("")  # ray is imported already: make it re-read RAY_AUTH_MODE
        ray.init(address=address, **quiet)
        return None
    temp_dir = tempfile.mkdtemp(prefix="kdtune-ray-", dir="/tmp")
    ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False, **quiet)
    return temp_dir


def main(argv=None) -> int:
    from kdtune.datasets import DataError
    from kdtune.spec import SpecError, load_spec
    from kdtune.teacher import TeacherError
    from kdtune.tracking import TrackingError

    args = parse_args(argv)
    options = Options(args.results_dir, args.tracking_uri, args.address, args.storage, args.resume)
    try:
        spec = load_spec(args.spec, (SMOKE if args.smoke else []) + args.set)
        if args.smoke:
            spec.search.confirm_seeds = min(spec.search.confirm_seeds, 2)
        from kdtune.runner import run_sweep
        return run_sweep(spec, options)
    except SpecError as exc:
        print(f"kdtune: spec error: {exc}", file=sys.stderr)
    except (DataError, TeacherError, TrackingError) as exc:
        print(f"kdtune: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("kdtune: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
