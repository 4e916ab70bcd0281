"""Several teachers on a real MNIST slice: the bad `teachers:` inputs stop at load naming their
key; an ensemble's targets are its members' weighted mean probability at the method's
temperature; an assistant trains once from its named teacher and is reused from the cache; a
sweep over the teacher axis records the choice and each teacher's facts."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kdtune import SpecError, load_spec, run
from kdtune.data.resolve import load_splits
from kdtune.space import parse_space, resolve
from kdtune.runner import prepare_teachers
from kdtune.teachers import Teachers
from kdtune.trial import TeacherTargets, method_temperature

BAD = sorted((Path(__file__).resolve().parent / "bad_specs").glob("*.yaml"))
OURS = [p for p in BAD if p.name.startswith(("teachers_", "dml_", "byot_"))]


def teachers_spec(mnist_root, cache, **extra):
    mlp = {"arch": "mlp", "epochs": 1, "cache_dir": str(cache)}
    return load_spec({"name": "which", "deploy": {"timing_seconds": 0.3}, "data": {"root": str(mnist_root), "val_size": 500, "train_limit": 2000,
                                                "test_limit": 500},
                      "teachers": {"big": {**mlp, "kwargs": {"width": 128}},
                                   "small": {**mlp, "kwargs": {"width": 16}},
                                   "ta": {**mlp, "kwargs": {"width": 32}, "distil_from": "big", "temperature": 2.0},
                                   "both": {"ensemble": ["big", "small"], "weights": [3, 1]}},
                      "train": {"epochs": 1, "batch_size": 128},
                      "search": {"space": {"teacher": {"choice": ["big", "ta", "both"]},
                                           "loss": {"kd": {"temperature": {"choice": [2.0, 5.0]}}}}}, **extra})


@pytest.mark.parametrize("path", OURS, ids=[p.stem for p in OURS])
def test_bad_teacher_input_names_its_key(path):
    expect = path.read_text().split("\n", 1)[0].removeprefix("# expect: ").split(" | ")
    with pytest.raises(SpecError) as caught:
        load_spec(str(path))
    assert caught.value.path == expect[0]
    assert all(fragment in caught.value.message for fragment in expect[1:]), caught.value.message


def test_teacher_is_optional_with_teachers_and_the_first_is_the_default(mnist_root, tmp_path):
    spec = teachers_spec(mnist_root, tmp_path, search={"space": {"loss": {"kd": {}}}})
    assert spec.teacher is None
    assert parse_space(spec).teachers == ["big"]
    assert resolve(spec, {"loss": "kd"}).teacher == "big"
    assert resolve(spec, {"loss": "none"}).teacher is None


@pytest.mark.slow
def test_ensemble_targets_are_the_members_weighted_mean_probability(mnist_root, tmp_path):
    spec = teachers_spec(mnist_root, tmp_path)
    splits = load_splits(spec.data, spec.seed)
    data, facts = prepare_teachers(spec, parse_space(spec), splits, None, None, None, None, tmp_path / "outputs")
    info = facts
    assert set(data.teachers) == {"ta", "both"}  # big is the data's own
    plan = resolve(spec, {"loss": "kd", "kd.temperature": 5.0, "teacher": "both"})
    targets = TeacherTargets(data.for_teacher(plan.teacher), ("logits",), "cpu", method_temperature(plan))
    idx = torch.arange(40, 90)
    got = F.softmax(targets(idx, splits.train_x[idx])["logits"] / 5.0, dim=1)
    loader = Teachers(spec, splits, print)  # the members again, from the teacher cache
    big, small = (loader.get(n).model for n in ("big", "small"))
    with torch.no_grad():
        x = splits.train_x[idx]
        expected = 0.75 * F.softmax(big(x).logits / 5.0, dim=1) + 0.25 * F.softmax(small(x).logits / 5.0, dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert info["teachers"]["both"]["source"] == "ensemble of big, small"
    assert info["teachers"]["both"]["params"] == info["teachers"]["big"]["params"] + info["teachers"]["small"]["params"]
    # each member's train set passed once: for big's own targets and the ensemble's alike
    assert info["teachers"]["small"]["forward_passes"]["train"] == 1
    assert info["teachers"]["big"]["forward_passes"]["train"] == 2  # its targets, and once to train the assistant


@pytest.mark.slow
def test_an_assistant_trains_once_from_its_teacher_then_comes_from_the_cache(mnist_root, tmp_path):
    spec = teachers_spec(mnist_root, tmp_path)
    splits = load_splits(spec.data, spec.seed)
    first = Teachers(spec, splits, print)
    assert first.get("ta").facts["source"] == "assistant of big (trained)"
    assert first.passes["big"]["train"] == 1  # big's logits, to distil the assistant from
    assert first.passes["ta"].get("train", 0) == 0  # those are big's passes, not the assistant's
    again = Teachers(spec, splits, print)
    assert again.get("ta").facts["source"] == "assistant of big (cached)"
    assert again.passes["big"].get("train", 0) == 0  # nothing computed for a cached assistant
    x = splits.test_x[:64]
    with torch.no_grad():
        assert torch.equal(first.get("ta").model(x).logits, again.get("ta").model(x).logits)
    other = teachers_spec(mnist_root, tmp_path, teachers={**spec.model_dump()["teachers"],
                                                          "ta": {"arch": "mlp", "kwargs": {"width": 32}, "epochs": 1,
                                                                 "cache_dir": str(tmp_path), "distil_from": "small"}})
    assert Teachers(other, splits, print).get("ta").facts["source"] == "assistant of small (trained)"


@pytest.mark.slow
def test_a_sweep_over_teachers_records_the_choice_and_each_teacher(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("KDTUNE_CACHE", str(tmp_path / "cache"))
    spec = teachers_spec(mnist_root, tmp_path / "cache", search={
        "space": {"teacher": {"choice": ["big", "ta", "both"]}, "loss": {"kd": {}}}, "num_samples": 4,
        "max_concurrent": 1, "confirm_seeds": 0})
    done = run(spec, results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    summary = json.loads((done.results_dir / "summary.json").read_text())
    assert summary["teachers"]["ta"]["source"].startswith("assistant of big")
    assert summary["teachers"]["both"]["source"] == "ensemble of big, small"
    assert {"params", "test_acc", "forward_passes"} <= set(summary["teachers"]["big"])
    trials = pd.read_csv(done.results_dir / "trials.csv")
    kd = trials[trials["loss"] == "kd"]
    assert kd["teacher"].isin(["big", "ta", "both"]).all() and trials.loc[trials["loss"] == "none", "teacher"].isna().all()
    assert "teacher" in pd.read_csv(done.results_dir / "pareto.csv").columns
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_ = client.get_run(kd.iloc[0]["mlflow_run_id"])
    assert run_.data.params["teacher"] == kd.iloc[0]["teacher"]


def test_which_teacher_pairs_each_teachers_confirmed_best_with_the_baseline():
    from scipy import stats

    from kdtune.confirm import candidates, which_teacher

    search = [  # one student size; the best per teacher (and dml's) gets confirmed
        ("b", "none", None, 0.90), ("k1", "kd", "big", 0.93), ("k2", "kd", "big", 0.92),
        ("k3", "kd", "ta", 0.91), ("d1", "dml", None, 0.915)]
    rows = [{"trial_id": t, "phase": "search", "loss": loss, "teacher": teacher, "student": "cnn 8",
             "student.arch": "cnn", "width": 8, "params": 5000, "val_acc": acc, "test_acc": acc, "status": "FINISHED"}
            for t, loss, teacher, acc in search]
    objectives = [("val_acc", "max"), ("params", "min")]
    picks = candidates(pd.DataFrame(rows), objectives)
    assert list(picks["trial_id"]) == ["b", "k1", "d1", "k3"]  # baseline, best overall, then per teacher
    confirmed = {"b": [0.90, 0.91, 0.89], "k1": [0.93, 0.935, 0.915], "k3": [0.91, 0.90, 0.88], "d1": [0.92, 0.92, 0.90]}
    for source, accs in confirmed.items():
        first = next(r for r in rows if r["trial_id"] == source)
        rows += [{**first, "trial_id": f"{source}-{seed}", "phase": "confirm", "seed": seed, "source_trial": source,
                  "test_acc": acc, "val_acc": acc} for seed, acc in zip((1, 2, 3), accs)]
    table = which_teacher(pd.DataFrame(rows), objectives).set_index("teacher")
    assert set(table.index) == {"big", "ta", "(dml)"}
    for teacher, source in (("big", "k1"), ("ta", "k3"), ("(dml)", "d1")):
        d = [k - b for k, b in zip(confirmed[source], confirmed["b"])]
        half = stats.t.ppf(0.975, 2) * pd.Series(d).std() / 3 ** 0.5
        assert table.loc[teacher, "gain"] == pytest.approx(sum(d) / 3)
        assert table.loc[teacher, "ci95_low"] == pytest.approx(sum(d) / 3 - half)
    assert table.loc["big", "verdict"] == "gain" and table.loc["ta", "verdict"] == "no clear gain"
