"""An experiment's sweeps and trials, read from MLflow alone (`mlflow.search_runs` into pandas),
in the layout of the sweep's trials.csv."""
from __future__ import annotations

import json
import tempfile

import numpy as np
import pandas as pd

from kdtune import results, tracking
from kdtune.measure import MEASURED

PHASES = {"search": 0, "confirm": 1}


class ReportError(Exception):
    """The experiment or sweep cannot be found."""


def _numeric(column: pd.Series) -> pd.Series:
    """MLflow params are strings: a column whose every value is a number becomes numeric."""
    column = column.where(~column.isin(["None", "nan"]), None)
    converted = pd.to_numeric(column, errors="coerce")
    if not column.notna().any():
        return converted  # never set: all missing, as a float column
    return converted if converted[column.notna()].notna().all() else column


def spec_of(client, parent_id: str) -> dict:
    """The resolved spec a sweep logged as spec.json on its parent run."""
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(parent_id, "spec.json", folder)
        with open(path) as f:
            return json.load(f)


def columns_of(spec_dict: dict) -> list[str]:
    """trials.csv's parameter columns for this spec: every parameter its space may sample."""
    from kdtune.space import parse_space
    from kdtune.spec import Spec

    return parse_space(Spec.model_validate(spec_dict)).columns + ["seed", "source_trial"]


def load(uri: str, experiment: str, sweep: str | None = None):
    """(trials, sweeps): every child run of the experiment's sweeps (or of one parent run) as one
    row in the trials.csv layout plus `sweep` (the parent run id) and `sweep_name`; and one row per
    sweep (run id, name, status, start time, spec, Optuna storage and study, teacher accuracy)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no MLflow experiment {experiment!r} at {uri}")
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], max_results=50000, output_format="pandas")
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} has no runs")
    for column in ("tags.mlflow.parentRunId", "tags.kdtune.kind", "tags.mlflow.runName"):
        if column not in runs:
            runs[column] = None
    parents = runs[runs["tags.kdtune.kind"] == "sweep"]
    if sweep:
        parents = parents[parents["run_id"] == sweep]
        if parents.empty:
            raise ReportError(f"no sweep (parent run) {sweep} in experiment {experiment!r}")
    parents = parents.sort_values("start_time")
    sweeps = []
    frames = []
    for _, parent in parents.iterrows():
        spec_dict = spec_of(client, parent["run_id"])
        sweeps.append({"run_id": parent["run_id"], "name": parent["tags.mlflow.runName"],
                       "status": parent["status"], "start_time": parent["start_time"], "spec": spec_dict,
                       "optuna_storage": parent.get("tags.kdtune.optuna_storage"),
                       "optuna_study": parent.get("tags.kdtune.optuna_study"),
                       "teacher_test_acc": parent.get("metrics.teacher_test_acc")})
        children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
        frames.append(_trials(children, columns_of(spec_dict)).assign(sweep=parent["run_id"],
                                                                     sweep_name=parent["tags.mlflow.runName"]))
    if not sweeps:
        raise ReportError(f"experiment {experiment!r} has no kdtune sweep")
    trials = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return trials, sweeps


def _trials(children: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    rows = []
    evaluated = results.evaluation_columns(c.removeprefix("metrics.") for c in children.columns if c.startswith("metrics."))
    children = children.assign(_phase=children.get("tags.kdtune.phase", pd.Series(dtype=object)).map(PHASES))
    for _, run in children.sort_values(["_phase", "start_time"]).iterrows():
        def get(key, default=None):
            value = run.get(key, default)
            return default if value is None or (isinstance(value, float) and np.isnan(value)) else value
        phase = get("tags.kdtune.phase", "search")
        row = {c: get(f"params.{c}") for c in columns}
        if phase == "search":
            row["seed"] = None  # trials.csv: a search trial's seed is the spec's, left blank
        row.update({"trial_id": get("tags.kdtune.trial_id"), "phase": phase, "loss": get("params.loss"),
                    "student.arch": get("params.student.arch"), "width": get("params.width"),
                    "student": get("tags.kdtune.student"),
                    "params": get("metrics.params"), "extra_params": get("metrics.extra_params"),
                    **{name: get(f"metrics.{name}") for name in MEASURED},
                    "val_acc": get("metrics.val_acc"), "test_acc": get("metrics.test_acc"),
                    "epochs": get("metrics.epoch"), "teacher_passes": get("metrics.teacher_passes"),
                    "status": get("tags.kdtune.status", run["status"]),
                    "reason": get("tags.kdtune.reason", ""), "mlflow_run_id": run["run_id"], "node_id": None,
                    "model_uri": get("tags.kdtune.model_uri"),
                    **{name: get(f"metrics.{name}") for name in evaluated}})
        rows.append(row)
    frame = results.trials_frame(rows, columns)
    frame["model_uri"] = [r["model_uri"] for r in rows]
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]) and column not in (
                "trial_id", "student", "mlflow_run_id", "source_trial", "reason", "model_uri", "sweep", "sweep_name"):
            frame[column] = _numeric(frame[column])
    for column in ["params", "extra_params", *MEASURED, "val_acc", "test_acc", "epochs", "teacher_passes"] + evaluated:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["width"] = pd.to_numeric(frame["width"], errors="coerce").astype("Int64")
    return frame
