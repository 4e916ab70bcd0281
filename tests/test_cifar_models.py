"""The CIFAR model zoo: parameter counts of the CRD benchmark's nets, Features, every method on them,
and the `python -m kdtune.models` listing.

The published figures are the parameter counts, for 100 classes, of the architectures the CRD
benchmark trains (Tian et al., ICLR 2020), as defined in its code, github.com/HobbitLong/RepDistiller:
models/resnet.py (resnet8 ... resnet110 with filters [16, 16, 32, 64]; resnet8x4 and resnet32x4
with [32, 64, 128, 256]), models/wrn.py (WideResNet(depth, widen_factor)), models/vgg.py
(`vgg8`/`vgg13` are vgg8_bn/vgg13_bn in models/__init__.py's model_dict) and models/mobilenetv2.py
(CRD's "MobileNetV2" is mobile_half: expansion 6, width multiplier 0.5). Each count is also derived
here, layer by layer, from those definitions (`*_params` below), without running kdtune's model code.
"""
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdtune.distill import INPUTS, METHODS, TEACHER_TARGETS
from kdtune.models import MODELS, count_params, create_model
from kdtune.models.base import Features
from kdtune.models.features import classifier_head

ROOT = Path(__file__).resolve().parents[1]
CIFAR = (3, 32, 32)


