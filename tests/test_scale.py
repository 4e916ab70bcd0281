"""Many concurrent tiny trials on a Ray head that advertises more CPU slots than this machine has
cores, joined with `--address`; the driver SIGKILLed late in the sweep, with Tune's experiment
snapshot taken only at the start, so that finished trials are known to MLflow and Optuna alone;
then `--resume`. Every trial one FINISHED child run with all its per-epoch metrics, none RUNNING,
no duplicate, none of those finished before the kill trained again, the sqlite store never locked."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from test_cluster import RAY, new_cluster, start_head

pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None, reason="needs the `ray` CLI (pip install 'ray[default]')")]

SLOTS, TRIALS, EPOCHS = 8, 12, 2
KILL_AFTER = SLOTS + 1  # finished trials: more than the first step can have started, so some began after it


@pytest.fixture(scope="module")
def head():
    c = new_cluster(cpus=SLOTS)
    try:
        start_head(c)
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def test_many_concurrent_trials_survive_a_driver_kill_between_snapshots(head, tmp_path, mnist_root):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "many", "data": {"root": str(mnist_root), "val_size": 200, "train_limit": 512, "test_limit": 200},
        "teacher": {"arch": "mlp", "epochs": 1}, "student": {"arch": "mlp"},
        "train": {"epochs": EPOCHS, "batch_size": 64, "checkpoint_every": 1},
        "search": {"space": {"width": {"choice": [16, 32]}, "train.lr": {"loguniform": [0.01, 0.05]},
                             "loss": {"none": {}, "kd": {}}},
                   "num_samples": TRIALS, "max_concurrent": SLOTS, "baselines": False, "confirm_seeds": 0},
        "resources": {"cpu": 1, "gpu": 0}}))
    # Tune's own snapshot only at the first step (and at the end): trials that start later are in MLflow alone
    env = {**head.env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    command = [sys.executable, "-m", "kdtune.sweep", str(spec), "--address", head.gcs, "--results-dir",
               str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = []
    for line in sweep.stdout:
        killed.append(line)
        if line.startswith(f"[{KILL_AFTER}/"):
            break
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=60)
    time.sleep(5)  # Ray ends the killed driver's trial actors

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("many")
    finished_before = [r.info.run_id for r in client.search_runs([experiment.experiment_id])
                       if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags]
    assert len(finished_before) >= KILL_AFTER, "".join(killed)[-3000:]

    done = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "trial(s) that ended after Tune's last snapshot before a driver kill recovered from MLflow" in output
    for text in ("database is locked", "may be a performance bottleneck"):
        assert text not in "".join(killed) + output

    trials = pd.read_csv(tmp_path / "results" / "many" / "trials.csv")
    assert len(trials) == TRIALS and trials["trial_id"].is_unique
    assert (trials["status"] == "FINISHED").all() and (trials["epochs"] == EPOCHS).all()
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_id for r in children) == sorted(trials["mlflow_run_id"])  # one run per trial
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["kdtune.status"] == "FINISHED"
        for metric in ("val_acc", "val_loss", "loss_ce"):  # a trial that restarts from an older checkpoint logs
            steps = {m.step for m in client.get_metric_history(run.info.run_id, metric)}  # its repeated epochs again
            assert steps == set(range(1, EPOCHS + 1)), (run.data.tags["kdtune.trial_id"], metric)
    for run_id in finished_before:  # not trained again
        assert client.get_run(run_id).data.tags["kdtune.starts"] == "1"
        assert len(client.get_metric_history(run_id, "val_acc")) == EPOCHS
    study_name = client.get_run(trials["mlflow_run_id"][0]).data.tags["mlflow.parentRunId"]
    study = optuna.load_study(study_name=f"many-{study_name}", storage=f"sqlite:///{tmp_path / 'results' / 'many' / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(round(t.values[0], 6) for t in complete) == sorted(round(v, 6) for v in trials["val_acc"])
