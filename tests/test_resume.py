"""Kill a sweep's driver with SIGKILL part-way, then --resume: nothing finished is rerun,
every trial appears once, and every trial keeps its one MLflow run."""
import os
import signal
import time

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient


def test_sigkilled_sweep_resumes_without_rerunning_or_duplicating(tmp_path, run_cli):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "resume", "data": {"val_size": 500, "train_limit": 3000, "test_limit": 500}, "teacher": {"epochs": 1},
        "train": {"epochs": 8, "batch_size": 64, "checkpoint_every": 1},
        "search": {"space": {"width": {"choice": [16, 32]}, "loss": {"none": {}, "kd": {}}},
                   "num_samples": 6, "max_concurrent": 2, "confirm_seeds": 0}}))
    sweep = run_cli([spec], tmp_path, background=True)
    for line in sweep.stdout:
        if line.startswith("[3/"):  # three trials finished
            break
    # Known race, not covered here: Tune snapshots a trial's completion one controller step after
    # our callback ends its run, so a kill inside that step reruns that trial's last epochs.
    time.sleep(1)
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=60)
    time.sleep(5)  # Ray's reaper ends the local cluster of the killed driver

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume")
    before = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    finished_before = {i for i, r in before.items() if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags}
    assert len(finished_before) >= 3
    assert not (tmp_path / "results" / "resume" / "trials.csv").exists()

    done = run_cli([spec, "--resume"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming the interrupted sweep" in done.stdout
    trials = pd.read_csv(tmp_path / "results" / "resume" / "trials.csv")
    assert len(trials) == 6 + 2 and trials["trial_id"].is_unique
    assert (trials["status"] == "FINISHED").all() and (trials["epochs"] == 8).all()

    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, ended once
    assert len(children) == len(trials) and sorted(r.info.run_id for r in children) == sorted(trials["mlflow_run_id"])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for run_id in finished_before:  # finished trials were not rerun: one value per epoch, as before the kill
        history = client.get_metric_history(run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, 9))
        assert client.get_run(run_id).data.tags["kdtune.starts"] == "1"
