"""Failures a long sweep meets: diverging and crashing trials, unreachable tracking, bad teacher
checkpoints, kills while writing, Ctrl-C; and reproducibility of the sampled configurations."""
import glob
import json
import pickle
import signal
import time

import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from kdtune import results
from kdtune.models import create_model


def write_spec(path, **overrides):
    """A small MLP sweep on a 3000-example slice; keyword overrides replace whole sections."""
    spec = {"name": "rel", "seed": 0,
            "data": {"val_size": 500, "train_limit": 3000, "test_limit": 500},
            "teacher": {"epochs": 1},
            "train": {"epochs": 1, "batch_size": 64},
            "search": {"space": {"width": 16, "loss": {"none": {}}}, "num_samples": 4, "max_concurrent": 2,
                       "sampler": "random", "baselines": False, "confirm_seeds": 0}}
    for section, value in overrides.items():
        spec[section] = {**spec.get(section, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(spec))
    return path


def mlflow_runs(cwd, name="rel"):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def study_of(cwd, name="rel") -> optuna.Study:
    """The Optuna study as Ray Tune checkpointed it with the searcher."""
    [path] = glob.glob(str(cwd / "results" / name / "search" / "searcher-state-*.pkl"))
    with open(path, "rb") as f:
        return pickle.load(f)["_ot_study"]


@pytest.mark.slow
def test_diverging_trial_fails_as_diverged_and_the_sweep_goes_on(tmp_path, run_cli):
    spec = write_spec(tmp_path / "s.yaml", train={"optimizer": "sgd"},
                      search={"space": {"width": 16, "train.lr": {"choice": [0.05, 1.0e12]}, "loss": {"none": {}}},
                              "num_samples": 5})
    done = run_cli([spec], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = pd.read_csv(tmp_path / "results" / "rel" / "trials.csv")
    diverged, fine = trials[trials["train.lr"] > 1], trials[trials["train.lr"] < 1]
    assert len(diverged) and len(fine)
    assert (diverged["status"] == "FAILED").all() and (diverged["reason"] == "diverged").all()
    assert (fine["status"] == "FINISHED").all()
    _, runs = mlflow_runs(tmp_path)
    by_id = {r.info.run_id: r for r in runs}
    for run_id in diverged["mlflow_run_id"]:
        assert by_id[run_id].info.status == "FAILED" and by_id[run_id].data.tags["kdtune.reason"] == "diverged"
    states = {t.params["train.lr"]: t.state for t in study_of(tmp_path).trials}
    assert states[1.0e12] == optuna.trial.TrialState.FAIL  # learned as a failure, not as an accuracy
    assert states[0.05] == optuna.trial.TrialState.COMPLETE


@pytest.mark.slow
def test_raising_trial_is_recorded_retried_and_the_sweep_completes(tmp_path, run_cli):
    # a CRD memory bank of 2500 x 1e9 floats cannot be allocated: a real out-of-memory error
    spec = write_spec(tmp_path / "s.yaml", search={"space": {"width": 16, "loss": {"none": {}, "crd": {"feat_dim": 1000000000}}},
                                                   "num_samples": 4, "max_failures": 1})
    done = run_cli([spec], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = pd.read_csv(tmp_path / "results" / "rel" / "trials.csv")
    crashed, fine = trials[trials["loss"] == "crd"], trials[trials["loss"] == "none"]
    assert len(crashed) and len(fine)
    assert (crashed["status"] == "FAILED").all() and crashed["reason"].str.contains("allocate").all()
    assert (fine["status"] == "FINISHED").all()
    _, runs = mlflow_runs(tmp_path)
    children = [r for r in runs if r.data.params.get("loss") == "crd"]
    assert len(children) == len(crashed)  # the retry reattached to the trial's run
    for run in children:
        assert run.info.status == "FAILED" and "allocate" in run.data.tags["kdtune.reason"]
        assert run.data.tags["kdtune.starts"] == "2"  # first try + search.max_failures=1 retry


@pytest.mark.slow
def test_unreachable_tracking_server_fails_before_any_training(tmp_path, run_cli):
    spec = write_spec(tmp_path / "s.yaml")
    started = time.time()
    done = run_cli([spec, "--tracking-uri", "http://127.0.0.1:9"], tmp_path)
    assert done.returncode == 2
    assert "http://127.0.0.1:9 cannot be reached" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing", "corrupt", "other-arch"])
def test_bad_teacher_checkpoint_is_a_clear_error_naming_the_file(tmp_path, run_cli, problem):
    checkpoint = tmp_path / f"{problem}.pt"
    if problem == "corrupt":
        checkpoint.write_bytes(b"not a checkpoint at all")
    elif problem == "other-arch":
        torch.save(create_model("mlp", (1, 28, 28), 10, 64).state_dict(), checkpoint)
    spec = write_spec(tmp_path / "s.yaml", teacher={"checkpoint": str(checkpoint)})
    done = run_cli([spec], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"teacher.checkpoint: {checkpoint}" in done.stderr
    expected = {"missing": "no such file", "corrupt": "not a readable PyTorch checkpoint", "other-arch": "does not fit arch"}
    assert expected[problem] in done.stderr
    assert not (tmp_path / "results" / "rel" / "search").exists()


def test_a_kill_while_writing_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "trials.csv"
    results.write_csv(pd.DataFrame({"a": [1, 2]}), target)
    before = target.read_text()

    def killed_half_way(tmp):
        with open(tmp, "w") as f:
            f.write("a\n3\n")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        results.write_atomic(target, killed_half_way)
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]  # no temp file left behind


@pytest.mark.slow
def test_ctrl_c_stops_trials_ends_runs_killed_and_writes_partial_results(tmp_path, run_cli):
    spec = write_spec(tmp_path / "s.yaml", train={"epochs": 30},
                      search={"space": {"width": {"choice": [16, 32]}, "loss": {"none": {}}}, "num_samples": 6})
    sweep = run_cli([spec, "--set", "train.checkpoint_every=5"], tmp_path, background=True)
    lines = []
    for line in sweep.stdout:
        lines.append(line)
        if line.startswith("[1/"):  # one trial finished, others running
            break
    sweep.send_signal(signal.SIGINT)
    rest, _ = sweep.communicate(timeout=300)
    output = "".join(lines) + rest
    assert sweep.returncode == 130, output[-3000:]
    assert "--resume" in output and "Traceback" not in output
    out = tmp_path / "results" / "rel"
    trials = pd.read_csv(out / "trials.csv")
    killed = trials["status"] == "KILLED"
    assert (trials["reason"][killed] == "interrupted").all()
    # Ctrl+C can land just as the running trials finish: then none is KILLED, but the search is short
    assert killed.any() or len(trials) < 6, trials
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    _, runs = mlflow_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.info.status == "KILLED"


@pytest.mark.slow
def test_same_spec_and_seed_give_the_same_configurations_and_metrics(tmp_path, run_cli):
    spec = write_spec(tmp_path / "s.yaml", search={
        "space": {"width": {"choice": [16, 32]}, "train.lr": {"loguniform": [0.0005, 0.005]},
                  "loss": {"none": {}, "kd": {"temperature": {"uniform": [1, 8]}}}},
        "num_samples": 4, "sampler": "tpe"})
    tables = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        done = run_cli([spec], tmp_path / run)
        assert done.returncode == 0, done.stderr[-2000:]
        tables.append(pd.read_csv(tmp_path / run / "results" / "rel" / "trials.csv"))
    columns = ["loss", "width", "train.lr", "kd.temperature"]
    a, b = (t[columns].sort_values(columns).reset_index(drop=True) for t in tables)
    pd.testing.assert_frame_equal(a, b)
    first = tables[0].sort_values(columns).iloc[0]
    second = tables[1].sort_values(columns).iloc[0]
    assert first["val_acc"] == second["val_acc"] and first["test_acc"] == second["test_acc"]
