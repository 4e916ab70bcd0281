"""The report rebuilt from stored runs: a sweep's runs written to a real MLflow store in kdtune's layout
(a parent run with spec.json, one child run per trial), read back by `python -m kdtune.report` alone."""
import json

import mlflow
import pandas as pd
import pytest

from kdtune.report.__main__ import main as report_main
from kdtune.spec import Spec, spec_to_dict

# (trial id, method, width, params, val_acc, test_acc); the front on (val_acc max, params min) by hand: a, c, e
TRIALS = [("a", "none", 4, 1000, 0.90, 0.89), ("b", "kd", 4, 1000, 0.88, 0.90), ("c", "kd", 8, 3000, 0.95, 0.94),
          ("d", "none", 8, 3000, 0.93, 0.92), ("e", "kd", 16, 9000, 0.97, 0.96), ("f", "none", 16, 9000, 0.94, 0.95)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    spec = Spec.model_validate({"name": "rebuilt", "student": {"arch": "mlp"}, "search": {
        "confirm_seeds": 0, "space": {"loss": {"none": {}, "kd": {}}, "width": {"choice": [4, 8, 16]}}}})
    experiment = client.create_experiment("rebuilt")
    parent = client.create_run(experiment, run_name="sweep 1", tags={"kdtune.kind": "sweep"})
    (tmp_path / "spec.json").write_text(json.dumps(spec_to_dict(spec)))
    client.log_artifact(parent.info.run_id, str(tmp_path / "spec.json"))
    for tid, loss, width, params, val_acc, test_acc in TRIALS:
        run = client.create_run(experiment, run_name=f"{tid} {loss} mlp {width}", tags={
            "mlflow.parentRunId": parent.info.run_id, "kdtune.phase": "search", "kdtune.trial_id": tid,
            "kdtune.student": f"mlp {width}", "kdtune.status": "FINISHED"})
        for key, value in {"loss": loss, "student.arch": "mlp", "width": width}.items():
            client.log_param(run.info.run_id, key, value)
        for key, value in {"params": params, "extra_params": 0, "val_acc": val_acc, "test_acc": test_acc,
                           "epoch": 5}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)
    return uri


def test_the_report_rebuilt_from_mlflow_has_the_front_computed_by_hand(store, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_main(["rebuilt", "--tracking-uri", store, "--out", str(out)]) == 0
    front = pd.read_csv(out / "pareto.csv")
    assert list(front["trial_id"]) == ["a", "c", "e"] and list(front["params"]) == [1000, 3000, 9000]
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(trials["trial_id"]) == list("abcdef") and set(trials["status"]) == {"FINISHED"}
    methods = pd.read_csv(out / "methods.csv").set_index("method")
    assert methods.loc["kd", "best_val_acc"] == 0.97 and methods.loc["none", "trials"] == 3
    assert json.loads((out / "hypervolume.json").read_text())["front_size"] == 3
    assert "plotly" in (out / "report.html").read_text()
    assert "Pareto-optimal students" in capsys.readouterr().out


def test_an_unknown_experiment_exits_2_naming_it(store, capsys):
    assert report_main(["nothing-here", "--tracking-uri", store]) == 2
    assert "no MLflow experiment 'nothing-here'" in capsys.readouterr().err
