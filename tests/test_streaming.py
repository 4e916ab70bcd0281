"""Streamed data: a dataset on disk read in `__getitem__` with the user's random transform, run
by the trial every epoch; DataLoaders given to kdtune.run; the teacher's outputs on disk
(fp16, and top-k within its stated error) read by sample index instead of a teacher forward."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdtune
from kdtune.data.resolve import load_splits
from kdtune.runner import prepare
from kdtune.space import parse_space, resolve
from kdtune.teacher import FORWARD_PASSES
from kdtune.trial import run_trial

TRAIN, TEST, VAL = 600, 200, 100
REPO = Path(__file__).resolve().parents[1]


class DiskDigits(Dataset):
    """uint8 images in a .npy file, opened memory-mapped on first read, normalised in
    `__getitem__`; with `shift`, a random translation by up to that many pixels (the user's own
    random transform, drawn from torch's global RNG). Counts its reads by index."""

    def __init__(self, images: str, labels: str, shift: int = 0):
        self.images, self.labels, self.shift = images, labels, shift
        self.targets = np.load(labels)
        self.reads: Counter = Counter()
        self._x = None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        if self._x is None:
            self._x = np.load(self.images, mmap_mode="r")
        self.reads[i] += 1
        x = (torch.from_numpy(np.array(self._x[i])).float().div(255) - 0.1307).div(0.3081)[None]
        if self.shift:
            dy, dx = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            x = torch.roll(x, (dy, dx), dims=(1, 2))
        return x, int(self.targets[i])


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, mnist_root):
    """A slice of MNIST written as uint8 .npy files: (train images, train labels, test ...) paths."""
    spec = kdtune.load_spec({"name": "d", "data": {"root": str(mnist_root), "val_size": 1, "train_limit": TRAIN + 1,
                                                   "test_limit": TEST}})
    s = load_splits(spec.data, 0)
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for name, x, y in (("train", s.train_x[:TRAIN], s.train_y[:TRAIN]), ("test", s.test_x, s.test_y)):
        raw = (x[:, 0] * 0.3081 + 0.1307).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
        np.save(folder / f"{name}_x.npy", raw)
        np.save(folder / f"{name}_y.npy", y.numpy())
        paths += [str(folder / f"{name}_x.npy"), str(folder / f"{name}_y.npy")]
    return paths


