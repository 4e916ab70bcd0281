"""The sweep's epilogue, after its result files: log the deployable students, write the report,
log both to the parent run, and record what MLflow is missing. `python -m kdtune.report --sync`
runs the MLflow half again from results/ alone (kdtune.reconcile first makes the runs right).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Metric

from kdtune import deploy, reconcile, results, tracking
from kdtune.log import log
from kdtune.report.build import write_report
from kdtune.report.runs import ReportError
from kdtune.spec import Spec, spec_to_dict
from kdtune.trial import SweepData

MISSING = "mlflow_missing.json"
UNSENT = "models"  # results/<name>/models/: deployable students MLflow could not take yet, for --sync
EXAMPLE = "example.npy"
RESULT_FILES = ("trials.csv", "pareto.csv", "pareto.png", "summary.json")


def model_targets(trials: pd.DataFrame, front: pd.DataFrame) -> pd.DataFrame:
    """The students to log as models: the search front, the final front's source trials, and every
    finished confirmation run."""
    search = trials["phase"] == "search"
    on_front = search & (trials["search_front"] | trials["trial_id"].isin(front_trials(front)))
    confirmed = trials["phase"] == "confirm"
    return trials[(on_front | confirmed) & (trials["status"] == "FINISHED")]


def _unsent_path(out_dir: Path, phase: str, trial_id: str) -> Path:
    return Path(out_dir) / UNSENT / f"{phase}-{trial_id}.pt"


def _send(client, uri: str, run_id, model, example: np.ndarray) -> bool:
    """Log the model to its run (unless the run has one already); False when MLflow cannot take it."""
    if not reconcile.present(run_id) or tracking.is_down():
        return False
    try:
        if not client.get_run(run_id).data.tags.get(deploy.MODEL_URI_TAG):
            deploy.log_student(uri, run_id, model, example)
        return True
    except Exception as exc:  # noqa: BLE001
        tracking.mark_down()
        log(f"MLflow: model of run {run_id} not logged: {tracking.first_line(exc)}")
        return False


def front_key(front: pd.DataFrame) -> str:
    """The column naming the search trial of each front row: source_trial for confirmed means."""
    return "source_trial" if "source_trial" in front.columns and front["source_trial"].notna().any() else "trial_id"


def front_trials(front: pd.DataFrame) -> set[str]:
    """The search trials the front's rows are."""
    return set(front.get(front_key(front), []))


def with_onnx(sweep: Sweep, run_id: str, model, example: np.ndarray) -> str:
    """A front student's float and int8 ONNX models beside its PyTorch one; returns the front table's
    `quantized` entry (empty when ONNX Runtime disagrees with PyTorch: warned, no ONNX kept)."""
    from kdtune.onnx_student import onnx_student

    splits, deploy_spec = sweep.data.splits, sweep.spec.deploy
    try:
        student, why = onnx_student(model, deploy.raw_images(splits, None), splits.test_y,
                                    deploy.raw_images(splits, None, "train"), deploy_spec.batch_size, deploy_spec.threads,
                                    deploy_spec.timing_seconds)
    except Exception as exc:  # noqa: BLE001 - an operator ONNX lacks costs the ONNX copy only
        student, why = None, f"export failed: {tracking.first_line(exc)}"
    if student is None:
        log(f"WARNING: no ONNX model for run {run_id}: {why}")
        return ""
    tracking.guarded("log ONNX models", deploy.log_onnx, sweep.uri, run_id, student, example)
    return student.quantized()


