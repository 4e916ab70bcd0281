"""The `gapnet` MNIST family and its `gapnet_dense` teacher: sizes from the layer shapes, Features, learning."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdtune.models import MODELS, count_params

RAW = Path(__file__).resolve().parents[1] / "kdtune" / "_data" / "MNIST" / "raw"


def conv_bn(c_in: int, c_out: int) -> int:
    """A dense 3x3 conv without bias, then BN (weight and bias per channel)."""
    return 9 * c_in * c_out + 2 * c_out


def separable_bn(c_in: int, c_out: int) -> int:
    """Depthwise 3x3 (9 per input channel), pointwise 1x1, both without bias, then BN."""
    return 9 * c_in + c_in * c_out + 2 * c_out


def gapnet_params(w: int, classes: int = 10) -> int:
    convs = (conv_bn(1, w) + separable_bn(w, 2 * w) + separable_bn(2 * w, 2 * w) + separable_bn(2 * w, 4 * w)
             + 2 * separable_bn(4 * w, 4 * w))
    return convs + 4 * w * classes + classes


def gapnet_dense_params(w: int, classes: int = 10) -> int:
    convs = (conv_bn(1, w) + conv_bn(w, w) + conv_bn(w, 2 * w) + conv_bn(2 * w, 2 * w)
             + conv_bn(2 * w, 4 * w) + conv_bn(4 * w, 4 * w))
    return convs + 4 * w * classes + classes


@pytest.mark.parametrize("arch, width, params, count", [
    ("gapnet", 3, 1_024, gapnet_params), ("gapnet", 4, 1_546, gapnet_params), ("gapnet", 6, 2_866, gapnet_params),
    ("gapnet", 12, 9_034, gapnet_params), ("gapnet", 32, 53_514, gapnet_params),
    ("gapnet_dense", 16, 72_666, gapnet_dense_params)])
def test_params_at_default_widths(arch, width, params, count):
    model = MODELS[arch](in_shape=(1, 28, 28), num_classes=10, width=width)
    assert count(width) == params
    assert count_params(model) == params


@pytest.mark.parametrize("arch, width", [("gapnet", 6), ("gapnet_dense", 16)])
def test_default_width_and_features(arch, width):
    model = MODELS[arch](in_shape=(1, 28, 28), num_classes=10)
    assert model.has_maps and model.fc.in_features == 4 * width  # the family default width
    model.eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.logits.shape == (5, 10)
    assert out.embedding.shape == (5, 4 * width)
    assert [tuple(m.shape) for m in out.maps] == [(5, c, s, s) for c, s in ((2 * width if arch == "gapnet" else width, 14),
                                                                          (4 * width if arch == "gapnet" else 2 * width, 7),
                                                                          (4 * width, 4))]
    assert isinstance(model.classifier, torch.nn.Linear)
    torch.testing.assert_close(model.classifier(out.embedding), out.logits)


def _idx(name: str) -> np.ndarray:
    with gzip.open(RAW / f"{name}.gz") as f:
        data = f.read()
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def test_short_training_beats_chance():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.tensor(_idx("train-images-idx3-ubyte")[:2500]).float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
    y = torch.tensor(_idx("train-labels-idx1-ubyte")[:2500]).long()
    x_train, y_train, x_held, y_held = x[:2000], y[:2000], x[2000:], y[2000:]
    model = MODELS["gapnet"](in_shape=(1, 28, 28), num_classes=10, width=6)
    epochs, batch = 3, 100
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.03, total_steps=epochs * len(x_train) // batch)
    for _ in range(epochs):
        order = torch.randperm(len(x_train))
        for k in range(0, len(x_train), batch):
            i = order[k:k + batch]
            loss = F.cross_entropy(model(x_train[i]).logits, y_train[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_held).logits.argmax(1) == y_held).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.1


@pytest.mark.slow
def test_the_default_teacher_recipe_trains_and_caches_on_a_slice(tmp_path):
    """The default spec's teacher (gapnet_dense, AdamW one-cycle, shifts of 2 pixels) through kdtune's
    own teacher path on 5,500 images and 3 epochs: it learns, is cached, and the cache is reused."""
    from kdtune import load_spec
    from kdtune.data.resolve import load_splits
    from kdtune.teacher import get_teacher

    spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "mnist.yaml",
                     {"data.train_limit": 6000, "data.val_size": 500, "data.test_limit": 1000, "teacher.epochs": 3,
                      "teacher.cache_dir": str(tmp_path), "data.root": str(tmp_path / "data")})
    splits = load_splits(spec.data, spec.seed)
    lines = []
    trained, facts = get_teacher(spec, splits, lines.append)
    assert facts["source"] == "trained" and facts["params"] == 72_666
    assert facts["recipe"]["augment"]["crop"] == 2 and facts["recipe"]["schedule"]["type"] == "onecycle"
    assert facts["test_acc"] > 0.9, facts["test_acc"]  # chance is 0.1
    cached, again = get_teacher(spec, splits, lines.append)
    assert again["source"] == "cached" and again["checkpoint"] == facts["checkpoint"]
    assert again["test_acc"] == facts["test_acc"]
    for a, b in zip(trained.state_dict().values(), cached.state_dict().values()):
        assert torch.equal(a, b)
