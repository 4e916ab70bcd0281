"""What the sweep does at its end (and `--sync` later): reconcile the parent's child runs with
Tune's results, log the deployable students, write and log the report.

Reconciliation makes MLflow agree with trials.csv whatever the tracking server did during the
sweep: each trial has exactly one run (a duplicate created by a retried request is deleted; a
run that could not be created is created now), with its final metrics and its end status; a run
of a trial Tune never recorded (started just before a driver kill, after Tune's last snapshot of
the experiment, so sampled anew on resume) is ended KILLED and deleted. A
trial whose run or model cannot be fixed is named as missing; `python -m kdtune.report --sync`
retries from results/ alone.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Metric

from kdtune import deploy, results, tracking
from kdtune.log import log
from kdtune.report.build import write_report

OPTUNA_DB = "optuna.db"
MISSING = "mlflow_missing.json"
UNSENT = "models"  # results/<name>/models/: deployable students MLflow could not take yet, for --sync
EXAMPLE = "example.npy"
RESULT_FILES = ("trials.csv", "pareto.csv", "pareto.png", "summary.json")
FINAL_METRICS = {"val_acc": "val_acc", "test_acc": "test_acc", "params": "params", "extra_params": "extra_params",
                 "epochs": "epoch"}
NOT_PARAMS = set(results.METRIC_COLUMNS) | {"trial_id", "phase", "student", "search_front", "model_uri", "sweep",
                                            "sweep_name"}


def _present(value) -> bool:
    return value is not None and value is not pd.NA and not (isinstance(value, float) and math.isnan(value))


def optuna_study(spec, out_dir: Path, parent_id: str) -> tuple[str, str]:
    """(absolute storage URL, study name) of the sweep's Optuna study: `search.optuna_storage`, else
    sqlite next to the results. The name holds the parent run id, so --resume finds the same study."""
    url = spec.search.optuna_storage or f"sqlite:///{(Path(out_dir) / OPTUNA_DB).resolve()}"
    url = tracking.absolute_uri(url) if url.startswith("sqlite:") else url
    if url.startswith("sqlite:////"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return url, f"{spec.name}-{parent_id}"


def tag_parent(client, parent_id: str, url: str, study: str) -> None:
    tracking.guarded("tag parent", client.set_tag, parent_id, "kdtune.optuna_storage", url)
    tracking.guarded("tag parent", client.set_tag, parent_id, "kdtune.optuna_study", study)


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
    reported = row.get("mlflow_run_id") if _present(row.get("mlflow_run_id")) else None
    found = sorted(found, key=lambda r: r.info.start_time or 0)
    keep = next((r for r in found if r.info.run_id == reported), found[0] if found else None)
    if keep is None:  # the trial could not create its run: create it now, with what trials.csv knows
        tags = {"kdtune.phase": row["phase"], "kdtune.loss": row["loss"], "kdtune.student": row["student"],
                "kdtune.sweep": parent_id, "kdtune.reconciled": "created"}
        if _present(row.get("params")):
            tags["kdtune.params"] = str(int(row["params"]))
        evaluated = set(results.evaluation_columns(row.index))
        params = {k: v for k, v in row.items() if k not in NOT_PARAMS | evaluated and _present(v)}
        run_id = tracking.child_run(client, exp_id, parent_id, row["trial_id"],
                                    f"{row['trial_id']} {row['loss']} {row['student']}", params, tags)
        keep = client.get_run(run_id)
    run_id = keep.info.run_id
    for duplicate in found:
        if duplicate.info.run_id != run_id:
            client.delete_run(duplicate.info.run_id)
    epoch = int(row["epochs"]) if _present(row.get("epochs")) else 0
    now = int(time.time() * 1000)
    final = {**FINAL_METRICS, **{c: c for c in results.evaluation_columns(row.index)}}
    lacking = [Metric(metric, float(row[column]), now, epoch) for column, metric in final.items()
               if _present(row.get(column)) and not _same(keep.data.metrics.get(metric), float(row[column]))]
    if lacking:
        client.log_batch(run_id, metrics=lacking)
    status = row["status"]
    if keep.info.status == "RUNNING" or keep.data.tags.get("kdtune.status") != status:
        reason = row.get("reason")
        tracking.end_run(client, run_id, status, reason if _present(reason) and reason else None)
    return run_id


def _same(logged, value: float) -> bool:
    return logged is not None and (logged == value or (math.isnan(logged) and math.isnan(value)))


def model_targets(trials: pd.DataFrame, front: pd.DataFrame) -> pd.DataFrame:
    """The students to log as models: the search front, the final front's source trials, and every
    finished confirmation run."""
    search = trials["phase"] == "search"
    sources = set(front["source_trial"]) if "source_trial" in front.columns else set(front.get("trial_id", []))
    on_front = search & (trials["search_front"] | trials["trial_id"].isin(sources))
    confirmed = trials["phase"] == "confirm"
    return trials[(on_front | confirmed) & (trials["status"] == "FINISHED")]


def _unsent_path(out_dir: Path, phase: str, trial_id: str) -> Path:
    return Path(out_dir) / UNSENT / f"{phase}-{trial_id}.pt"


def _send(client, uri: str, run_id, model, example: np.ndarray) -> bool:
    """Log the model to its run (unless the run has one already); False when MLflow cannot take it."""
    if not _present(run_id) or tracking.is_down():
        return False
    try:
        if not client.get_run(run_id).data.tags.get(deploy.MODEL_URI_TAG):
            deploy.log_student(uri, run_id, model, example)
        return True
    except Exception as exc:  # noqa: BLE001
        tracking.mark_down()
        log(f"MLflow: model of run {run_id} not logged: {tracking.first_line(exc)}")
        return False


def log_models(client, uri: str, spec, trials: pd.DataFrame, front: pd.DataFrame, data, students: dict,
               out_dir: Path) -> list[str]:
    """Log each target student as the deployable model, rebuilt from its trial's last checkpoint
    as the trial built it. One MLflow cannot take now is saved in results/<name>/models/ for
    --sync. `students` maps (phase, trial id) to (config, checkpoint). Returns the trial ids whose
    model is not in MLflow."""
    import torch

    from kdtune.tuning import load_state

    example = deploy.example(data.splits)
    missing = []
    for _, row in model_targets(trials, front).iterrows():
        config, checkpoint = students.get((row["phase"], row["trial_id"]), (None, None))
        try:
            if checkpoint is None:
                raise ValueError("no checkpoint")
            student = deploy.trained_student(spec, config, data, load_state(checkpoint)["student"])
            model = deploy.deployable(student, data.splits)
        except Exception as exc:  # noqa: BLE001 - one student that cannot be rebuilt costs its model only
            log(f"model of trial {row['trial_id']} not built: {tracking.first_line(exc)}")
            missing.append(row["trial_id"])
            continue
        if not _send(client, uri, row["mlflow_run_id"], model, example):
            path = _unsent_path(out_dir, row["phase"], row["trial_id"])
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path.parent / EXAMPLE, example)
            results.write_atomic(path, lambda tmp: torch.jit.save(model, tmp))
            missing.append(row["trial_id"])
    return missing


def send_saved_models(client, uri: str, trials: pd.DataFrame, out_dir: Path) -> list[str]:
    """--sync: log the students saved in results/<name>/models/ to their (reconciled) runs and
    remove each one sent. Returns the trial ids still without a model."""
    import torch

    folder = Path(out_dir) / UNSENT
    if not folder.is_dir():
        return []
    example = np.load(folder / EXAMPLE)
    missing = []
    for _, row in trials.iterrows():
        path = _unsent_path(out_dir, row["phase"], row["trial_id"])
        if not path.is_file():
            continue
        if _send(client, uri, row["mlflow_run_id"], torch.jit.load(str(path)), example):
            path.unlink()
        else:
            missing.append(row["trial_id"])
    if not any(folder.glob("*.pt")):
        (folder / EXAMPLE).unlink(missing_ok=True)
        folder.rmdir()
    return missing


def log_parent(client, parent_id: str, out_dir: Path, trials: pd.DataFrame) -> bool:
    """The sweep's result files, its report folder and its headline metrics (best_val_acc,
    trials_finished, teacher_test_acc) on the parent run; False when MLflow could not take them."""
    out_dir = Path(out_dir)
    done = results.finished(trials[trials["phase"] == "search"])
    values = {"trials_finished": len(done),
              "teacher_test_acc": json.loads((out_dir / "summary.json").read_text())["teacher"]["test_acc"]}
    if not done.empty:
        values["best_val_acc"] = float(done["val_acc"].max())
    now = int(time.time() * 1000)

    def send():
        for name in RESULT_FILES:
            client.log_artifact(parent_id, str(out_dir / name))
        client.log_artifacts(parent_id, str(out_dir / "report"), "report")
        client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    return tracking.guarded("log results", send, default=False) is not False


def record_missing(out_dir: Path, parent_id: str, missing: list[str]) -> None:
    """mlflow_missing.json names what MLflow lacks (removed once nothing is); the message says how to upload it."""
    path = Path(out_dir) / MISSING
    if missing:
        names = sorted(set(missing))
        results.write_json({"parent_run_id": parent_id, "missing": names}, path)
        log(f"MLflow is missing or incomplete for {len(names)} run(s): {', '.join(names)}. results/ is complete; "
            f"upload later with: python -m kdtune.report --sync {Path(out_dir).parent}")
    elif path.exists():
        path.unlink()


def at_sweep_end(spec, spec_dict: dict, trials: pd.DataFrame, front: pd.DataFrame, data, students: dict,
                 teacher_acc: float, out_dir: Path, client, uri: str, parent_id: str, interrupted: bool) -> list[str]:
    """After the sweep's own files: the models (not for an interrupted sweep: its --resume logs
    them), then the report, written to results/<name>/report/, and all of it logged to the parent
    run. Returns what MLflow is missing."""
    missing = [] if interrupted else log_models(client, uri, spec, trials, front, data, students, out_dir)
    write_report(trials, spec_dict, Path(out_dir) / "report", f"kdtune report: {spec.name}",
                 f"kdtune sweep {spec.name}, written by the sweep at its end", teacher_acc=teacher_acc)
    if not log_parent(client, parent_id, out_dir, trials):
        missing.append("parent run files")
    return missing
