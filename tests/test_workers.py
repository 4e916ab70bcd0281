"""Trials on two data-parallel workers (Ray Train, gloo, 1 CPU each) inside one real Tune sweep
(shared by the tests below), a checkpoint of it resuming, gradient accumulation, batch norm over
the global batch, and the streamed path's shards, on MNIST slices."""
import os
import shutil
from pathlib import Path

import pytest
import ray
import torch
import torch.multiprocessing as mp
from mlflow import MlflowClient
from torch.utils.data import TensorDataset

import kdtune
from kdtune import load_spec
from kdtune.cluster import init_ray
from kdtune.data.resolve import load_splits
from kdtune.data.stream import Stream
from kdtune.distributed import TrialWorkers
from kdtune.models.mnist import StudentMLP
from kdtune.runner import prepare, with_objects
from kdtune.space import parse_space, resolve
from kdtune.teacher import compute_targets, get_teacher
from kdtune.trial import SweepData, run_trial
from kdtune.tuning import STATE_FILE

from ddp_ranks import bn_model, bn_rank  # a light module: each spawned rank imports it

SPEC = Path(__file__).resolve().parents[1] / "search_spaces" / "mnist.yaml"

TRAIN = 1000  # training examples: 1200 minus val_size, an even number of batches of 2 x 25


