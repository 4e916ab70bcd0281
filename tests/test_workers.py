"""Trials on two data-parallel workers (Ray Train, gloo, 1 CPU each) inside a real Tune sweep,
their checkpoints resuming, and gradient accumulation, on MNIST slices."""
import copy
import os
import shutil
from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient

import kdtune
from kdtune import load_spec
from kdtune.cluster import init_ray
from kdtune.data.resolve import load_splits
from kdtune.distributed import TrialWorkers
from kdtune.models.mnist import StudentMLP
from kdtune.space import resolve
from kdtune.teacher import compute_targets, get_teacher
from kdtune.trial import SweepData, run_trial

SPEC = Path(__file__).resolve().parents[1] / "search_spaces" / "mnist.yaml"

TRAIN = 1000  # training examples: 1200 minus val_size, an even number of batches of 2 x 25


def small_spec(mnist_root, teacher_cache, **keys):
    base = {"name": "workers", "seed": 1, "data": {"root": str(mnist_root), "train_limit": 1200, "val_size": 200, "test_limit": 200},
            "teacher": {"epochs": 1, "cache_dir": str(teacher_cache)},
            "student": {"arch": "mlp", "width": 16}, "train": {"epochs": 1, "batch_size": 25, "lr": 0.01},
            "resources": {"cpu": 1, "workers": 2}}
    for section, values in keys.items():
        base[section] = {**base.get(section, {}), **values}
    return load_spec(base)


SEEN = "KDTUNE_TEST_SEEN"  # the folder the workers (started by the sweep's Ray) note their rows in


def _record(module, inputs):
    """Each training batch's rows, as one number a row, in a file of this process's own."""
    if module.training:
        (x,) = inputs
        rows = x.flatten(1) @ torch.linspace(1, 2, x[0].numel())
        with open(Path(os.environ[SEEN]) / f"{os.getpid()}.txt", "a") as out:
            out.writelines(f"{v:.4f}\n" for v in rows.tolist())


def recording_mlp(num_classes, in_shape, width=16):
    """kdtune's MLP student, noting the rows each process trains it on."""
    model = StudentMLP(in_shape, num_classes, width)
    model.register_forward_pre_hook(_record)
    return model


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_root, teacher_cache):
    out = tmp_path_factory.mktemp("workers")
    (out / "seen").mkdir()
    spec = small_spec(mnist_root, teacher_cache, search={
        # seed 1: Optuna's random sampler picks crd, kd, fitnet
        "space": {"loss": {"kd": {}, "crd": {"nce_k": 64}, "fitnet": {"beta": 1}}}, "num_samples": 3, "sampler": "random",
        "baselines": False, "confirm_seeds": 0})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SEEN, str(out / "seen"))
        result = kdtune.run(spec, student=recording_mlp, results_dir=out / "results",
                            tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return result, out


def test_each_method_trains_on_two_workers_with_disjoint_shards(sweep):
    result, out = sweep
    trials = result.trials
    assert result.status == "FINISHED" and (trials["status"] == "FINISHED").all()
    assert set(trials["loss"]) == {"kd", "crd", "fitnet"}
    assert (trials["val_acc"] > 0.2).all()  # chance is 0.1
    shards = [frozenset(path.read_text().split()) for path in (out / "seen").glob("*.txt")]
    assert len(shards) == 2 * len(trials)  # two worker processes trained each trial
    assert all(len(shard) == TRAIN // 2 for shard in shards)
    first, second = set(shards)  # the same seed: every trial's rank 0 (and rank 1) had the same shard
    assert not first & second and len(first | second) == TRAIN


def test_one_mlflow_run_per_trial_with_its_epochs(sweep):
    result, out = sweep
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(r.info.run_id for r in runs) == sorted(result.trials["mlflow_run_id"])
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["train.effective_batch_size"] == "50"  # 25 a worker x 2 workers
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1] and history[0].value == pytest.approx(
            result.trials.set_index("mlflow_run_id").loc[run.info.run_id, "val_acc"])


@pytest.fixture(scope="module")
def data(mnist_root, teacher_cache):
    spec = small_spec(mnist_root, teacher_cache)
    splits = load_splits(spec.data, spec.seed)
    teacher, _ = get_teacher(spec, splits, print)
    targets, _ = compute_targets(teacher, splits.train_x, ["logits", "embedding"], budget_mb=64)
    return SweepData(splits, targets, teacher)


def test_a_two_worker_checkpoint_resumes_to_the_same_result(tmp_path, mnist_root, teacher_cache, data):
    spec = small_spec(mnist_root, teacher_cache, train={"epochs": 2, "checkpoint_every": 1})
    plan = resolve(spec, {"loss": "crd", "crd.nce_k": 64})
    temp_dir = init_ray(None)
    try:
        workers = TrialWorkers(ray.put(data), 2, 1, 0)
        reports, states = [], []

        def report(metrics, get_state):
            reports.append(metrics)
            states.append(copy.deepcopy(get_state()))

        workers.train(plan, report, None, str(tmp_path))
        resumed = []
        workers.train(plan, lambda m, g: resumed.append(m), states[0], str(tmp_path))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [m["epoch"] for m in reports] == [1, 2] and [m["epoch"] for m in resumed] == [2]
    for key in ("val_acc", "val_loss", "loss_ce", "loss_crd"):
        assert resumed[0][key] == reports[1][key]
    assert states[0]["distiller"]["bank_s"].shape == (TRAIN, 128)


def test_two_accumulated_micro_batches_step_as_one_batch_of_twice_the_size(mnist_root, teacher_cache, data):
    """SGD with momentum on a student without batch norm: the same permutation cut in batches of 100,
    or in micro-batches of 50 accumulated two at a time, gives the same weights."""
    def student():
        torch.manual_seed(0)
        return StudentMLP((1, 28, 28), 10, 16)

    def trained(batch_size, accumulate):
        spec = small_spec(mnist_root, teacher_cache, train={"batch_size": batch_size, "accumulate": accumulate,
                                                            "optimizer": "sgd", "lr": 0.1})
        model = student()
        run_trial(resolve(spec, {"loss": "kd"}), data, lambda m, g: None, student=model)
        return model.state_dict()

    whole, accumulated = trained(100, 1), trained(50, 2)
    assert not torch.allclose(whole["fc1.weight"], student().state_dict()["fc1.weight"])
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6)


def test_more_workers_than_the_cluster_holds_exits_2_naming_the_key(tmp_path, run_cli):
    done = run_cli([SPEC, "--smoke", "--set", "resources.workers=64"], cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "resources.workers" in done.stderr and "CPU" in done.stderr
    assert not (tmp_path / "results" / "mnist-kd" / "trials.csv").exists()
