"""The whole pipeline: a --smoke sweep of search_spaces/mnist.yaml through real Ray, real
MLflow (sqlite) and a real MNIST slice, checked through its files and its MLflow runs."""
import json
import math
import re

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, SPEC

T_975_DF1 = 12.706204736174698  # Student's t quantile, 0.975, 1 degree of freedom (2 seeds)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, mnist_root, teacher_cache):
    import os, subprocess, sys
    cwd = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "KDTUNE_CACHE": str(teacher_cache)}
    done = subprocess.run([sys.executable, "-m", "kdtune.sweep", str(SPEC), "--smoke", "--results-dir", str(cwd / "results"),
                           "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}", "--set", f"data.root={mnist_root}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = cwd / "results" / "mnist-kd"
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-kd")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {"out": out, "stdout": done.stdout, "client": client, "runs": runs,
            "trials": pd.read_csv(out / "trials.csv"), "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow
def test_result_files_and_terminal_tables(smoke):
    out, trials = smoke["out"], smoke["trials"]
    for column in ["trial_id", "loss", "student.arch", "width", "student", "mlp.width", "gapnet.width", "train.lr", "kd.temperature", "kd.alpha", "fitnet.beta", "rkd.beta",
                   "crd.beta", "params", "val_acc", "test_acc", "epochs", "status", "mlflow_run_id"]:
        assert column in trials.columns
    search = trials[trials["phase"] == "search"]
    assert len(search) == 4 + 5  # num_samples in --smoke, plus loss=none at each arch's widths
    baselines = search[search["loss"] == "none"]
    assert set(zip(baselines["student.arch"], baselines["width"])) == {
        ("mlp", 64), ("mlp", 256), ("gapnet", 4), ("gapnet", 6), ("gapnet", 12)}
    assert (search["width"] == search["mlp.width"].fillna(search["gapnet.width"])).all()  # the chosen arch's width
    # a parameter is blank where it does not apply
    assert search[search["loss"] != "kd"]["kd.temperature"].isna().all()
    assert (search["status"] == "FINISHED").all() and (search["epochs"] == 2).all()
    assert (search["val_acc"] > 0.05).all() and (search[search["student.arch"] == "mlp"]["val_acc"] > 0.5).all()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = smoke["summary"]
    assert {"spec", "versions", "teacher", "wall_seconds", "front", "kd_gain"} <= set(summary)
    assert summary["spec"]["data"]["train_limit"] == 12000 and summary["versions"]["torch"]
    assert 0.1 < summary["teacher"]["test_acc"] <= 1 and summary["teacher"]["params"] == 72_666
    assert summary["teacher"]["source"] in ("trained", "cached") and summary["teacher"]["recipe"]["optimizer"] == "adamw"
    gap = summary["teacher_gap"]
    assert gap["teacher_test_acc"] == summary["teacher"]["test_acc"]
    assert gap["best_baseline_test_acc"] == pytest.approx(max(
        search[search["loss"] == "none"]["test_acc"].max(), *[row["baseline_test_acc"] for row in summary["kd_gain"]]))
    experiment = smoke["client"].get_experiment_by_name("mnist-kd").experiment_id  # the UI's model-training page
    assert (f"runs in the MLflow UI: mlflow ui --backend-store-uri sqlite:///{smoke['out'].parents[1] / 'mlflow.db'}, "
            f"then http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning") in smoke["stdout"]
    assert "teacher test_acc" in smoke["stdout"]
    assert "Pareto-optimal students" in smoke["stdout"] and "KD gain" in smoke["stdout"]


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(smoke):
    runs, trials, client = smoke["runs"], smoke["trials"], smoke["client"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["search.num_samples"] == "4"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "pareto.csv", "pareto.png", "summary.json"} <= artifacts
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.info.run_id for r in children) == sorted(trials["mlflow_run_id"])
    assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs)
    for run in children:
        assert {"val_acc", "test_acc", "params", "extra_params", "loss_ce"} <= set(run.data.metrics)
        assert {"loss", "width", "student.arch"} <= set(run.data.params)
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2  # one per epoch
    for run in children:  # the tags the MLflow UI groups runs by
        row = trials[trials["mlflow_run_id"] == run.info.run_id].iloc[0]
        tags = run.data.tags
        assert (tags["kdtune.loss"], tags["kdtune.student"], tags["kdtune.sweep"]) == (
            row["loss"], row["student"], parent.info.run_id)
        assert int(tags["kdtune.params"]) == int(run.data.metrics["params"]) == row["params"]
    for run_id in trials[trials["phase"] == "confirm"]["mlflow_run_id"]:  # confirmation students are models
        uri = client.get_run(run_id).data.tags["kdtune.model_uri"]
        model = client.get_logged_model(uri.removeprefix("models:/"))  # in the sweep's experiment, where the UI looks
        assert (model.source_run_id, model.experiment_id) == (run_id, parent.info.experiment_id)
    assert {"report/report.html", "report/pareto.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    kd_like = [r for r in children if r.data.params["loss"] in ("kd", "fitnet", "rkd", "crd")]
    for run in kd_like:  # each method's own loss terms are logged next to CE
        assert len([m for m in run.data.metrics if m.startswith("loss_")]) >= 2


@pytest.mark.slow
def test_smoke_answers_the_question(smoke):
    """--smoke still trains: the teacher clearly ahead of every student on the front, each of them
    far above chance (10%), and no warning against those numbers."""
    front, summary = pd.read_csv(smoke["out"] / "pareto.csv"), smoke["summary"]
    teacher = summary["teacher"]["test_acc"]
    assert len(front) >= 1 and (front["test_acc"] > 0.85).all()
    assert (teacher > front["test_acc"]).all() and teacher >= summary["teacher_gap"]["best_baseline_test_acc"] + 0.005
    assert summary["teacher_gap"]["warning"] is None and "WARNING" not in smoke["stdout"]


@pytest.mark.slow
def test_one_kind_of_trial_id_in_terminal_csv_and_run_names(smoke):
    trials, runs, stdout = smoke["trials"], smoke["runs"], smoke["stdout"]
    assert set(trials["phase"]) == {"search", "confirm"}
    assert trials["trial_id"].str.fullmatch(r"[0-9a-f]{8}").all() and trials["trial_id"].is_unique
    printed = re.findall(r"^\[\d+/\d+\] (\S+) ", stdout, flags=re.M)
    assert sorted(printed) == sorted(trials["trial_id"])
    by_run = trials.set_index("mlflow_run_id")
    for run in (r for r in runs if "mlflow.parentRunId" in r.data.tags):
        row = by_run.loc[run.info.run_id]
        assert run.data.tags["kdtune.trial_id"] == row["trial_id"]
        assert run.info.run_name == f"{row['trial_id']} {row['loss']} {row['student']}"


@pytest.mark.slow
def test_teacher_outputs_computed_once_per_split(smoke):
    assert smoke["summary"]["teacher_forward_passes"] == {"train": 1, "test": 1}
    children = [r for r in smoke["runs"] if "mlflow.parentRunId" in r.data.tags]
    assert all(r.data.metrics["teacher_live_batches"] == 0 for r in children)


@pytest.mark.slow
def test_confirmation_runs_and_interval_arithmetic(smoke):
    trials, runs = smoke["trials"], smoke["runs"]
    reruns = trials[trials["phase"] == "confirm"]
    assert len(reruns) > 0 and set(reruns["seed"]) == {1, 2}  # spec seed 0 -> fresh seeds 1, 2
    tagged = [r for r in runs if r.data.tags.get("kdtune.phase") == "confirm"]
    assert sorted(r.info.run_id for r in tagged) == sorted(reruns["mlflow_run_id"])
    sources = trials.set_index("trial_id").loc[reruns["source_trial"].unique()]
    assert (sources["phase"] == "search").all()
    gain = pd.read_csv(smoke["out"] / "summary.json") if False else pd.DataFrame(smoke["summary"]["kd_gain"])
    assert len(gain) > 0
    for _, row in gain.iterrows():
        size = reruns[(reruns["student.arch"] == row["student.arch"]) & (reruns["width"] == row["width"])]
        base = size[size["loss"] == "none"].set_index("seed")["test_acc"]
        kd = size[size["loss"] != "none"].set_index("seed")["test_acc"]
        diffs = [kd[s] - base[s] for s in (1, 2)]
        mean = (diffs[0] + diffs[1]) / 2
        sd = abs(diffs[0] - diffs[1]) / math.sqrt(2)
        half = T_975_DF1 * sd / math.sqrt(2)
        assert row["gain"] == pytest.approx(mean, abs=1e-12)
        assert row["ci95_low"] == pytest.approx(mean - half, abs=1e-9)
        assert row["ci95_high"] == pytest.approx(mean + half, abs=1e-9)
        expected = "gain" if mean - half > 0 else "loss" if mean + half < 0 else "no clear gain"
        assert row["verdict"] == expected


@pytest.mark.slow
def test_confirmed_front_is_non_dominated(smoke):
    front = pd.read_csv(smoke["out"] / "pareto.csv")
    reruns = smoke["trials"][smoke["trials"]["phase"] == "confirm"]
    means = reruns.groupby("source_trial").agg(val_acc=("val_acc", "mean"), params=("params", "first"))
    assert len(front) >= 1
    for _, point in front.iterrows():
        assert point["val_acc"] == pytest.approx(means.loc[point["source_trial"], "val_acc"])
        dominated = ((means["val_acc"] >= point["val_acc"]) & (means["params"] <= point["params"])
                     & ((means["val_acc"] > point["val_acc"]) | (means["params"] < point["params"])))
        assert not dominated.any()
    others = means.drop(index=front["source_trial"])
    for _, other in others.iterrows():
        assert any((p["val_acc"] >= other["val_acc"]) and (p["params"] <= other["params"]) for _, p in front.iterrows())


@pytest.mark.slow
def test_a_space_naming_every_method_runs_each_of_them(tmp_path, run_cli):
    import yaml
    from kdtune.distill import METHODS

    spec = tmp_path / "all.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "all-methods", "data": {"val_size": 500, "train_limit": 2000, "test_limit": 500},
        "teacher": {"epochs": 1}, "student": {"arch": "cnn", "width": 4}, "train": {"epochs": 1, "batch_size": 64},
        "search": {"space": {"loss": {name: {} for name in METHODS}}, "sampler": "random", "num_samples": 30,
                   "baselines": False, "confirm_seeds": 0}}))
    done = run_cli([spec], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "results" / "all-methods" / "trials.csv")
    assert set(trials["loss"]) == set(METHODS) == {"none", "kd", "fitnet", "rkd", "crd", "dkd", "at", "srrl", "dml",
                                                   "byot"}
    assert (trials["status"] == "FINISHED").all()
    assert (trials.loc[trials["loss"].isin(["fitnet", "crd"]), "extra_params"] > 0).all()


@pytest.mark.slow
def test_a_weak_teacher_is_flagged(tmp_path, run_cli):
    """A teacher below its students cannot teach them: the summary and terminal say so, with its numbers."""
    done = run_cli([REPO / "search_spaces" / "mnist-mlp.yaml", "--smoke", "--set", "teacher.lr=0.00001",
                    "--set", "teacher.epochs=1", "--set", "data.train_limit=5000", "--set", "search.confirm_seeds=0",
                    "--set", "search.num_samples=1", "--set", "search.space.width={choice: [64]}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "mnist-mlp" / "summary.json").read_text())
    gap = summary["teacher_gap"]
    teacher, best = gap["teacher_test_acc"], gap["best_baseline_test_acc"]
    assert teacher < best - 0.005
    assert gap["warning"].startswith(f"the teacher ({teacher:.2%}) is {(best - teacher) * 100:.2f} points below "
                                     f"the best baseline student ({best:.2%}): it cannot teach it")
    assert f"WARNING: {gap['warning']}" in done.stdout
    front = pd.read_csv(tmp_path / "results" / "mnist-mlp" / "pareto.csv")
    assert front["teacher_gap"].tolist() == pytest.approx((gap["teacher_test_acc"] - front["test_acc"]).tolist())