def small_spec(mnist_root, teacher_cache, **keys):
    base = {"name": "workers", "deploy": {"timing_seconds": 0.3}, "seed": 1, "data": {"root": str(mnist_root), "train_limit": 1200, "val_size": 200, "test_limit": 200},
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
        "baselines": False, "confirm_seeds": 0}, train={"epochs": 2, "checkpoint_every": 1})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SEEN, str(out / "seen"))
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's own: samples within a short trial
        result = kdtune.run(spec, student=recording_mlp, results_dir=out / "results",
                            tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return result, out


@pytest.mark.slow
def test_each_method_trains_on_two_workers_with_disjoint_shards(sweep):
    result, out = sweep
    trials = result.trials
    assert result.status == "FINISHED" and (trials["status"] == "FINISHED").all()
    assert set(trials["loss"]) == {"kd", "crd", "fitnet"}
    assert (trials["val_acc"] > 0.2).all()  # chance is 0.1
    seen = [path.read_text().split() for path in (out / "seen").glob("*.txt")]
    assert len(seen) == 2 * len(trials)  # two worker processes trained each trial
    assert all(len(rows) == 2 * TRAIN // 2 for rows in seen)  # half the set in each of 2 epochs
    for epoch in range(2):
        shards = {frozenset(rows[epoch * TRAIN // 2:(epoch + 1) * TRAIN // 2]) for rows in seen}
        first, second = shards  # the same seed: every trial's rank 0 (and rank 1) had the same shard
        assert len(first) == len(second) == TRAIN // 2 and len(first | second) == TRAIN


@pytest.mark.slow
def test_one_mlflow_run_per_trial_with_its_epochs(sweep):
    result, out = sweep
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(r.info.run_id for r in runs) == sorted(result.trials["mlflow_run_id"])
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["train.effective_batch_size"] == "50"  # 25 a worker x 2 workers
        nodes = {key.split("/")[1] for key in run.data.metrics if key.count("/") == 2 and key.startswith("system/")}
        assert nodes == {result.trials.set_index("mlflow_run_id").loc[run.info.run_id, "node_id"]}  # the workers' node
        assert "system/cpu_utilization_percentage" in run.data.metrics  # the trial's own process
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2] and history[-1].value == pytest.approx(
            result.trials.set_index("mlflow_run_id").loc[run.info.run_id, "val_acc"])


@pytest.fixture(scope="module")
def data(mnist_root, teacher_cache):
    spec = small_spec(mnist_root, teacher_cache)
    splits = load_splits(spec.data, spec.seed)
    teacher, _ = get_teacher(spec, splits, print)
    targets, _ = compute_targets(teacher, splits.train_x, ["logits", "embedding"], budget_mb=64)
    return SweepData(splits, targets, teacher)


@pytest.mark.slow
def test_a_two_worker_checkpoint_of_the_sweep_resumes_to_the_same_epoch(sweep, data, mnist_root, teacher_cache):
    """The CRD trial's epoch-1 checkpoint, resumed on two new workers, gives the sweep's epoch 2."""
    result, out = sweep
    states = [torch.load(path, weights_only=False) for path in sorted((out / "results").rglob(STATE_FILE))]
    state = next(s for s in states if s["epoch"] == 1 and "bank_s" in s["distiller"])
    assert state["distiller"]["bank_s"].shape == (TRAIN, 128)
    spec = small_spec(mnist_root, teacher_cache, train={"epochs": 2, "checkpoint_every": 1})
    plan = resolve(spec, {"loss": "crd", "crd.nce_k": 64})
    temp_dir = init_ray(None)
    try:
        resumed = []
        TrialWorkers(ray.put(data), 2, 1, 0).train(plan, lambda m, g: resumed.append(m), state, str(out / "resumed"))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [m["epoch"] for m in resumed] == [2]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for key in ("val_acc", "val_loss", "loss_ce", "loss_crd"):
        swept = client.get_metric_history(state["mlflow_run_id"], key)
        assert [m.step for m in swept] == [1, 2] and resumed[0][key] == pytest.approx(swept[-1].value, rel=1e-6)


@pytest.mark.slow
def test_a_streamed_trial_trains_on_two_workers_with_disjoint_shards(tmp_path, mnist_root, teacher_cache, monkeypatch):
    """data.resident: false: each worker reads its share of the epoch through its own DataLoader, and
    the teacher's outputs from the files the sweep wrote once."""
    spec = with_objects(small_spec(mnist_root, teacher_cache, data={"resident": False, "workers": 0}), None,
                        recording_mlp, None)
    data, _, info = prepare(spec, parse_space(spec), student=recording_mlp, outputs_dir=tmp_path / "outputs")
    assert data.stream is not None and info["path"] == "streamed"
    (tmp_path / "seen").mkdir()
    monkeypatch.setenv(SEEN, str(tmp_path / "seen"))  # before Ray starts: its workers inherit it, and
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)  # import recording_mlp
    temp_dir = init_ray(None)
    try:
        reports = []
        TrialWorkers(ray.put(data), 2, 1, 0).train(resolve(spec, {"loss": "kd"}), lambda m, g: reports.append(m), None,
                                                   str(tmp_path / "trial"))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [m["epoch"] for m in reports] == [1] and reports[0]["val_acc"] > 0.2  # chance is 0.1
    assert reports[0]["teacher_passes"] == 0  # the targets came from disk
    first, second = (frozenset(path.read_text().split()) for path in (tmp_path / "seen").glob("*.txt"))
    assert len(first) == len(second) == TRAIN // 2 and len(first | second) == TRAIN


@pytest.mark.slow
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


@pytest.mark.slow
def test_more_workers_than_the_cluster_holds_exits_2_naming_the_key(tmp_path, run_cli):
    done = run_cli([SPEC, "--smoke", "--set", "resources.workers=64"], cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr[done.stderr.index("resources.workers"):]
    assert "64 workers" in error and "node(s) with" in error and " CPU" in error  # the cluster's resources
    assert "teacher:" not in done.stdout + done.stderr and "data:" not in done.stdout + done.stderr  # before both
    assert not (tmp_path / "results" / "mnist-kd").exists()


@pytest.mark.slow
def test_batch_norm_over_two_ranks_is_batch_norm_over_their_whole_batch(tmp_path):
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    mp.spawn(bn_rank, args=(x, str(tmp_path)), nprocs=2)
    whole = bn_model()
    whole(x).square().mean().backward()
    for rank in range(2):
        grads, state = torch.load(tmp_path / f"{rank}.pt")
        for key, param in whole.named_parameters():
            torch.testing.assert_close(grads[key], param.grad, rtol=1e-5, atol=1e-6)
        for key, value in whole.state_dict().items():  # running mean and (unbiased) variance of all 8
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    assert whole[1].num_batches_tracked == 1 and not torch.allclose(whole[1].running_var, torch.ones(4))


def test_streamed_epoch_is_split_between_ranks_without_overlap():
    """Each rank's loader reads its own share of the epoch's seeded order; together, the epoch
    (101 samples: one index repeats to even the shares)."""
    train = TensorDataset(torch.zeros(101, 1, 2, 2), torch.zeros(101, dtype=torch.long))
    stream = Stream(train, {}, train)
    for epoch in (0, 1):
        shares = [torch.cat([idx for _, _, idx in stream.train_loader(10, seed=3, epoch=epoch, rank=rank, world=2)])
                  for rank in range(2)]
        assert [len(s) for s in shares] == [51, 51]
        assert len(set(shares[0].tolist()) & set(shares[1].tolist())) == 1
        assert set(torch.cat(shares).tolist()) == set(range(101))
        again = torch.cat([idx for _, _, idx in stream.train_loader(10, seed=3, epoch=epoch, rank=0, world=2)])
        assert torch.equal(again, shares[0])  # a seeded order: a resumed epoch reads the same share
    assert not torch.equal(shares[0], torch.cat([idx for _, _, idx in stream.train_loader(10, 3, 0, rank=0, world=2)]))