def log_models(sweep: Sweep, trials: pd.DataFrame, front: pd.DataFrame, students: dict) -> tuple[list[str], dict]:
    """Log each target student as the deployable model, rebuilt from its trial's last checkpoint
    as the trial built it; a front student also as float and int8 ONNX models (kdtune.onnx_student).
    One MLflow cannot take now is saved in results/<name>/models/ for --sync. `students` maps
    (phase, trial id) to (config, checkpoint). Returns the trial ids whose model is not in MLflow,
    and each ONNX-exported front trial's `quantized` entry."""
    import torch

    from kdtune.tuning import load_state

    spec, data, out_dir = sweep.spec, sweep.data, sweep.out_dir
    example = deploy.example(data.splits)
    on_front, quantized = front_trials(front), {}
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
        sent = _send(sweep.client, sweep.uri, row["mlflow_run_id"], model, example)
        if sent and row["phase"] == "search" and row["trial_id"] in on_front:
            quantized[row["trial_id"]] = with_onnx(sweep, row["mlflow_run_id"], model, example)
        if not sent:
            path = _unsent_path(out_dir, row["phase"], row["trial_id"])
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path.parent / EXAMPLE, example)
            results.write_atomic(path, lambda tmp: torch.jit.save(model, tmp))
            missing.append(row["trial_id"])
    return missing, quantized


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


@dataclass(frozen=True)
class Sweep:
    """What the epilogue needs of a sweep besides its results: the spec, the data its students were
    trained on, its results folder and its MLflow parent run."""

    spec: Spec
    data: SweepData
    out_dir: Path
    client: object  # mlflow.MlflowClient
    uri: str
    parent_id: str


def at_sweep_end(sweep: Sweep, trials: pd.DataFrame, front: pd.DataFrame, students: dict,
                 interrupted: bool) -> list[str]:
    """After the sweep's own files: the models (not for an interrupted sweep: its --resume logs
    them), then the report, written to results/<name>/report/, and all of it logged to the parent
    run. Returns what MLflow is missing."""
    spec, out_dir = sweep.spec, Path(sweep.out_dir)
    missing, quantized = ([], {}) if interrupted else log_models(sweep, trials, front, students)
    if quantized:
        key = front_key(front)
        front = front.assign(quantized=front[key].map(quantized))
        results.write_csv(front, out_dir / "pareto.csv")
        print("\nint8 (ONNX Runtime static quantization) against the float ONNX student:\n"
              + results.show(front, [key, "student", "test_acc", "latency_ms", "quantized"]))
    teacher_acc = json.loads((out_dir / "summary.json").read_text())["teacher"]["test_acc"]
    write_report(trials, spec_to_dict(spec), out_dir / "report", f"kdtune report: {spec.name}",
                 f"kdtune sweep {spec.name}, written by the sweep at its end", teacher_acc=teacher_acc)
    if not log_parent(sweep.client, sweep.parent_id, out_dir, trials):
        missing.append("parent run files")
    return missing


def sweep_dirs(root: Path) -> list[Path]:
    root = Path(root)
    if (root / "sweep.json").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("*/sweep.json"))
    if not found:
        raise ReportError(f"{root}: no sweep results (no sweep.json here or in a subfolder)")
    return found


def sync(root: Path, tracking_uri: str | None = None) -> list[str]:
    """`--sync`: reconcile every sweep under `root` with its MLflow parent run and send what MLflow
    lacks; returns what is still missing."""
    left = []
    for folder in sweep_dirs(root):
        state = json.loads((folder / "sweep.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        uri = tracking.absolute_uri(tracking_uri or state["tracking_uri"])
        tracking.check_reachable(uri)
        client = tracking.client(uri)
        parent_id = state["parent_run_id"]
        trials, missing = reconcile.reconcile(client, state["experiment_id"], parent_id,
                                              pd.read_csv(folder / "trials.csv"))
        results.write_csv(trials, folder / "trials.csv")  # the run ids MLflow holds now
        missing += send_saved_models(client, uri, trials, folder)
        optuna = summary.get("optuna") or {}
        if optuna:
            tracking.tag_study(client, parent_id, optuna["storage"], optuna["study_name"])
        if not log_parent(client, parent_id, folder, trials):
            missing.append("parent run files")
        tracking.end_run(client, parent_id, "KILLED" if summary.get("interrupted") else "FINISHED")
        record_missing(folder, parent_id, missing)
        print(f"kdtune: synced {folder} to {uri}: {len(trials) - len(set(missing) & set(trials['trial_id']))} "
              f"of {len(trials)} trial runs complete")
        left += [f"{folder.name}/{m}" for m in sorted(set(missing))]
    return left
