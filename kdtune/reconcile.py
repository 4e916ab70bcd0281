"""Make MLflow agree with trials.csv at a sweep's end (and at `--sync`), whatever the tracking
server did during the sweep: each trial has exactly one run (a duplicate created by a retried
request is deleted; a run that could not be created is created now), with its final metrics and its
end status; a run of a trial Tune never recorded (started just before a driver kill, after Tune's
last snapshot of the experiment, so sampled anew on resume) is ended KILLED and deleted.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict

import pandas as pd
from mlflow.entities import Metric

from kdtune import results, tracking
from kdtune.log import log

FINAL_METRICS = {"val_acc": "val_acc", "test_acc": "test_acc", "params": "params", "extra_params": "extra_params",
                 "epochs": "epoch"}
NOT_PARAMS = set(results.METRIC_COLUMNS) | {"trial_id", "phase", "student", "search_front", "model_uri", "sweep",
                                            "sweep_name"}


def present(value) -> bool:
    return value is not None and value is not pd.NA and not (isinstance(value, float) and math.isnan(value))


def reconcile(client, exp_id: str, parent_id: str, trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Make the parent's child runs match `trials` (one row per trial). Returns the table with the
    run ids MLflow now holds, and the trial ids whose runs could not be made right."""
    trials = trials.copy()
    trials["mlflow_run_id"] = trials["mlflow_run_id"].astype(object)  # all missing reads back as float
    try:
        runs = client.search_runs([exp_id], f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'", max_results=50000)
    except Exception as exc:  # noqa: BLE001 - the server is down: every run is unverified
        log(f"MLflow unavailable (reconcile): {tracking.first_line(exc)}")
        tracking.mark_down()
        return trials, list(trials["trial_id"])
    by_trial = defaultdict(list)
    for run in runs:
        by_trial[run.data.tags.get(tracking.TRIAL_TAG)].append(run)
    missing = []
    for index, row in trials.iterrows():
        try:
            trials.at[index, "mlflow_run_id"] = _reconcile_one(client, exp_id, parent_id, row, by_trial[row["trial_id"]])
        except Exception as exc:  # noqa: BLE001
            log(f"MLflow: cannot reconcile trial {row['trial_id']}: {tracking.first_line(exc)}")
            missing.append(row["trial_id"])
    known = set(trials["trial_id"])
    orphans = [run for trial_id, found in by_trial.items() if trial_id and trial_id not in known for run in found]
    # deleted, not purged: `mlflow runs restore` brings one back
    dropped = sum(tracking.guarded("delete orphan run", _drop_orphan, client, run, default=False) for run in orphans)
    if dropped:
        log(f"MLflow: deleted {dropped} run(s) of trials Tune never recorded (started just before a driver kill)")
    return trials, missing


def _drop_orphan(client, run) -> bool:
    if run.info.status == "RUNNING":
        tracking.end_run(client, run.info.run_id, "KILLED", "orphan: Tune never recorded this trial")
    client.set_tag(run.info.run_id, "kdtune.reconciled", "orphan")
    client.delete_run(run.info.run_id)
    return True


def _reconcile_one(client, exp_id: str, parent_id: str, row: pd.Series, found: list) -> str:
    reported = row.get("mlflow_run_id") if present(row.get("mlflow_run_id")) else None
    found = sorted(found, key=lambda r: r.info.start_time or 0)
    keep = next((r for r in found if r.info.run_id == reported), found[0] if found else None)
    if keep is None:  # the trial could not create its run: create it now, with what trials.csv knows
        tags = {"kdtune.phase": row["phase"], "kdtune.loss": row["loss"], "kdtune.student": row["student"],
                "kdtune.sweep": parent_id, "kdtune.reconciled": "created"}
        if present(row.get("params")):
            tags["kdtune.params"] = str(int(row["params"]))
        evaluated = set(results.evaluation_columns(row.index))
        params = {k: v for k, v in row.items() if k not in NOT_PARAMS | evaluated and present(v)}
        run_id = tracking.child_run(client, exp_id, parent_id, row["trial_id"],
                                    f"{row['trial_id']} {row['loss']} {row['student']}", params, tags)
        keep = client.get_run(run_id)
    run_id = keep.info.run_id
    for duplicate in found:
        if duplicate.info.run_id != run_id:
            client.delete_run(duplicate.info.run_id)
    epoch = int(row["epochs"]) if present(row.get("epochs")) else 0
    now = int(time.time() * 1000)
    final = {**FINAL_METRICS, **{c: c for c in results.evaluation_columns(row.index)}}
    lacking = [Metric(metric, float(row[column]), now, epoch) for column, metric in final.items()
               if present(row.get(column)) and not _same(keep.data.metrics.get(metric), float(row[column]))]
    if lacking:
        client.log_batch(run_id, metrics=lacking)
    status = row["status"]
    if keep.info.status == "RUNNING" or keep.data.tags.get("kdtune.status") != status:
        reason = row.get("reason")
        tracking.end_run(client, run_id, status, reason if present(reason) and reason else None)
    return run_id


def _same(logged, value: float) -> bool:
    return logged is not None and (logged == value or (math.isnan(logged) and math.isnan(value)))
