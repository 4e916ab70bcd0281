"""`--register NAME --max-params N`: the most accurate front student with at most N parameters
into the MLflow model registry, its KD recipe in the version's description and tags."""
from __future__ import annotations

import pandas as pd

from kdtune import results
from kdtune.report.runs import ReportError
from kdtune.report.tables import recipe


def pick(front: pd.DataFrame, metric: str, mode: str, max_params: int) -> pd.Series:
    fits = front[front["params"] <= max_params]
    if fits.empty:
        smallest = int(front["params"].min()) if not front.empty else None
        raise ReportError(f"no front student has at most {max_params:,} parameters (smallest: {smallest:,})"
                          if smallest else "the front is empty: nothing to register")
    return fits.sort_values([metric, "params"], ascending=[mode == "min", True]).iloc[0]


def register(uri: str, report: dict, name: str, max_params: int, mode: str, dataset: str):
    """Register the chosen student's logged model; returns (ModelVersion, description)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from kdtune.deploy import input_description

    metric, trials = report["metric"], report["trials"]
    best = pick(report["front"], metric, mode, max_params)
    source = best["source_trial"] if "source_trial" in best.index and pd.notna(best.get("source_trial")) else best["trial_id"]
    runs = trials[(trials["trial_id"] == source) & (trials["phase"] == "search")]
    if "sweep" in best.index and pd.notna(best.get("sweep")):
        runs = runs[runs["sweep"] == best["sweep"]]
    if runs.empty or not isinstance(runs.iloc[0].get("model_uri"), str):
        raise ReportError(f"front student {source} has no logged model (tag kdtune.model_uri on its run)")
    run = runs.iloc[0]
    columns = [c for c in results.method_columns(trials) if c.startswith(f"{best['loss']}.") or c.startswith("train.")]
    text = recipe(run, columns)
    confirmed = "seeds" in best.index and pd.notna(best.get("seeds"))
    accuracy = (f"{metric} {best[metric]:.4f}, test_acc {best['test_acc']:.4f}"
                + (f" ± {best['test_acc_std']:.4f} (mean over {int(best['seeds'])} fresh seeds)" if confirmed else ""))
    description = (f"kdtune student: {text}. {int(best['params']):,} parameters. {accuracy}. "
                   f"This model's own run {run['mlflow_run_id']}: test_acc {run['test_acc']:.4f}. "
                   + input_description(dataset))
    tags = {"kdtune.loss": best["loss"], "kdtune.student": str(best["student"]),
            "kdtune.params": str(int(best["params"])), "kdtune.recipe": text, "kdtune.run_id": run["mlflow_run_id"],
            "kdtune.trial_id": source, f"kdtune.{metric}": f"{best[metric]:.6f}", "kdtune.test_acc": f"{run['test_acc']:.6f}"}
    for column in columns:
        if pd.notna(run.get(column)):
            tags[f"kdtune.{column}"] = str(run[column])
    if "sweep" in run.index and pd.notna(run.get("sweep")):
        tags["kdtune.sweep"] = run["sweep"]
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(run["model_uri"], name, tags=tags)
    MlflowClient(uri).update_model_version(name, version.version, description=description)
    return version, description