def conv(c_in: int, c_out: int, k: int = 3, groups: int = 1, bias: bool = False) -> int:
    return k * k * (c_in // groups) * c_out + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def linear(c_in: int, classes: int) -> int:
    return c_in * classes + classes


def resnet_params(depth: int, w: int, stem: int, classes: int = 100) -> int:
    """Post-activation basic blocks; a 1x1 conv-BN shortcut where the channels change."""
    total, c_in = conv(3, stem) + bn(stem), stem
    for c in (w, 2 * w, 4 * w):
        for _ in range((depth - 2) // 6):
            total += conv(c_in, c) + bn(c) + conv(c, c) + bn(c)
            total += (conv(c_in, c, k=1) + bn(c)) if c_in != c else 0
            c_in = c
    return total + linear(c_in, classes)


def wrn_params(depth: int, w: int, classes: int = 100) -> int:
    """Pre-activation blocks (BN on the input); a bare 1x1 conv shortcut; BN before pooling."""
    total, c_in = conv(3, 16), 16
    for c in (w, 2 * w, 4 * w):
        for _ in range((depth - 4) // 6):
            total += bn(c_in) + conv(c_in, c) + bn(c) + conv(c, c) + (conv(c_in, c, k=1) if c_in != c else 0)
            c_in = c
    return total + bn(c_in) + linear(c_in, classes)


def vgg_params(convs_per_block: int, w: int, classes: int = 100) -> int:
    """Conv (with bias) - BN per layer, the blocks at (w, 2w, 4w, 8w, 8w); one Linear."""
    total, c_in = 0, 3
    for c in (w, 2 * w, 4 * w, 8 * w, 8 * w):
        for _ in range(convs_per_block):
            total += conv(c_in, c, bias=True) + bn(c)
            c_in = c
    return total + linear(c_in, classes)


# MobileNetV2's inverted-residual settings (t, c, n, s) at width multiplier 1 (stem 32 channels)
MOBILENETV2 = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenetv2_params(stem: int, classes: int = 100) -> int:
    """Expand 1x1, depthwise 3x3, project 1x1, each with BN; a 1x1 conv to 1280 (more above stem 32)."""
    total, c_in = conv(3, stem) + bn(stem), stem
    for t, c, n, _ in MOBILENETV2:
        c_out = c * stem // 32
        for _ in range(n):
            hidden = c_in * t
            total += (conv(c_in, hidden, k=1) + bn(hidden) + conv(hidden, hidden, groups=hidden) + bn(hidden)
                      + conv(hidden, c_out, k=1) + bn(c_out))
            c_in = c_out
    last = max(1280, 1280 * stem // 32)
    return total + conv(c_in, last, k=1) + bn(last) + linear(last, classes)


PUBLISHED = {  # name: (parameters for 100 classes, the same derived from the definition)
    "resnet8": (83_892, resnet_params(8, 16, 16)),
    "resnet14": (181_108, resnet_params(14, 16, 16)),
    "resnet20": (278_324, resnet_params(20, 16, 16)),
    "resnet32": (472_756, resnet_params(32, 16, 16)),
    "resnet44": (667_188, resnet_params(44, 16, 16)),
    "resnet56": (861_620, resnet_params(56, 16, 16)),
    "resnet110": (1_736_564, resnet_params(110, 16, 16)),
    "resnet8x4": (1_233_540, resnet_params(8, 64, 32)),
    "resnet32x4": (7_433_860, resnet_params(32, 64, 32)),
    "wrn_16_1": (180_916, wrn_params(16, 16)),
    "wrn_16_2": (703_284, wrn_params(16, 32)),
    "wrn_40_1": (569_780, wrn_params(40, 16)),
    "wrn_40_2": (2_255_156, wrn_params(40, 32)),
    "vgg8": (3_965_028, vgg_params(1, 64)),
    "vgg13": (9_462_180, vgg_params(2, 64)),
    "mobilenetv2": (812_836, mobilenetv2_params(16)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    published, derived = PUBLISHED[name]
    assert derived == published
    assert count_params(MODELS[name](in_shape=CIFAR, num_classes=100)) == published


@pytest.mark.parametrize("name, width, expected", [
    ("resnet8", 8, resnet_params(8, 8, 8)), ("resnet8x4", 16, resnet_params(8, 16, 8)),
    ("wrn_16_2", 8, wrn_params(16, 8)), ("vgg8", 16, vgg_params(1, 16)),
    ("mobilenetv2", 8, mobilenetv2_params(8)), ("mobilenetv2", 64, mobilenetv2_params(64))])
def test_width_scales_each_family_as_documented(name, width, expected):
    assert count_params(create_model(name, CIFAR, 100, width=width)) == expected


RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
FAMILY_SHAPES = {  # (channels, side) of each stage's map on a 32x32 input, and the embedding size
    RESNETS: ([(16, 32), (32, 16), (64, 8)], 64),
    ("resnet8x4", "resnet32x4"): ([(64, 32), (128, 16), (256, 8)], 256),
    ("wrn_16_1", "wrn_40_1"): ([(16, 32), (32, 16), (64, 8)], 64),
    ("wrn_16_2", "wrn_40_2"): ([(32, 32), (64, 16), (128, 8)], 128),
    ("vgg8", "vgg13"): ([(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], 512),
    ("mobilenetv2",): ([(12, 16), (16, 8), (48, 4), (160, 2)], 1280),
}
SHAPES = {name: shapes for names, shapes in FAMILY_SHAPES.items() for name in names}


def test_every_cifar_builtin_is_covered():
    assert {name for name, builder in MODELS.items() if builder.default_in_shape == CIFAR} == set(PUBLISHED) == set(SHAPES)


DEEPEST = {"resnet110", "resnet32x4"}  # seconds each on a CPU: the slow tier's


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in DEEPEST else name
                                  for name in sorted(PUBLISHED)])
def test_features_maps_and_classifier(name):
    torch.manual_seed(0)
    model = create_model(name, CIFAR, 100).eval()
    assert MODELS[name].has_maps and MODELS[name].default_in_shape == CIFAR
    with torch.no_grad():
        out = model(torch.randn(2, *CIFAR))
    maps, embedding = SHAPES[name]
    assert isinstance(out, Features) and out.logits.shape == (2, 100)
    assert out.embedding.shape == (2, embedding)
    assert [tuple(m.shape) for m in out.maps] == [(2, c, s, s) for c, s in maps]
    assert isinstance(model.classifier, torch.nn.Linear)
    torch.testing.assert_close(model.classifier(out.embedding), out.logits)
    restored = pickle.loads(pickle.dumps(model))  # a teacher travels to the trials pickled
    with torch.no_grad():
        torch.testing.assert_close(restored(torch.zeros(1, *CIFAR)).logits, model(torch.zeros(1, *CIFAR)).logits)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_a_batch_on_cifar_nets(name):
    """resnet8x4 as published, taught by a narrow resnet32x4 (width 16 keeps the test cheap)."""
    torch.manual_seed(0)
    teacher = create_model("resnet32x4", CIFAR, 100, width=16).eval()
    student = create_model("resnet8x4", CIFAR, 100)
    x, labels, num_train = torch.randn(4, *CIFAR), torch.randint(0, 100, (4,)), 32
    with torch.no_grad():
        t_features = teacher(x)
        t = {k: TEACHER_TARGETS[k](t_features) for k in METHODS[name].teacher_keys}
        student.eval()
        example = student(x[:2])
    student.train()
    method = METHODS[name](example, {k: v[:2] for k, v in t.items()}, num_train,
                           teacher_head=classifier_head(teacher, t_features), student_model=student)
    if METHODS[name].needs_inputs:  # dml runs its peers on the batch, as the trial gives it
        t[INPUTS] = x
    terms = method.losses(student(x), t, labels, torch.randperm(num_train)[:4], 1.0)
    assert "ce" in terms and all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def run_listing(*args: str) -> str:
    """The CLI's stdout; run from the repository root, whose kdtune `-m` imports first."""
    done = subprocess.run([sys.executable, "-m", "kdtune.models", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_listing_csv_has_every_builtin_with_its_count():
    table = pd.read_csv(io.StringIO(run_listing("--format", "csv")))
    assert {"name", "params"} <= set(table.columns)
    assert sorted(table["name"]) == sorted(MODELS)
    rows = table.set_index("name")
    for name, (published, _) in PUBLISHED.items():
        assert rows.loc[name, "params"] == published and rows.loc[name, "in_shape"] == "3x32x32"
    assert rows.loc["mlp", "params"] == 109_386 and rows.loc["mlp", "in_shape"] == "1x28x28"  # MNIST's 10 classes

    ten = pd.read_csv(io.StringIO(run_listing("--num-classes", "10", "--format", "csv"))).set_index("name")
    assert ten.loc["resnet8x4", "params"] == resnet_params(8, 64, 32, classes=10)
    assert ten.loc["wrn_40_2", "params"] == wrn_params(40, 32, classes=10)


@pytest.mark.slow
def test_listing_table_is_readable():
    text = run_listing()
    assert text.split()[:2] == ["name", "family"]
    line = next(row for row in text.splitlines() if row.split()[0] == "resnet32x4")
    assert line.split()[-1] == "7,433,860"
