"""Bring your own teacher, student and data: import paths, torchvision models with named
feature nodes, the Python API with objects defined right here, and every bad input stopping
with exit 2, its key named and no traceback, before Ray starts."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_exit_2_naming
from mlflow.tracking import MlflowClient
from torch import nn

import kdtune
from kdtune.data.resolve import load_splits
from kdtune.models import count_params
from kdtune.models.resolve import build_model
from kdtune.space import parse_space, resolve
from kdtune.sweep import main as cli_main
from kdtune.teacher import compute_targets
from kdtune.trial import SweepData, run_trial
from kdtune.preflight import check_models

REPO = Path(__file__).resolve().parents[1]


# --- objects a notebook would define: a student family, a teacher, a dataset -------------------------

class DigitNet(nn.Module):
    """A student family of this test module: conv, global average pool, linear; `width` channels."""

    def __init__(self, num_classes: int, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


def make_student(num_classes, width=4):
    return DigitNet(num_classes, width)


class Digits(torch.utils.data.Dataset):
    """A map-style dataset of (image tensor, int label), as users bring them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.fixture(scope="module")
def digits(mnist_root):
    spec = kdtune.load_spec({"name": "d", "data": {"root": str(mnist_root), "val_size": 100, "train_limit": 1100,
                                                   "test_limit": 300}})
    s = load_splits(spec.data, 0)
    return Digits(torch.cat([s.train_x, s.val_x]), torch.cat([s.train_y, s.val_y])), Digits(s.test_x, s.test_y)


