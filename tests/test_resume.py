"""Kill a sweep's driver with SIGKILL part-way, then --resume: nothing finished is rerun,
every trial appears once, and every trial keeps its one MLflow run."""
import io
import json
import math
import os
import signal
import time
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdtune import tracking
from kdtune.tuning import SweepContext, TrackingCallback


def test_sigkilled_sweep_resumes_without_rerunning_or_duplicating(tmp_path, run_cli):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "resume", "data": {"val_size": 500, "train_limit": 3000, "test_limit": 500}, "teacher": {"epochs": 1},
        "train": {"epochs": 8, "batch_size": 64, "checkpoint_every": 1},
        "search": {"space": {"width": {"choice": [16, 32]}, "loss": {"none": {}, "kd": {}}},
                   "num_samples": 6, "max_concurrent": 2, "confirm_seeds": 0}}))
    sweep = run_cli([spec], tmp_path, background=True)
    for line in sweep.stdout:
        if line.startswith("[3/"):  # three trials finished: the third one's run is ended, but
            break                   # Tune records its completion one controller step later
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
    # the resumed search continued the same Optuna study (RDB storage): one complete trial per search trial
    info = json.loads((tmp_path / "results" / "resume" / "summary.json").read_text())["optuna"]
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(study.trials) == len(trials)  # each once, none RUNNING
    assert sorted(round(t.values[0], 6) for t in complete) == sorted(round(v, 6) for v in trials["val_acc"])

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


def child_store(tmp_path):
    """A real sqlite MLflow store with a sweep's parent run, and trial t1's child run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, "replay")
    parent = client.create_run(exp_id).info.run_id

    def child() -> str:  # what trainable calls when Tune restores t1 without a checkpoint
        return tracking.child_run(client, exp_id, parent, "t1", "t1 kd mlp16", {"loss": "kd"}, {"kdtune.phase": "search"})
    return client, SweepContext({}, uri, exp_id, parent), child


def epoch_result(epoch: int, last: bool, diverged: bool = False) -> dict:
    result = {"epoch": epoch, "val_acc": math.nan if diverged else 0.5 + epoch / 100, "val_loss": math.nan if diverged else 1 / epoch,
              "loss_ce": 2 / epoch, "loss_kd": 1 / epoch, "params": 12345, "extra_params": 0, "epoch_seconds": 0.1,
              "teacher_live_batches": 0, "diverged": diverged, "done": diverged or last}
    return {**result, "test_acc": 0.6} if last and not diverged else result


class NamedTrial(SimpleNamespace):
    """The Trial a callback gets, as far as TrackingCallback reads it: str() is its name (Tune's
    TuneConfig.trial_name_creator), here its id, as kdtune names search trials."""

    def __str__(self) -> str:
        return self.trial_id


@pytest.mark.parametrize("status, reason, epochs, last, diverged", [
    ("FINISHED", None, 8, True, False),
    ("STOPPED", "early-stopped by the scheduler", 2, False, False),
    ("FAILED", "diverged", 3, False, True),
])
def test_a_trial_restored_after_it_completed_replays_its_result_and_leaves_its_run_as_it_is(
        tmp_path, status, reason, epochs, last, diverged):
    """The kill between our callback ending a trial's run and Tune recording its end, made deterministic."""
    client, ctx, child = child_store(tmp_path)
    run_id = child()
    for epoch in range(1, epochs + 1):  # as TrackingCallback logs and ends it
        tracking.log_epoch(client, run_id, epoch_result(epoch, last and epoch == epochs, diverged and epoch == epochs))
    tracking.end_run(client, run_id, status, reason)
    before = client.get_run(run_id)
    histories = {k: [(m.step, m.timestamp) for m in client.get_metric_history(run_id, k)] for k in before.data.metrics}

    assert child() == run_id  # Tune restored t1: same run, not reopened, no start counted
    final = tracking.final_result(client, run_id)
    assert final == pytest.approx(epoch_result(epochs, last, diverged), nan_ok=True)

    callback = TrackingCallback(ctx, epochs=8, total=1, objective="val_acc", mode="max", out=io.StringIO())
    replayed = {**final, "replayed": True, "mlflow_run_id": run_id, "trial_id": "t1"}
    trial = NamedTrial(trial_id="t1", last_result=replayed)
    callback.on_trial_result(1, [trial], trial, replayed)
    callback.on_trial_complete(1, [trial], trial)
    assert callback.out.getvalue().startswith(f"[1/1] t1 {status.lower()}")
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert after.data.tags == before.data.tags and after.data.tags["kdtune.starts"] == "1"
    assert {k: [(m.step, m.timestamp) for m in client.get_metric_history(run_id, k)] for k in after.data.metrics} == histories


