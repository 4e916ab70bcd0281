"""A user's own model whose forward torch.fx cannot trace (it counts samples, notes which process
and rank trained it, and branches on the data): its features are read by forward hooks on the
modules the spec names, equal to those modules' outputs, under deepcopy, torch.compile and
autocast, and feed FitNet, RKD and CRD in one process and on two data-parallel workers; a name
that is not a module exits 2 naming the key; and the teacher cache follows the model's structure."""
import copy
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist
from torch import nn

from kdtune import load_spec
from kdtune.cluster import init_ray
from kdtune.data.resolve import load_splits
from kdtune.distributed import TrialWorkers
from kdtune.models.features import HookFeatures
from kdtune.models.resolve import attach_features
from kdtune.runner import prepare, with_objects
from kdtune.space import parse_space, resolve
from kdtune.spec import FeatureNodes
from kdtune.sweep import main as cli_main
from kdtune.teacher import get_teacher
from kdtune.trial import run_trial

from conftest import REPO, assert_exit_2_naming

NOTES = "KDTUNE_TEST_NOTES"  # the folder the model notes (process, rank) of each training batch in
FEATURES = {"embedding": "embed", "maps": ["body.3", "body.6"]}
TERMS = {"fitnet": "loss_hint", "rkd": "loss_rkd_dist", "crd": "loss_crd"}
POINTS = {"fitnet": {"loss": "fitnet"}, "rkd": {"loss": "rkd"}, "crd": {"loss": "crd", "crd.nce_k": 64}}


