"""search.constraints on measured figures: an architecture that breaks one is recorded as infeasible
without training, the sampler learns it through Optuna's constraints_func, and no front row breaks one."""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import kdtune

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "search_spaces" / "mnist-mlp.yaml"
SMALL = {"deploy.timing_seconds": 0.3, "data.train_limit": 1200, "data.val_size": 200, "data.test_limit": 300, "teacher.epochs": 1,
         "train.epochs": 1}
MAX_PARAMS = 50_000  # mlp width 16: 12,730 parameters; width 256: 203,530


@pytest.mark.slow
def test_a_constrained_three_objective_sweep(tmp_path, mnist_root, teacher_cache, capfd):
    spec = kdtune.load_spec(SPEC, {
        "data.root": str(mnist_root), "teacher.cache_dir": str(teacher_cache), **SMALL,
        "search.space": {"width": {"choice": [16, 256]}, "loss": {"none": {}, "kd": {}}}, "search.sampler": "tpe",
        "search.num_samples": 6, "search.confirm_seeds": 0,
        "search.objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"},
                              {"metric": "latency_ms", "mode": "min"}],
        "search.constraints": [{"metric": "params", "max": MAX_PARAMS}]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = kdtune.run(spec, results_dir=tmp_path / "results", tracking_uri=uri)
    assert result.status == "FINISHED" and result.mlflow_missing == []
    trials = pd.read_csv(result.results_dir / "trials.csv")
    assert len(trials) == 8  # 6 sampled and 2 baselines (none at each width)
    # both widths measured in the driver before the search started, and the time it took kept
    assert "measured 2 student architecture(s) in" in capfd.readouterr().out
    assert result.summary["wall_seconds"]["measuring"] > 0

    # the `feasible` column, computed here from the width's own parameter count
    assert (trials["feasible"] == (trials["params"] <= MAX_PARAMS)).all()
    wide, narrow = trials[trials["width"] == 256], trials[trials["width"] == 16]
    assert not wide.empty and not narrow.empty
    # an infeasible architecture is recorded at once and never trained: no epoch, no accuracy
    assert (wide["status"] == "INFEASIBLE").all() and (wide["epochs"] == 0).all() and wide["val_acc"].isna().all()
    client = MlflowClient(uri)
    for run_id in wide["mlflow_run_id"]:
        run = client.get_run(run_id)
        assert "val_acc" not in run.data.metrics and run.data.metrics["params"] > MAX_PARAMS
        assert run.data.tags["kdtune.status"] == "INFEASIBLE"
    assert (narrow["status"] == "FINISHED").all() and (narrow["epochs"] == 1).all()
    # measured once per architecture: every trial of one width carries the same figures
    for _, same in trials.groupby("width"):
        assert same[["flops", "latency_ms", "model_mb"]].nunique().eq(1).all()
    assert (trials["latency_ms"] > 0).all()

    # the sampler's study learnt the infeasible trials as such (Optuna's constraints), and so does the record
    summary = result.summary["optuna"]
    recorded = optuna.load_study(study_name=summary["study_name"], storage=summary["storage"])
    best = {t.user_attrs["kdtune.trial_id"] for t in recorded.best_trials}
    assert best and best <= set(narrow["trial_id"])

    # the front: three objectives, feasible rows only, with its plots and hypervolume
    front = pd.read_csv(result.results_dir / "pareto.csv")
    assert not front.empty and (front["params"] <= MAX_PARAMS).all() and front["feasible"].all()
    assert {"flops", "latency_ms", "model_mb", "trials"} <= set(front.columns)
    assert (result.results_dir / "pareto.png").is_file()
    report = result.report_dir
    assert (report / "pareto-3d.html").is_file()
    hv = pd.read_json(report / "hypervolume.json", typ="series")
    assert len(hv["objectives"]) == 3 and hv["hypervolume"] > 0

    # models for the front's representatives only; each front student also as float and int8 ONNX
    trials = pd.read_csv(result.results_dir / "trials.csv")
    for _, row in trials.iterrows():
        run = client.get_run(row["mlflow_run_id"])
        assert ("kdtune.model_uri" in run.data.tags) == bool(row["search_front"]), row["trial_id"]
        if row["search_front"]:
            assert 0 <= run.data.metrics["int8_test_acc"] <= 1 and run.data.metrics["onnx_max_abs_diff"] <= 1e-4
    assert front["quantized"].str.startswith("int8 test_acc").all()