def trained_teacher(train: Digits) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), 0.01)
    for start in range(0, len(train), 100):
        x, y = train.x[start:start + 100], train.y[start:start + 100]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_python_api_with_objects_defined_in_the_test(tmp_path, digits, teacher_cache):
    teacher = trained_teacher(digits[0])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = kdtune.load_spec({
        "name": "api", "deploy": {"timing_seconds": 0.3}, "data": {"val_size": 200},
        "teacher": {"features": {"embedding": "5"}, "cache_dir": str(teacher_cache)},  # the ReLU after Linear(128, 32)
        "student": {"features": {"embedding": "flatten"}},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "search": {"space": {"width": {"choice": [4, 8]}, "loss": {"none": {}, "kd": {}, "fitnet": {}}},
                   "num_samples": 2, "confirm_seeds": 0, "sampler": "random"}}, overrides={"search.num_samples": 3})
    result = kdtune.run(spec, teacher=teacher, student=make_student, data=digits,
                        results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # used as is, never retrained
    assert result.status == "FINISHED" and result.summary["teacher"]["source"] == "given"
    trials = result.trials
    assert len(trials) == 3 + 2 and (trials["status"] == "FINISHED").all()
    assert set(trials["student.arch"]) == {"python:make_student"}
    assert trials.set_index("width")["params"].to_dict() == {w: count_params(DigitNet(10, w)) for w in (4, 8)}
    written = pd.read_csv(result.results_dir / "trials.csv")
    assert list(written["trial_id"]) == list(trials["trial_id"]) and list(written.columns) == list(trials.columns)
    assert written["val_acc"].tolist() == pytest.approx(trials["val_acc"].tolist())
    assert not result.front.empty and set(result.front["trial_id"]) <= set(trials["trial_id"])
    assert "gain" in result.kd_gain.columns or "test_gain" in result.kd_gain.columns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.experiment_id == result.experiment_id and parent.info.status == "FINISHED"
    # as the CLI: the report written at the sweep's end, the Optuna study named, nothing missing from MLflow
    assert result.mlflow_missing == [] and (result.report_dir / "report.html").is_file()
    assert result.summary["optuna"]["study_name"] == f"api-{result.parent_run_id}"
    # the best front student is an MLflow model that a process without this module loads and runs
    best = result.front.sort_values("val_acc").iloc[-1]
    model_uri = client.get_run(best["mlflow_run_id"]).data.tags["kdtune.model_uri"]
    torch.save((digits[1].x, digits[1].y), tmp_path / "test.pt")
    code = ("import sys, mlflow.pytorch, torch; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pytorch.load_model(sys.argv[2]); x, y = torch.load(sys.argv[3]); "
            "print((m(x).argmax(1) == y).sum().item() / len(y))")
    done = subprocess.run([sys.executable, "-c", code, uri, model_uri, str(tmp_path / "test.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) == pytest.approx(best["test_acc"], abs=1e-9)


@pytest.mark.slow
def test_import_paths_through_the_cli(tmp_path, run_cli):
    """examples/custom/digits.py by import path: teacher, student family and dataset factory."""
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env_path]))
    try:
        done = run_cli([REPO / "search_spaces" / "custom.yaml", "--smoke", "--set", "search.confirm_seeds=0",
                        "--set", "search.num_samples=2", "--set", "teacher.epochs=1", "--set", "train.epochs=1",
                        "--set", "data.train_limit=5000"], tmp_path)
    finally:
        os.environ.pop("PYTHONPATH") if env_path is None else os.environ.__setitem__("PYTHONPATH", env_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "results" / "custom-digits" / "trials.csv")
    assert len(trials) == 2 + 3 and (trials["status"] == "FINISHED").all()
    assert set(trials["student.arch"]) == {"examples.custom.digits:TinyNet"}
    assert (trials["val_acc"] > 0.15).all()


# --- torchvision models: features at named nodes feed every feature method ---------------------------

TV = {"name": "tv", "data": {"val_size": 64},
      "teacher": {"arch": "torchvision:resnet18", "features": {"embedding": "flatten", "maps": ["layer3", "layer4"]}},
      "student": {"arch": "torchvision:mobilenet_v2", "kwargs": {"width_mult": 0.25},
                  "features": {"embedding": "flatten", "maps": ["features.13", "features.18"]}},
      "train": {"epochs": 1, "batch_size": 32, "lr": 0.003},
      "search": {"space": {"loss": {"none": {}, "fitnet": {}, "rkd": {}, "crd": {"nce_k": 64}, "at": {}}}}}


@pytest.fixture(scope="module")
def rgb(mnist_root):
    """32x32 RGB images: real MNIST digits padded and repeated over 3 channels, as a user's dataset."""
    sys.path.insert(0, str(REPO))
    try:
        from examples.custom.digits import rgb32
    finally:
        sys.path.remove(str(REPO))
    train, test = rgb32(str(mnist_root), limit=320)
    spec = kdtune.load_spec(TV, {"data.dataset": "python:data"})
    splits = load_splits(spec.data, 0, (train, test))
    teacher = build_model(spec.teacher, splits.in_shape, splits.num_classes, "teacher").eval()
    return spec, splits, teacher


@pytest.mark.slow
@pytest.mark.parametrize("method, term", [("fitnet", "loss_hint"), ("rkd", "loss_rkd_dist"), ("crd", "loss_crd"),
                                          ("at", "loss_at")])
def test_torchvision_teacher_and_student_features_feed_the_methods(rgb, method, term):
    spec, splits, teacher = rgb
    assert splits.in_shape == (3, 32, 32)
    check_models(spec, parse_space(spec), splits, teacher)
    targets, live = compute_targets(teacher, splits.train_x, ["embedding", "logits", "attention0", "attention1"], 1e6)
    assert live == [] and targets["embedding"].shape == (len(splits.train_y), 512)  # resnet18's flatten node
    plan = resolve(spec, {"loss": method})
    reports = []
    metrics = run_trial(plan, SweepData(splits, targets), lambda m, get_state: reports.append(m))
    assert metrics["params"] == count_params(__import__("torchvision").models.mobilenet_v2(num_classes=10,
                                                                                            width_mult=0.25))
    assert term in metrics and torch.isfinite(torch.tensor(metrics[term])) and metrics[term] > 0
    assert 0 <= metrics["test_acc"] <= 1


# --- bad input: exit 2, the key named, no traceback, Ray never started ---------------------------------

ZOO = '''
import torch
from torch import nn

class Good(nn.Module):
    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))

def raises(num_classes):
    raise RuntimeError("no GPU here, said the factory")

def not_a_module(num_classes):
    return 42

def wrong_output(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes + 1))

def pairless():
    return [1, 2, 3]

def bad_items():
    return [(torch.zeros(1, 28, 28), "seven")] * 4, [(torch.zeros(1, 28, 28), 7)] * 4

def loaders_without_labels():
    from torch.utils.data import DataLoader
    images = [torch.zeros(1, 28, 28)] * 8
    return {"train": DataLoader(images, batch_size=4), "test": DataLoader(images, batch_size=4)}
'''

BAD = {  # id: (--set overrides, key, fragments of the message)
    "module_does_not_import": (["student.arch=kdtune_no_such_module:Net"], "student.arch",
                               ["cannot import module 'kdtune_no_such_module'", "ModuleNotFoundError"]),
    "missing_factory": (["student.arch=byo_zoo:Missing"], "student.arch", ["has no attribute 'Missing'"]),
    "factory_raises": (["student.arch=byo_zoo:raises"], "student.arch",
                       ["raised RuntimeError: no GPU here, said the factory"]),
    "not_a_module": (["student.arch=byo_zoo:not_a_module"], "student.arch", ["returned a int, not a torch.nn.Module"]),
    "unknown_torchvision_model": (["student.arch=torchvision:resnet181"], "student.arch",
                                  ["unknown torchvision model 'resnet181'", "close names: resnet18"]),
    "wrong_output_shape": (["student.arch=byo_zoo:wrong_output"], "student.arch",
                           ["returned output (2, 11)", "expected [batch, num_classes] = [2, 10]"]),
    "unknown_feature_node": (["student.arch=byo_zoo:Good", "student.features={embedding: avgpool}"],
                             "student.features.embedding", ["no node 'avgpool' in Good", "its nodes: x, conv"]),
    "method_needs_unnamed_feature": (["student.arch=byo_zoo:Good", "search.space.loss={none: {}, fitnet: {}}"],
                                     "search.space.loss.fitnet",
                                     ["needs the student's embedding", "add student.features.embedding"]),
    "checkpoint_does_not_fit": (["teacher.checkpoint=CHECKPOINT"], "teacher.checkpoint",
                                ["does not fit", "missing keys: conv1.weight"]),
    "dataset_not_a_pair": (["data.dataset=byo_zoo:pairless"], "data.dataset",
                           ["byo_zoo:pairless() gave a list; expected a (train, test) pair of datasets"]),
    "dataset_items_not_tensor_int": (["data.dataset=byo_zoo:bad_items", "data.val_size=1"], "data.dataset",
                                     ["train[0] is (Tensor, str); each item must be (image tensor, int label)"]),
    "loader_yields_no_labels": (["data.dataset=byo_zoo:loaders_without_labels"], "data.dataset",
                                ["the train DataLoader yields Tensor; each batch must be (inputs, labels) tensors"]),
    "resident_not_auto_or_bool": (["data.resident=sometimes"], "data.resident",
                                  ["must be auto, true or false (got 'sometimes')"]),
    "workers_negative": (["data.workers=-1"], "data.workers", ["greater than or equal to 0"]),
}


# the cases that get as far as building the teacher or the student (after the data) take seconds each
BUILDS_A_MODEL = {"module_does_not_import", "missing_factory", "factory_raises", "not_a_module", "wrong_output_shape",
                  "unknown_feature_node", "method_needs_unnamed_feature", "checkpoint_does_not_fit"}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in BUILDS_A_MODEL else case
                                  for case in sorted(BAD)])
def test_bad_input_exits_2_naming_the_key(case, tmp_path, monkeypatch, capsys, mnist_root, teacher_cache):
    import ray

    (tmp_path / "byo_zoo.py").write_text(textwrap.dedent(ZOO))
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Linear(3, 3)).state_dict(), checkpoint)
    overrides, key, fragments = BAD[case]
    spec = REPO / "search_spaces" / "mnist-mlp.yaml"
    sets = [f"data.root={mnist_root}", f"teacher.cache_dir={teacher_cache}", "data.train_limit=1200",
            "data.val_size=200", "teacher.epochs=1", "search.space.loss={none: {}, kd: {}}", "search.space.width=4",
            "student.arch=mlp", *[o.replace("CHECKPOINT", str(checkpoint)) for o in overrides]]
    status = cli_main([str(spec), "--results-dir", str(tmp_path / "results"),
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *[a for s in sets for a in ("--set", s)]])
    assert_exit_2_naming(status, capsys.readouterr().err, key, fragments)
    assert not ray.is_initialized()
