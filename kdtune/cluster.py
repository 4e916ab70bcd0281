"""Ray for a sweep: a private local instance, or a cluster joined with its token, with the
user's own model and dataset modules shipped to every node."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterable, Optional


def _installed(path: Path) -> bool:
    """Whether a module file belongs to the Python installation (site-packages, stdlib)."""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    return any(str(path).startswith(str(Path(r).resolve())) for r in roots) or "site-packages" in path.parts


def user_modules(import_paths: Iterable[str]) -> list[str]:
    """Local files or package folders of the `package.module:attr` paths that are not installed:
    the trials on other nodes import them through Ray's runtime_env `py_modules`. kdtune itself (its
    built-in `kdtune.evaluation:top1_top5`) is never shipped: every trial runs it already."""
    found = []
    for path in import_paths:
        top = path.split(":", 1)[0].split(".")[0]
        origin = module_file(top) if top != "kdtune" else None
        if not origin:
            continue
        origin = Path(origin).resolve()
        shipped = origin.parent if origin.name == "__init__.py" else origin
        if not _installed(origin) and str(shipped) not in found:
            found.append(str(shipped))
    return found


def use_token_auth() -> None:
    """Token auth (Ray >= 2.52): `ray start --head` turns it on when a token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), but ray.init(address=...) sends the token only with
    RAY_AUTH_MODE=token. Do as the head does unless RAY_AUTH_MODE is set (e.g. disabled); a cluster
    without auth ignores the token. Ray reads the setting when it is imported: a process that imported
    Ray before (a notebook) sets RAY_AUTH_MODE=token itself."""
    has_token = (bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
                 or (Path.home() / ".ray" / "auth_token").is_file())
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def module_file(name: str) -> Optional[str]:
    """The file of a top-level module, imported or not yet (Ray may start before the spec's modules
    are imported); None for a module that cannot be found or has no file."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.has_location else None


def init_ray(address: Optional[str], py_modules: list[str] = ()):
    """Join `address`, or start a private local Ray in kdtune's own temp dir (never attach by accident).
    Returns that temp dir (None when joining), for the caller to remove."""
    if address:
        use_token_auth()
    import ray

    # Tune snapshots the experiment on its own adaptive period (TUNE_GLOBAL_CHECKPOINT_S): what a
    # resume needs beyond the last snapshot is in MLflow and the Optuna study (kdtune.search).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # MLflow is the sweep's record: Tune's default CSV, JSON and TensorBoard files per trial would
    # repeat it, for the driver's CPU (a TensorBoard writer opened per trial, every result written).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ...whose absence Tune's ResultGrid reports with a warning line per trial when it is built
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # A reused actor waits this long for the previous trial's thread to end, else the next trial fails
    # with "Trainable runner reuse requires reset_config() ...": Tune's default, 2 s, is exceeded on a
    # loaded machine, and a trial that ends while the tracking server is down is still in MLflow's
    # retries (kdtune.tracking.RETRIES: about a minute of backoff), so it waits past them.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "180")
    # the trial actors read it: on a cluster they get the job's runtime_env, not the driver's environment
    runtime_env = {"env_vars": {"TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"]}}
    if py_modules:
        runtime_env["py_modules"] = list(py_modules)
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, runtime_env=runtime_env, **quiet)
        return None
    temp_dir = tempfile.mkdtemp(prefix="kdtune-ray-", dir="/tmp")
    ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False, runtime_env=runtime_env, **quiet)
    return temp_dir
