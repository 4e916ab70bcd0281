"""The trial path on real MNIST slices: every method trains, the teacher stays frozen, cached
teacher outputs equal live ones, a trial is reproducible and divergence is caught."""
import copy
import math

import pytest
import torch

from kdtune import load_spec
from kdtune.data.resolve import load_splits
from kdtune.distill import METHODS
from kdtune.models.features import classifier_head
from kdtune.space import has_maps, resolve
from kdtune.teacher import compute_targets, get_teacher
from kdtune.trial import SweepData, TeacherTargets, run_trial

# every test here trains the module's teacher first, then students for an epoch or more
pytestmark = pytest.mark.slow
ALL_KEYS = ["attention0", "attention1", "embedding", "logits"]


def make_spec(teacher_cache, mnist_root, **train):
    return load_spec({"name": "t", "data": {"root": str(mnist_root), "val_size": 1000, "train_limit": 6000},
                     "teacher": {"epochs": 1, "cache_dir": str(teacher_cache)},
                     "train": {"epochs": 1, "batch_size": 64, **train}})


@pytest.fixture(scope="module")
def world(teacher_cache, mnist_root):
    spec = make_spec(teacher_cache, mnist_root)
    splits = load_splits(spec.data, spec.seed)
    teacher, info = get_teacher(spec, splits, print)
    targets, live = compute_targets(teacher, splits.train_x, ALL_KEYS, budget_mb=4096)
    assert live == []
    with torch.no_grad():
        head = classifier_head(teacher, teacher(splits.train_x[:2]))  # for SRRL
    return spec, splits, teacher, info, SweepData(splits, targets, teacher, teacher_head=head)


def cases():
    for name, method in sorted(METHODS.items()):
        for arch, width in (("mlp", 128), ("cnn", 8)):
            if has_maps(arch) or not method.needs_conv_student:
                yield name, arch, width


@pytest.mark.parametrize("method,arch,width", list(cases()))
def test_each_method_trains_a_student_one_epoch(world, method, arch, width):
    spec, _, _, info, data = world
    before = {k: v.clone() for k, v in data.teacher.state_dict().items()}
    plan = resolve(spec, {"loss": method, "student.arch": arch, "width": width})
    reports = []
    metrics = run_trial(plan, data, lambda m, get_state: reports.append(m))
    print(f"{method} {arch}{width}: val_acc {metrics['val_acc']:.4f} test_acc {metrics['test_acc']:.4f}")
    assert len(reports) == 1 and not metrics["diverged"]
    assert metrics["val_acc"] > 0.5 and metrics["test_acc"] > 0.5  # chance is 0.1
    assert set(metrics) >= {"loss_ce", "params", "extra_params", "val_acc", "test_acc"}
    assert all(torch.equal(before[k], v) for k, v in data.teacher.state_dict().items())  # frozen teacher


def test_cached_teacher_targets_equal_a_live_forward(world):
    _, splits, teacher, _, data = world
    idx = torch.tensor([5, 17, 1234, 4000])
    cached = TeacherTargets(data, tuple(ALL_KEYS), "cpu")
    live = TeacherTargets(SweepData(splits, {}, teacher), tuple(ALL_KEYS), "cpu")
    assert live.live == ALL_KEYS and cached.live == []
    got, expected = cached(idx, splits.train_x[idx]), live(idx, splits.train_x[idx])
    assert live.live_batches == 1 and cached.live_batches == 0
    for key in ALL_KEYS:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_targets_over_the_budget_are_left_live(world):
    _, splits, teacher, _, _ = world
    cached, live = compute_targets(teacher, splits.train_x[:100], ["logits", "attention0"], budget_mb=0.1)
    assert list(cached) == ["logits"] and live == ["attention0"]  # 4 kB of logits; 270 kB of 26x26 maps


def test_same_plan_same_seed_same_metrics(world):
    spec, *_, data = world
    plan = resolve(spec, {"loss": "kd", "width": 32, "kd.temperature": 3.0})
    first = run_trial(plan, data, lambda m, g: None)
    second = run_trial(plan, data, lambda m, g: None)
    for key in ("val_acc", "val_loss", "test_acc", "loss_ce", "loss_kd"):
        assert first[key] == second[key]
    other = run_trial(resolve(spec, {"loss": "kd", "width": 32, "kd.temperature": 3.0, "seed": 7}), data, lambda m, g: None)
    assert other["loss_kd"] != first["loss_kd"]


def test_a_diverging_trial_reports_diverged_and_stops(world, teacher_cache, mnist_root):
    *_, data = world
    spec = make_spec(teacher_cache, mnist_root, optimizer="sgd", lr=1e12, epochs=3)
    reports = []
    metrics = run_trial(resolve(spec, {"loss": "none"}), data, lambda m, g: reports.append((m, g)))
    assert metrics["diverged"] and math.isnan(metrics["val_acc"]) and metrics["done"]
    assert len(reports) == 1 and reports[0][1] is None  # no checkpoint of a diverged model


def test_checkpoint_state_resumes_to_the_same_result(world, teacher_cache, mnist_root):
    *_, data = world
    spec = make_spec(teacher_cache, mnist_root, epochs=2, checkpoint_every=1)
    plan = resolve(spec, {"loss": "crd", "width": 16})
    states = []
    straight = run_trial(plan, data, lambda m, get_state: states.append(copy.deepcopy(get_state())))
    resumed = run_trial(plan, data, lambda m, g: None, state=states[0])
    assert resumed["epoch"] == 2
    assert resumed["val_acc"] == straight["val_acc"] and resumed["loss_crd"] == straight["loss_crd"]


def test_sweep_data_pickles_through_numpy_and_back(world):
    """Ray ships SweepData to trials; it travels as numpy arrays (mapped from the object store
    without a copy) and arrives as the same tensors."""
    import pickle

    *_, data = world
    names = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    state = data.__getstate__()
    shipped = [getattr(state["splits"], n) for n in names] + list(state["targets"].values())
    assert all(type(a).__name__ == "ndarray" for a in shipped)
    back = pickle.loads(pickle.dumps(data, protocol=5))
    for name in names:
        assert torch.equal(getattr(back.splits, name), getattr(data.splits, name))
    assert back.splits.num_classes == data.splits.num_classes and type(back.teacher) is type(data.teacher)
    assert set(back.targets) == set(data.targets) and all(torch.equal(back.targets[k], data.targets[k]) for k in data.targets)