@pytest.mark.parametrize("status, reason", [("KILLED", None), ("FAILED", "RuntimeError: boom")])
def test_an_interrupted_or_errored_trial_is_not_replayed_but_trains_again(tmp_path, status, reason):
    client, _, child = child_store(tmp_path)
    run_id = child()
    tracking.log_epoch(client, run_id, epoch_result(1, last=False))
    tracking.end_run(client, run_id, status, reason)
    assert tracking.final_result(client, run_id) is None
    assert child() == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["kdtune.starts"] == "2"


def test_reconcile_deletes_the_run_of_a_trial_tune_never_recorded(tmp_path):
    """A trial started after Tune's last experiment snapshot, then the driver killed: --resume samples
    it anew, so its run (still RUNNING) matches no row; the sweep's end ends and deletes it."""
    from kdtune import reconcile

    client, ctx, child = child_store(tmp_path)
    kept = child()
    tracking.end_run(client, kept, "FINISHED")
    orphan = tracking.child_run(client, ctx.experiment_id, ctx.parent_run_id, "t9", "t9 kd mlp16", {"loss": "kd"}, {})
    tracking.log_epoch(client, orphan, epoch_result(1, last=False))
    trials = pd.DataFrame([{"trial_id": "t1", "phase": "search", "loss": "kd", "student": "mlp16", "status": "FINISHED",
                            "reason": "", "mlflow_run_id": kept, "epochs": 8, "val_acc": 0.9, "params": 12345}])
    reconciled, missing = reconcile.reconcile(client, ctx.experiment_id, ctx.parent_run_id, trials)
    assert missing == [] and list(reconciled["mlflow_run_id"]) == [kept]
    live = client.search_runs([ctx.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{ctx.parent_run_id}'")
    assert [r.info.run_id for r in live] == [kept]
    gone = client.get_run(orphan)  # deleted, not purged: its epoch is still there to restore
    assert gone.info.lifecycle_stage == "deleted" and gone.info.status == "KILLED"
    assert gone.data.tags["kdtune.reconciled"] == "orphan" and gone.data.metrics["val_acc"] == pytest.approx(0.51)


def test_the_study_on_record_gets_each_trial_once_with_the_spaces_own_distributions(tmp_path):
    from kdtune import study
    from kdtune.loading import validate
    from kdtune.spec import spec_to_dict

    spec = validate({"name": "s", "search": {"space": {"width": {"choice": [16, 32]}, "train.lr": {"loguniform": [0.001, 0.1]},
                                                      "loss": {"none": {}, "kd": {"temperature": {"uniform": [1, 8]}}}}}})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study.create(url, "s", spec)
    config = {"width": 32, "train.lr": 0.01, "loss": "kd", "kd.temperature": 4.0, "seed": 3}  # seed: not a parameter
    study.record(url, "s", spec, "aaaa0001", config, {"val_acc": 0.9, "params": 1000, "epoch": 3}, "FINISHED")
    study.record(url, "s", spec, "aaaa0002", {**config, "loss": "none"}, {"val_acc": 0.5, "epoch": 1}, "STOPPED")
    assert study.recorded(url, "s", "aaaa0001") and not study.recorded(url, "s", "aaaa0003")
    finished, stopped = optuna.load_study(study_name="s", storage=url).trials
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.values == [0.9, 1000.0]
    assert finished.params == {"width": 32, "train.lr": 0.01, "loss": "kd", "kd.temperature": 4.0}
    assert finished.distributions["train.lr"] == optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    assert finished.user_attrs == {"kdtune.trial_id": "aaaa0001"}
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.values is None
    assert stopped.params == {"width": 32, "train.lr": 0.01, "loss": "none"}

    # a trial on a node without the sqlite file leaves its outcome to the driver's callback
    assert not study.reachable(f"sqlite:///{tmp_path / 'elsewhere' / 'optuna.db'}") and study.reachable(url)
    assert study.reachable("postgresql://host/optuna")
    ctx = SweepContext(spec_to_dict(spec), "", "", "", optuna_storage=url, optuna_study="s")
    callback = TrackingCallback(ctx, epochs=3, total=1, objective="val_acc", mode="max", out=io.StringIO())
    last = {"epoch": 3, "val_acc": 0.8, "params": 500, "done": True, study.RECORDED_KEY: False}
    callback.on_trial_complete(1, [], NamedTrial(trial_id="aaaa0003", last_result=last, config=config))
    third = optuna.load_study(study_name="s", storage=url).trials[-1]
    assert third.user_attrs == {"kdtune.trial_id": "aaaa0003"} and third.values == [0.8, 500.0]
