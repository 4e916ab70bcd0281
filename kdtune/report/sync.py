"""`python -m kdtune.report --sync RESULTS_DIR`: upload to MLflow what a sweep could not log (the
tracking server was down), from results/ alone: trials.csv, summary.json, the report and the
deployable students the sweep saved in results/<name>/models/. No data, model code or Ray needed."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kdtune import results, tracking
from kdtune.report import finish
from kdtune.report.runs import ReportError


def sweep_dirs(root: Path) -> list[Path]:
    root = Path(root)
    if (root / "sweep.json").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("*/sweep.json"))
    if not found:
        raise ReportError(f"{root}: no sweep results (no sweep.json here or in a subfolder)")
    return found


def sync(root: Path, tracking_uri: str | None = None) -> list[str]:
    """Reconcile every sweep under `root` with its MLflow parent run; returns what is still missing."""
    left = []
    for folder in sweep_dirs(root):
        state = json.loads((folder / "sweep.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        uri = tracking.absolute_uri(tracking_uri or state["tracking_uri"])
        tracking.check_reachable(uri)
        client = tracking.client(uri)
        parent_id = state["parent_run_id"]
        trials, missing = finish.reconcile(client, state["experiment_id"], parent_id, pd.read_csv(folder / "trials.csv"))
        results.write_csv(trials, folder / "trials.csv")  # the run ids MLflow holds now
        missing += finish.send_saved_models(client, uri, trials, folder)
        optuna = summary.get("optuna") or {}
        if optuna:
            finish.tag_parent(client, parent_id, optuna["storage"], optuna["study_name"])
        if not finish.log_parent(client, parent_id, folder, trials):
            missing.append("parent run files")
        tracking.end_run(client, parent_id, "KILLED" if summary.get("interrupted") else "FINISHED")
        finish.record_missing(folder, parent_id, missing)
        print(f"kdtune: synced {folder} to {uri}: {len(trials) - len(set(missing) & set(trials['trial_id']))} "
              f"of {len(trials)} trial runs complete")
        left += [f"{folder.name}/{m}" for m in sorted(set(missing))]
    return left
