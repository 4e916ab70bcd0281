"""MLflow layout: experiment <name>, a parent run per sweep, one child run per trial.

Trials create their own child run (idempotently, keyed by the Ray trial id, so a
restored trial reattaches to it, and one restored after it completed replays its result
from it), log their own epochs to it and end it when they complete; the driver ends the runs
of early-stopped, failed and interrupted trials, so none stays RUNNING.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from functools import lru_cache
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kdtune.errors import TrackingError

DEFAULT_URI = "sqlite:///mlflow.db"
LOGGED_METRICS = ("epoch", "val_acc", "val_loss", "test_acc", "params", "extra_params", "epoch_seconds", "teacher_live_batches",
                  "teacher_passes", "flops", "latency_ms", "model_mb")
LOGGED_PREFIXES = ("loss_", "val_", "test_")  # loss terms; the `evaluate` function's val_<name> and test_<name>
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "kdtune.trial_id"
PHASE_TAG = "kdtune.phase"
CONFIG_TAG = "kdtune.config"  # the trial's config as JSON


def absolute_uri(uri: str | None) -> str:
    """Make a relative sqlite path absolute: Ray trials run in other working directories."""
    uri = uri or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


@contextmanager
def _fail_fast():
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def check_reachable(uri: str) -> None:
    """Fail in seconds, before any training, if the tracking store cannot be used."""
    with _fail_fast():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrackingError(f"MLflow tracking URI {uri} cannot be reached: {first[:300]}") from None


def use_wal(uri: str) -> None:
    """Put a local sqlite store in write-ahead-log mode (a setting of the file, kept from then on):
    dozens of trials then write while others read, instead of queueing behind every reader.
    MLflow's own busy timeout (20 s) covers the writers' short turns."""
    if uri.startswith("sqlite:///"):
        with closing(sqlite3.connect(uri[len("sqlite:///"):], timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def ui_link(uri: str, exp_id: str) -> str:
    """Where the MLflow UI shows the experiment's runs. MLflow 3's UI opens every experiment on its
    GenAI overview unless the page asks for the model-training workflow (`workflowType`); the
    experiment tag `mlflow.experimentKind` does not change that (MLflow 3.17)."""
    page = f"/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/") + page
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000{page}"


def flatten(mapping: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}, for MLflow params."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _params(values: dict) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def start_parent(client: MlflowClient, exp_id: str, spec_dict: dict) -> str:
    run = client.create_run(exp_id, run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={"kdtune.kind": "sweep", "kdtune.name": spec_dict["name"]})
    client.log_batch(run.info.run_id, params=_params(flatten(spec_dict)))
    client.log_text(run.info.run_id, json.dumps(spec_dict, indent=2), "spec.json")
    return run.info.run_id


@lru_cache(maxsize=4)
def client(uri: str) -> MlflowClient:
    """One client per store and process: a reused actor's next trial skips opening the store."""
    return MlflowClient(uri)


def child_run(client: MlflowClient, exp_id: str, parent_id: str, trial_id: str, run_name: str,
              params: dict, tags: dict) -> str:
    """The trial's child run: the existing one for this trial id, else a new one."""
    found = client.search_runs([exp_id], f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_id}'",
                               max_results=1)
    if found:  # a restarted trial keeps its run, and the run counts the starts; a completed run stays as it is
        run_id = found[0].info.run_id
        if not completed(found[0]):
            client.set_tag(run_id, "kdtune.starts", int(found[0].data.tags.get("kdtune.starts", 1)) + 1)
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name,
                            tags={PARENT_TAG: parent_id, TRIAL_TAG: trial_id, "kdtune.starts": "1", **tags})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def completed(run) -> bool:
    """Whether the driver ended the run with its trial's outcome (finished, early-stopped, diverged).
    Such a trial may still be restored after a driver kill, when Tune had not yet recorded its end;
    an interrupted or errored one is meant to train again."""
    tags = run.data.tags
    return run.info.status != "RUNNING" and (tags.get("kdtune.status") in ("FINISHED", "STOPPED", "INFEASIBLE")
                                             or tags.get("kdtune.reason") == "diverged")


