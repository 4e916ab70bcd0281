"""The user's evaluation, `function(model, data_loader) -> {name: number}`: a macro-F1 written here
as the first objective of a real MNIST sweep (front, KD gain, MLflow history, trials.csv,
pareto.csv, the report rebuilt from MLflow), the built-in top1_top5, and every bad evaluation
stopping with exit 2 at its key before Ray starts."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_exit_2_naming
from mlflow.tracking import MlflowClient

import kdtune
from kdtune.data.resolve import load_splits
from kdtune.deploy import raw_images
from kdtune import evaluation
from kdtune.evaluation import loader, score, top1_top5
from kdtune.models import create_model
from kdtune.report.runs import load
from kdtune.report.tables import objectives, tables
from kdtune.sweep import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "search_spaces" / "mnist-mlp.yaml"
SMALL = {"deploy.timing_seconds": 0.3, "data.train_limit": 1200, "data.val_size": 200, "data.test_limit": 300, "teacher.epochs": 1}


def f1_macro(model, data_loader):
    """A user's inference pipeline: macro-F1 over the classes seen, 2TP / (predicted + actual) per
    class, returned as a one-element tensor."""
    predicted, actual = [], []
    for x, y in data_loader:
        predicted.append(model(x).argmax(1))
        actual.append(y)
    p, y = torch.cat(predicted), torch.cat(actual)
    per_class = [2 * ((p == c) & (y == c)).sum() / ((p == c).sum() + (y == c).sum()) for c in torch.unique(torch.cat([p, y]))]
    return {"f1_macro": torch.stack(per_class).float().mean()}


def numpy_f1_macro(predicted: np.ndarray, actual: np.ndarray, classes: int = 10) -> float:
    """Macro-F1 from a confusion matrix: the harmonic mean of precision and recall per class seen."""
    confusion = np.bincount(actual * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    tp, predicted_n, actual_n = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    seen = (predicted_n + actual_n) > 0
    precision = np.divide(tp, predicted_n, out=np.zeros(classes), where=predicted_n > 0)
    recall = np.divide(tp, actual_n, out=np.zeros(classes), where=actual_n > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(classes), where=precision + recall > 0)
    return float(f1[seen].mean())


@pytest.fixture(scope="module")
def splits(mnist_root):
    return load_splits(kdtune.load_spec(SPEC, {"data.root": str(mnist_root), **SMALL}).data, 0)


def test_top1_top5_counts_as_an_independent_ranking_does(splits):
    torch.manual_seed(0)
    model = create_model("mlp", splits.in_shape, 10, width=16)  # untrained: its ranks are spread out
    x, y = splits.train_x[:2500], splits.train_y[:2500]
    found = score(model, loader(x, y), top1_top5)  # three batches of 1000, 1000 and 500
    with torch.no_grad():
        logits = model(x).logits.numpy()
    ranks = np.argsort(-logits, axis=1)
    labels = y.numpy()
    assert found["acc"] == pytest.approx(float((ranks[:, 0] == labels).mean()), abs=1e-12)
    assert found["top5"] == pytest.approx(float((ranks[:, :5] == labels[:, None]).any(1).mean()), abs=1e-12)
    assert 0 < found["acc"] < found["top5"] < 1
    three = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))  # three classes: top-5 is every class
    labels = torch.arange(10) % 3
    assert top1_top5(lambda logits: logits, loader(three, labels)) == {
        "acc": pytest.approx(float((three.numpy().argmax(1) == labels.numpy()).mean())), "top5": 1.0}


@pytest.mark.slow
def test_f1_macro_is_the_first_objective_of_a_real_sweep(tmp_path, mnist_root, teacher_cache, splits):
    spec = kdtune.load_spec(SPEC, {
        "data.root": str(mnist_root), "teacher.cache_dir": str(teacher_cache), **SMALL, "train.epochs": 2,
        "search.space": {"width": 16, "loss": {"none": {}, "kd": {}, "dkd": {}}}, "search.sampler": "random",
        "search.num_samples": 2, "search.confirm_seeds": 0,
        "search.objectives": [{"metric": "val_f1_macro", "mode": "max"}, {"metric": "params", "mode": "min"}]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = kdtune.run(spec, evaluate=f1_macro, results_dir=tmp_path / "results", tracking_uri=uri)
    assert result.status == "FINISHED" and result.mlflow_missing == []
    trials = pd.read_csv(result.results_dir / "trials.csv")
    assert len(trials) == 3 and (trials["status"] == "FINISHED").all()
    columns = list(trials.columns)
    assert columns.index("test_acc") + 1 == columns.index("val_f1_macro") == columns.index("test_f1_macro") - 1
    assert trials[["val_f1_macro", "test_f1_macro"]].notna().all().all()

    # MLflow: val_f1_macro every epoch, test_f1_macro at the end, as trials.csv has them
    client = MlflowClient(uri)
    for _, row in trials.iterrows():
        history = client.get_metric_history(row["mlflow_run_id"], "val_f1_macro")
        assert sorted(m.step for m in history) == [1, 2]
        assert max(history, key=lambda m: m.step).value == pytest.approx(row["val_f1_macro"])
        assert client.get_run(row["mlflow_run_id"]).data.metrics["test_f1_macro"] == pytest.approx(row["test_f1_macro"])

    # one student size: the front is its best trial on validation F1, and the KD gain compares the
    # best distilled with the baseline on test F1
    front = pd.read_csv(result.results_dir / "pareto.csv")
    assert {"val_f1_macro", "test_f1_macro"} <= set(front.columns)
    assert set(front["trial_id"]) == set(trials.loc[trials["val_f1_macro"] == trials["val_f1_macro"].max(), "trial_id"])
    base, kd = trials[trials["loss"] == "none"].iloc[0], trials[trials["loss"] != "none"]  # the seeded sampler drew kd
    kd = kd.loc[kd["val_f1_macro"].idxmax()]
    [gain] = result.kd_gain.to_dict("records")
    assert gain["baseline_val_f1_macro"] == pytest.approx(base["val_f1_macro"])
    assert gain["kd_val_f1_macro"] == pytest.approx(kd["val_f1_macro"])
    assert gain["test_gain"] == pytest.approx(kd["test_f1_macro"] - base["test_f1_macro"])

    # test_f1_macro is the function on the trained student: the logged model, scored with numpy
    source = trials[trials["trial_id"] == front["trial_id"].iloc[0]].iloc[0]
    model = mlflow.pytorch.load_model(client.get_run(source["mlflow_run_id"]).data.tags["kdtune.model_uri"])
    with torch.no_grad():
        predicted = model(raw_images(splits, len(splits.test_y))).argmax(1).numpy()
    assert source["test_f1_macro"] == pytest.approx(numpy_f1_macro(predicted, splits.test_y.numpy()), abs=1e-6)

    # the report's tables rebuilt from MLflow alone (as `python -m kdtune.report` reads them) agree
    rebuilt, sweeps = load(uri, spec.name)
    assert {"val_f1_macro", "test_f1_macro"} <= set(rebuilt.columns)
    rebuilt_front, rebuilt_gain = tables(rebuilt, objectives(sweeps[0]["spec"]))
    assert set(rebuilt_front["trial_id"]) == set(front["trial_id"])
    assert rebuilt_gain["test_gain"].tolist() == pytest.approx([gain["test_gain"]])
    assert "val_f1_macro" in pd.read_csv(result.report_dir / "pareto.csv").columns  # the report the sweep wrote


# --- bad evaluation: exit 2, the key named, no traceback, Ray never started ---------------------------

FUNCTIONS = '''
def raises(model, data_loader):
    raise ZeroDivisionError("no samples of class 7")

def a_list(model, data_loader):
    return [0.5]

def words(model, data_loader):
    return {"f1": "high"}

def one_argument(model):
    return {"f1": 1.0}

def f1(model, data_loader):
    return {"f1": 0.5}
'''

BAD = {  # id: (--set overrides, key, fragments of the message)
    "does_not_import": (["evaluate=kdtune_no_such_metrics:f1"], "evaluate",
                        ["cannot import module 'kdtune_no_such_metrics'", "ModuleNotFoundError"]),
    "not_an_import_path": (["evaluate=f1 score"], "evaluate",
                           ["'f1 score' is not an import path of the form package.module:function"]),
    "wrong_signature": (["evaluate=byo_metrics:one_argument"], "evaluate",
                        ["cannot be called as function(model, data_loader)"]),
    "raises": (["evaluate=byo_metrics:raises"], "evaluate",
               ["byo_metrics:raises(model, data_loader) raised ZeroDivisionError: no samples of class 7"]),
    "returns_no_dict": (["evaluate=byo_metrics:a_list"], "evaluate", ["returned a list; it must return a dict"]),
    "returns_no_number": (["evaluate=byo_metrics:words"], "evaluate", ["returned f1='high' (str)", "must be a number"]),
    "objective_not_returned": (["evaluate=kdtune.evaluation:top1_top5",
                                "search.objectives=[{metric: val_f1, mode: max}, {metric: params, mode: min}]"],
                               "search.objectives.0.metric",
                               ["'val_f1' is not measured", "returned no 'f1'", "val_acc, val_top5"]),
    "objective_without_evaluate": (["search.objectives=[{metric: params, mode: min}, {metric: val_f1, mode: max}]"],
                                   "search.objectives.1.metric", ["'val_f1' needs the top-level `evaluate` function"]),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the bad cases (none of them logs a run): its tables are made once."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_evaluation_exits_2_naming_the_key(case, tmp_path, monkeypatch, capsys, mnist_root, teacher_cache, store):
    import ray

    (tmp_path / "byo_metrics.py").write_text(textwrap.dedent(FUNCTIONS))
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides, key, fragments = BAD[case]
    sets = [f"data.root={mnist_root}", f"teacher.cache_dir={teacher_cache}", *(f"{k}={v}" for k, v in SMALL.items()),
            "search.space.loss={none: {}, kd: {}}", "search.space.width=4", *overrides]
    status = cli_main([str(SPEC), "--results-dir", str(tmp_path / "results"),
                       "--tracking-uri", store, *[a for s in sets for a in ("--set", s)]])
    assert_exit_2_naming(status, capsys.readouterr().err, key, fragments)
    assert not ray.is_initialized() and not (tmp_path / "results").exists() and not (tmp_path / "results").exists()


def test_run_raises_spec_error_for_a_function_given_that_returns_no_dict(tmp_path, mnist_root, teacher_cache, store):
    spec = kdtune.load_spec(SPEC, {"data.root": str(mnist_root), "teacher.cache_dir": str(teacher_cache), **SMALL,
                                   "search.space": {"width": 4, "loss": {"none": {}, "kd": {}}}})
    with pytest.raises(kdtune.SpecError) as info:
        kdtune.run(spec, evaluate=lambda model, data_loader: None, results_dir=tmp_path / "results", tracking_uri=store)
    assert info.value.path == "evaluate" and "returned a NoneType" in info.value.message


def test_an_evaluation_import_path_ships_to_ray_workers_as_models_do_but_kdtune_never(tmp_path, monkeypatch):
    from kdtune.cluster import user_modules

    (tmp_path / "byo_metrics.py").write_text(textwrap.dedent(FUNCTIONS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "byo_metrics", raising=False)  # a bad case before may have imported its own copy
    assert evaluation.resolve("byo_metrics:f1")(None, None) == {"f1": 0.5}  # imported, as the spec key does
    assert user_modules(["byo_metrics:f1"]) == [str(tmp_path / "byo_metrics.py")]
    assert user_modules(["kdtune.evaluation:top1_top5"]) == []  # every trial runs kdtune already