def teacher_net() -> nn.Module:
    """A small untrained teacher: outputs are what is compared, not its accuracy."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 10))


def make_spec(**data):
    return kdtune.load_spec({
        "name": "stream", "seed": 3, "data": {"val_size": VAL, **data},
        "train": {"epochs": 2, "batch_size": 50, "lr": 0.01},
        "search": {"space": {"width": 16, "loss": {"kd": {}}}, "num_samples": 1, "confirm_seeds": 0}},
        overrides={"teacher.arch": "python:teacher_net", "data.dataset": "python:data"})


def test_random_transform_runs_every_epoch_and_a_seed_repeats_the_trial(on_disk, tmp_path):
    train, test = DiskDigits(*on_disk[:2], shift=2), DiskDigits(*on_disk[2:])
    spec = make_spec()
    space = parse_space(spec)
    data, teacher_info, data_info = prepare(spec, space, teacher_net(), None, (train, test), outputs_dir=tmp_path)
    assert data_info["path"] == "streamed" and "random transform" in data_info["reason"]
    assert teacher_info["cache"] == "live" and "random transform" in teacher_info["cache_reason"]
    assert data.outputs is None and data.teacher is not None
    train_idx = data.stream.train.indices
    assert len(train_idx) == TRAIN - VAL
    runs = []
    for _ in range(2):
        train.reads.clear()
        reports = []
        runs.append(run_trial(resolve(spec, {"loss": "kd"}), data, lambda m, s: reports.append(m)))
        assert [train.reads[i] for i in train_idx] == [2] * len(train_idx)  # the transform ran every epoch
        assert len(reports) == 2 and reports[-1]["teacher_live_batches"] == 20  # 500 images / 50 a batch, twice
    first, second = ({k: v for k, v in r.items() if k != "epoch_seconds"} for r in runs)
    assert first == second
    assert 0 < first["val_acc"] <= 1 and "test_acc" in first


def test_disk_outputs_equal_the_live_teacher_and_no_trial_runs_it(on_disk, tmp_path):
    train, test = DiskDigits(*on_disk[:2]), DiskDigits(*on_disk[2:])
    teacher = teacher_net()
    spec = make_spec(resident=False)
    data, info, data_info = prepare(spec, parse_space(spec), teacher, None, (train, test), outputs_dir=tmp_path / "full")
    assert data_info == {"path": "streamed", "reason": "data.resident: false", "workers": 0, "random_transform": False}
    assert info["cache"] == "outputs" and info["cached_targets"] == ["logits"] and data.teacher is None
    assert list(np.load(tmp_path / "full" / "logits.values.npy", mmap_mode="r").shape) == [TRAIN - VAL, 10]
    idx = torch.tensor([0, 7, 3, 499])
    x = torch.stack([data.stream.train[i][0] for i in idx.tolist()])
    with torch.no_grad():
        live = teacher(x)
    stored = data.outputs.read(["logits"], idx, "cpu")["logits"]
    assert torch.allclose(stored, live, rtol=2 ** -10, atol=1e-4)  # fp16: 11 significant bits
    reports = []
    metrics = run_trial(resolve(spec, {"loss": "kd"}), data, lambda m, s: reports.append(m))
    assert metrics["teacher_live_batches"] == 0 and metrics["teacher_passes"] == 0

    k = 3
    top, *_ = prepare(kdtune.load_spec(spec, {"teacher.topk": k}), parse_space(spec), teacher, None, (train, test),
                      outputs_dir=tmp_path / "top")
    assert top.outputs.topk == k and (tmp_path / "top" / "logits.indices.npy").is_file()
    read = top.outputs.read(["logits"], idx, "cpu")["logits"]
    kept = live.topk(k, dim=1)
    assert torch.equal(read.topk(k, dim=1).indices, kept.indices)
    assert torch.allclose(read.gather(1, kept.indices), kept.values, rtol=2 ** -10, atol=1e-4)
    for temperature in (1.0, 4.0):  # the stated bound: TV distance <= the softmax mass outside the top k
        p, q = F.softmax(live / temperature, 1), F.softmax(read / temperature, 1)
        tail = 1 - p.gather(1, kept.indices).sum(1)
        assert ((p - q).abs().sum(1) / 2 <= tail + 2e-3).all()
        assert (tail > 0.01).all()  # the bound is tested where it is not trivially met


class Unlabelled(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(1, 28, 28)


@pytest.mark.slow
def test_dataloaders_given_to_kdtune_run(on_disk, tmp_path, teacher_cache):
    full = DiskDigits(*on_disk[:2])
    first = torch.utils.data.Subset(full, range(400))
    val_a, val_b = (torch.utils.data.Subset(DiskDigits(*on_disk[2:]), r) for r in (range(0, 100), range(100, 200)))
    test = DiskDigits(*on_disk[2:])
    loaders = {"train": DataLoader(first, batch_size=32), "test": DataLoader(test, batch_size=64),
               "val": {"a": DataLoader(val_a, batch_size=64), "b": DataLoader(val_b, batch_size=64)}}
    spec = {"name": "loaders", "seed": 0, "deploy": {"timing_seconds": 0.3}, "data": {"workers": 1, "num_classes": 10},
            "teacher": {"cache_dir": str(teacher_cache)}, "train": {"epochs": 1, "batch_size": 50},
            "search": {"space": {"width": 16, "loss": {"kd": {}}}, "num_samples": 1, "confirm_seeds": 0}}
    before = FORWARD_PASSES["train"]  # the process's count: other tests' preparations add to it
    result = kdtune.run(spec, teacher=teacher_net(), data=loaders, results_dir=tmp_path / "results",
                        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.status == "FINISHED" and (result.trials["status"] == "FINISHED").all()
    summary = json.loads((result.results_dir / "summary.json").read_text())
    assert summary["data"]["path"] == "streamed" and summary["data"]["reason"] == "DataLoaders given"
    assert summary["teacher"]["cache"] == "outputs" and summary["teacher_forward_passes"]["train"] == before + 1
    run = kdtune.tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.trials["mlflow_run_id"][0])
    assert run.data.metrics["val_acc"] == run.data.metrics["val_acc_a"] and "val_acc_b" in run.data.metrics
    assert run.data.metrics["teacher_live_batches"] == 0


@pytest.mark.slow
def test_imagenet_spec_smoke_on_a_tiny_image_folder(tmp_path, run_cli):
    """search_spaces/imagenet.yaml end to end with --smoke: PNG class folders and a ResNet-50
    checkpoint written here, 32-pixel crops to keep it fast."""
    from PIL import Image
    from torchvision.models import get_model

    rng = np.random.default_rng(0)
    for part, count in (("train", 20), ("val", 6)):
        for c in range(3):
            folder = tmp_path / "imagenet" / part / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(count):  # each class its own colour, plus noise
                pixels = np.clip(rng.normal(60 + 70 * c, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    torch.save(get_model("resnet50", num_classes=3).state_dict(), tmp_path / "resnet50.pt")
    done = run_cli([REPO / "search_spaces" / "imagenet.yaml", "--smoke", "--set", f"data.root={tmp_path / 'imagenet'}",
                    "--set", f"teacher.checkpoint={tmp_path / 'resnet50.pt'}", "--set", "data.kwargs.size=32",
                    "--set", "search.num_samples=1", "--set", "search.baselines=false", "--set", "search.confirm_seeds=0"],
                   tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "imagenet" / "summary.json").read_text())
    assert summary["data"]["path"] == "streamed" and summary["data"]["random_transform"] is True
    assert summary["teacher"]["cache"] == "live" and summary["teacher"]["source"] == "checkpoint"
    trials = pd.read_csv(tmp_path / "results" / "imagenet" / "trials.csv")
    assert len(trials) == 1 and (trials["status"] == "FINISHED").all()
    assert set(trials["student.arch"]) <= {"torchvision:resnet18", "torchvision:resnet34"}
    assert trials["val_top5"].between(trials["val_acc"], 1).all() and trials["test_top5"].notna().all()  # top1_top5
    assert "data: streamed (DataLoaders given)" in done.stdout + done.stderr