def completed_runs(client: MlflowClient, exp_id: str, parent_id: str, phase: str) -> list:
    """The sweep's child runs of `phase` whose trials completed (see `completed`)."""
    runs = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{PHASE_TAG}` = '{phase}'",
                              max_results=50000)
    return [run for run in runs if completed(run)]


def completed_trial_ids(client: MlflowClient, exp_id: str, parent_id: str, phase: str) -> set[str]:
    return {run.data.tags[TRIAL_TAG] for run in completed_runs(client, exp_id, parent_id, phase)}


def final_result(client: MlflowClient, run_id: str) -> dict | None:
    """A completed run's last result rebuilt from its logged metrics, for Tune to record it again
    without rerunning the trial; None when the trial has to train."""
    run = client.get_run(run_id)
    if not completed(run):
        return None
    diverged = run.data.tags.get("kdtune.reason") == "diverged"
    epoch = max((m.step for m in client.get_metric_history(run_id, "val_acc")), default=0)
    infeasible = run.data.tags["kdtune.status"] == "INFEASIBLE"  # recorded without training
    return {**run.data.metrics, "epoch": epoch, "diverged": diverged, **({"infeasible": True} if infeasible else {}),
            "done": diverged or infeasible or run.data.tags["kdtune.status"] == "FINISHED"}


def log_epoch(client: MlflowClient, run_id: str, result: dict) -> None:
    """One epoch's metrics, and the student's size as the `kdtune.params` tag the UI groups by
    (known from the first epoch on; setting it again is a no-op)."""
    step = int(result.get("epoch", 0))
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in result.items()
               if (k in LOGGED_METRICS or k.startswith(LOGGED_PREFIXES)) and isinstance(v, (int, float))
               and not isinstance(v, bool)]
    tags = [RunTag("kdtune.params", str(int(result["params"])))] if "params" in result else []
    client.log_batch(run_id, metrics=metrics, tags=tags)


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    tags = [RunTag("kdtune.status", status)] + ([RunTag("kdtune.reason", reason[:5000])] if reason else [])
    client.log_batch(run_id, tags=tags)
    mlflow_status = {"STOPPED": "FINISHED", "INFEASIBLE": "FINISHED"}.get(status, status)
    client.set_terminated(run_id, mlflow_status)


def close_open_children(client: MlflowClient, exp_id: str, parent_id: str, status: str = "KILLED") -> int:
    """End every child of the sweep still RUNNING (interrupt, crash): none may stay RUNNING."""
    runs = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        end_run(client, run.info.run_id, status)
    return len(runs)


def ended_statuses(client: MlflowClient, exp_id: str, parent_id: str) -> dict[str, tuple[str, str]]:
    """run id -> (status, reason) of the sweep's child runs that the driver ended."""
    runs = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50000)
    return {r.info.run_id: (r.data.tags["kdtune.status"], r.data.tags.get("kdtune.reason", ""))
            for r in runs if "kdtune.status" in r.data.tags}


# A tracking server that restarts: MLflow retries each HTTP request (POSTs too) with exponential
# backoff, 0+2+4+8+16+32 s, so an outage of about a minute costs waiting, not runs. Set before the
# first request and before Ray starts, so local trial workers inherit it; the user's values win.
# No "View run ... at" line per ended run, no progress bar per model up- or download.
RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
           "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
DOWN_PAUSE_S = 60.0
_down_until = 0.0


def use_retries() -> None:
    for key, value in RETRIES.items():
        os.environ.setdefault(key, value)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def guarded(what: str, fn, *args, default=None, **kwargs):
    """`fn(*args)`, or `default` when the tracking store fails even after MLflow's retries.

    A store still down after its retries is not asked again for DOWN_PAUSE_S in this process,
    so a sweep whose server stays down keeps training instead of waiting on every call; the
    driver's final reconciliation logs what was skipped, or names the runs it could not."""
    if is_down():
        return default
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any store failure; the trial must not die of it
        mark_down()
        print(f"kdtune: MLflow unavailable ({what}): {first_line(exc)}", flush=True)
        return default


def mark_down() -> None:
    global _down_until
    _down_until = time.time() + DOWN_PAUSE_S


def is_down() -> bool:
    return time.time() < _down_until


def tag_study(client, parent_id: str, url: str, study: str) -> None:
    """The parent run names its Optuna study on record, for `optuna.load_study`."""
    guarded("tag parent", client.set_tag, parent_id, "kdtune.optuna_storage", url)
    guarded("tag parent", client.set_tag, parent_id, "kdtune.optuna_study", study)