class Bookkeeping(nn.Module):
    """A student as users write them while debugging data-parallel training."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.embed = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)
        self.samples = 0

    def forward(self, x):
        self.samples += len(x)
        if self.training and os.environ.get(NOTES):
            rank = dist.get_rank() if dist.is_initialized() else 0
            with open(Path(os.environ[NOTES]) / f"{os.getpid()}.txt", "a") as out:
                out.write(f"{rank}\n")
        if x.abs().sum() == 0:  # a blank batch: control flow on the data, which torch.fx refuses
            return torch.zeros(len(x), self.fc.out_features)
        return self.fc(self.embed(self.body(x)))


def small_spec(mnist_root, teacher_cache, **resources):
    return load_spec({"name": "any-model", "seed": 1,
                      "data": {"root": str(mnist_root), "train_limit": 1200, "val_size": 200, "test_limit": 200},
                      "teacher": {"epochs": 1, "cache_dir": str(teacher_cache)},
                      "student": {"features": FEATURES},
                      "train": {"epochs": 1, "batch_size": 25, "lr": 0.01},
                      "search": {"space": {"loss": {"fitnet": {}, "rkd": {}, "crd": {"nce_k": 64}}}},
                      "resources": {"cpu": 1, **resources}})


def hooked() -> nn.Module:
    torch.manual_seed(0)
    return attach_features(Bookkeeping(), FeatureNodes(**FEATURES), "student")


def test_hook_features_are_the_modules_outputs_and_no_hook_stays():
    model = hooked().eval()
    assert isinstance(model, HookFeatures)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    inner = model.model
    with torch.no_grad():
        out = model(x)
        mid = inner.body[:4](x)
        torch.testing.assert_close(out.maps[0], mid)
        torch.testing.assert_close(out.maps[1], inner.body[4:](mid))
        torch.testing.assert_close(out.embedding, inner.embed(inner.body(x)))
        torch.testing.assert_close(out.logits, inner.fc(out.embedding))
        copied = copy.deepcopy(model)(x)
        torch.testing.assert_close(copied.embedding, out.embedding)
        with torch.autocast("cpu", torch.bfloat16):
            mixed = model(x)
    assert mixed.embedding.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.embedding.float(), out.embedding, rtol=0.05, atol=0.05)
    assert inner.samples == 2 * len(x)  # the user's bookkeeping ran on each forward (the copy counts its own)
    assert all(not m._forward_hooks for m in model.modules())  # a logged (traced) student carries none


@pytest.mark.slow
def test_hook_features_hold_under_torch_compile():
    model = hooked().eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager, compiled = model(x), torch.compile(model)(x)
    torch.testing.assert_close(compiled.embedding, eager.embedding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.maps[1], eager.maps[1], rtol=1e-4, atol=1e-5)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def prepared(mnist_root, teacher_cache):
    spec = with_objects(small_spec(mnist_root, teacher_cache), None, Bookkeeping, None)
    data, _, _ = prepare(spec, parse_space(spec), student=Bookkeeping)
    return spec, data


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TERMS))
def test_the_untraceable_student_distils_by_module_names(prepared, method):
    spec, data = prepared
    metrics = run_trial(resolve(spec, POINTS[method]), data, lambda m, g: None)
    assert torch.isfinite(torch.tensor(metrics[TERMS[method]])) and metrics[TERMS[method]] > 0
    assert metrics["params"] == sum(p.numel() for p in Bookkeeping().parameters())  # the user's model, no wrapper


@pytest.mark.slow
def test_the_untraceable_student_distils_on_two_workers(mnist_root, teacher_cache, tmp_path, monkeypatch):
    spec = with_objects(small_spec(mnist_root, teacher_cache, workers=2), None, Bookkeeping, None)
    data, _, _ = prepare(spec, parse_space(spec), student=Bookkeeping)
    (tmp_path / "notes").mkdir()
    monkeypatch.setenv(NOTES, str(tmp_path / "notes"))  # before Ray starts: its workers inherit it, and
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)  # import Bookkeeping
    temp_dir = init_ray(None)
    try:
        reports = {}
        for method in sorted(TERMS):
            TrialWorkers(ray.put(data), 2, 1, 0).train(resolve(spec, POINTS[method]),
                                                       lambda m, g, method=method: reports.setdefault(method, m),
                                                       None, str(tmp_path / method))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    for method, term in TERMS.items():
        assert reports[method][term] > 0 and 0 <= reports[method]["val_acc"] <= 1
    notes = [path.read_text().split() for path in (tmp_path / "notes").glob("*.txt")]
    # each trial in two processes of its own, one per rank
    assert sorted(rank for rows in notes for rank in set(rows)) == ["0"] * len(TERMS) + ["1"] * len(TERMS)


ZOO = '''
import torch
from torch import nn

class Branchy(nn.Module):
    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.fc = nn.Linear(width, num_classes)
    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))
'''


@pytest.mark.slow
@pytest.mark.parametrize("name, fragments", [
    ("flatten", ["'flatten' is not a module of Branchy", "torch.fx cannot trace it",
                 "control flow", "name a module instead", "its modules are conv, fc"]),
    ("fc.weight", ["close: fc", "its modules are conv, fc"])])
def test_a_node_name_of_an_untraceable_model_exits_2_naming_the_key(name, fragments, tmp_path, monkeypatch, capsys,
                                                                    mnist_root, teacher_cache):
    (tmp_path / "any_zoo.py").write_text(textwrap.dedent(ZOO))
    monkeypatch.syspath_prepend(str(tmp_path))
    sets = [f"data.root={mnist_root}", f"teacher.cache_dir={teacher_cache}", "data.train_limit=1200",
            "data.val_size=200", "teacher.epochs=1", "search.space.loss={none: {}, fitnet: {}}",
            "student.arch=any_zoo:Branchy", f"student.features={{embedding: {name}}}"]
    status = cli_main([str(REPO / "search_spaces" / "mnist-mlp.yaml"), "--results-dir", str(tmp_path / "results"),
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *[a for s in sets for a in ("--set", s)]])
    assert_exit_2_naming(status, capsys.readouterr().err, "student.features.embedding", fragments)
    assert not ray.is_initialized()


TEACHER = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, WIDTH), nn.ReLU(), nn.Linear(WIDTH, num_classes))
    def forward(self, x):
        return self.net(x)
'''


@pytest.mark.slow
def test_the_teacher_cache_follows_the_models_structure(tmp_path, monkeypatch, mnist_root):
    """The teacher class edited under the same import path is trained anew; a cached file that does
    not load is set aside with a note, and the teacher trained again. Never an error."""
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec({"name": "cache", "seed": 1, "student": {"arch": "mlp"},
                      "data": {"root": str(mnist_root), "train_limit": 700, "val_size": 200, "test_limit": 200},
                      "teacher": {"arch": "cache_zoo:Net", "epochs": 1, "cache_dir": str(tmp_path / "cache")}})
    splits = load_splits(spec.data, spec.seed)

    def teacher(width: int, notes: list) -> dict:
        (tmp_path / "cache_zoo.py").write_text(TEACHER.replace("WIDTH", str(width)))
        monkeypatch.delitem(sys.modules, "cache_zoo", raising=False)  # a new session imports the edited class
        return get_teacher(spec, splits, notes.append)[1]

    first, second, notes = teacher(16, []), teacher(24, []), []
    assert first["source"] == second["source"] == "trained" and first["checkpoint"] != second["checkpoint"]
    assert teacher(16, [])["source"] == "cached"
    Path(first["checkpoint"]).write_bytes(b"not a checkpoint")
    again = teacher(16, notes)
    assert again["source"] == "trained" and again["checkpoint"] == first["checkpoint"]
    [note] = [n for n in notes if "set aside" in n]
    assert "does not load" in note and "not a readable PyTorch checkpoint" in note
    [aside] = (tmp_path / "cache" / "teachers").glob("*.unloadable-*.pt")
    assert aside.read_bytes() == b"not a checkpoint" and aside.name in note
    assert teacher(16, [])["source"] == "cached"  # the retrained file replaced it
