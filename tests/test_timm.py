"""timm's models by name (`timm:<name>`): three families build as teacher and student with timm's own
parameter count, their features come from timm's API (the embedding is forward_head(pre_logits=True),
the maps the last two feature_info stages), KD, FitNet and CRD train one epoch on small CIFAR-format
files, a teacher checkpoint loads, a missing timm exits 2 with the install hint, and the timm spec
runs end to end with --smoke."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

timm = pytest.importorskip("timm")

from kdtune import load_spec  # noqa: E402
from kdtune.data.cifar import write_copy  # noqa: E402
from kdtune.data.resolve import load_splits  # noqa: E402
from kdtune.models.resolve import build_model  # noqa: E402
from kdtune.models.timm_models import TimmFeatures  # noqa: E402
from kdtune.runner import prepare  # noqa: E402
from kdtune.space import parse_space, resolve  # noqa: E402
from kdtune.teacher import get_teacher  # noqa: E402
from kdtune.trial import run_trial  # noqa: E402

from conftest import REPO  # noqa: E402

FAMILIES = ["test_resnet", "mobilenetv3_small_050", "test_efficientnet"]  # tiny members of three families
TRAIN, TEST = 1200, 200  # above --smoke's val_size of 1000
TERMS = {"kd": "loss_kd", "fitnet": "loss_hint", "crd": "loss_crd"}
POINTS = {"kd": {"loss": "kd"}, "fitnet": {"loss": "fitnet"}, "crd": {"loss": "crd", "crd.nce_k": 64}}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A CIFAR-10 copy in the standard pickle layout, random 32x32 images."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    write_copy(root, "cifar10", (rng.integers(0, 256, (TRAIN, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, TRAIN)),
               (rng.integers(0, 256, (TEST, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, TEST)))
    return root


def spec_for(cifar_root, teacher_cache, **sections):
    raw = {"name": "timm", "seed": 0, "data": {"dataset": "cifar10", "root": str(cifar_root), "val_size": 200},
           "teacher": {"arch": "timm:test_resnet", "epochs": 1, "batch_size": 100, "optimizer": "adam", "lr": 0.003,
                       "schedule": {"type": "constant"}, "cache_dir": str(teacher_cache)},
           "student": {"arch": "timm:mobilenetv3_small_050"}, "train": {"epochs": 1, "batch_size": 100},
           "search": {"space": {"loss": {"kd": {}, "fitnet": {}, "crd": {"nce_k": 64}}}}, "resources": {"cpu": 1}}
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return load_spec(raw)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_family_builds_with_timms_features_and_parameter_count(name, role):
    spec = load_spec({"name": "timm", role: {"arch": f"timm:{name}"}})
    torch.manual_seed(0)
    model = build_model(getattr(spec, role), (3, 32, 32), 10, role).eval()
    assert isinstance(model, TimmFeatures)
    own = timm.create_model(name, pretrained=False, num_classes=10)
    assert model.own_parameters() == sum(p.numel() for p in own.parameters())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        inner = model.model
        torch.testing.assert_close(out.embedding, inner.forward_head(inner.forward_features(x), pre_logits=True))
        torch.testing.assert_close(out.logits, inner(x))
        stages = timm.create_model(name, pretrained=False, num_classes=10, features_only=True, out_indices=(-2, -1))
        stages.load_state_dict(inner.state_dict(), strict=False)
        torch.testing.assert_close(out.maps, stages.eval()(x))  # timm's own feature extractor of the last two stages
    assert out.logits.shape == (2, 10)


def test_a_timm_model_takes_the_datasets_channels_and_refuses_width():
    spec = load_spec({"name": "timm", "student": {"arch": "timm:test_resnet"}})
    model = build_model(spec.student, (1, 28, 28), 10, "student")
    assert next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 1
    assert model(torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)
    from kdtune.errors import SpecError
    with pytest.raises(SpecError, match="student.width: timm:test_resnet takes no width argument"):
        build_model(spec.student, (1, 28, 28), 10, "student", width=8)


@pytest.fixture(scope="module")
def prepared(cifar_root, teacher_cache):
    spec = spec_for(cifar_root, teacher_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random copy fails torchvision's checksums, by design
        data, teacher, info = prepare(spec, parse_space(spec))
    return spec, data, info


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TERMS))
def test_kd_fitnet_and_crd_train_a_timm_student_from_a_timm_teacher(prepared, method):
    spec, data, _ = prepared
    metrics = run_trial(resolve(spec, POINTS[method]), data, lambda m, g: None)
    assert metrics["epoch"] == 1 and torch.isfinite(torch.tensor(metrics[TERMS[method]]))
    assert metrics[TERMS[method]] > 0 and 0 <= metrics["test_acc"] <= 1
    own = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    assert metrics["params"] == sum(p.numel() for p in own.parameters())


def test_a_timm_teacher_checkpoint_loads(cifar_root, teacher_cache, tmp_path):
    torch.manual_seed(5)
    trained = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    spec = spec_for(cifar_root, teacher_cache, teacher={"checkpoint": str(tmp_path / "teacher.pt")},
                    data={"train_limit": 300, "test_limit": 100})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = load_splits(spec.data, spec.seed)
    teacher, facts = get_teacher(spec, splits, print)
    assert facts["source"] == "checkpoint"
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(teacher.model.state_dict()[key], value)


HIDDEN = """
import sys
sys.modules["timm"] = None  # as if timm were not installed: importing it raises ImportError
from kdtune.sweep import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_timm_arch_without_timm_exits_2_with_the_install_hint(tmp_path):
    done = subprocess.run([sys.executable, "-c", HIDDEN, str(REPO / "search_spaces" / "timm.yaml"),
                           "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("kdtune:")]
    assert ": teacher.arch: " in line and 'pip install -e ".[timm]"' in line, line


@pytest.mark.slow
def test_the_timm_spec_runs_end_to_end_with_smoke(cifar_root, tmp_path, run_cli):
    done = run_cli([REPO / "search_spaces" / "timm.yaml", "--smoke", "--set", f"data.root={cifar_root}",
                    "--set", "data.val_size=100", "--set", "data.train_limit=300"],  # 100 validation images: CPU time
                   tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "results" / "timm-cifar10"
    trials = pd.read_csv(out / "trials.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert (trials["status"] == "FINISHED").all()
    assert summary["teacher"]["arch"].startswith("timm:")
    assert set(trials["student.arch"]) <= {f"timm:mobilenetv3_small_{w}" for w in ("050", "075", "100")}
    baselines = trials[(trials["phase"] == "search") & (trials["loss"] == "none")]
    assert set(baselines["student.arch"]) == {f"timm:mobilenetv3_small_{w}" for w in ("050", "075", "100")}
    print(done.stdout[-4000:])


def test_the_model_listing_names_timm_models_by_pattern():
    from kdtune.models.__main__ import listing

    table = listing(10, "mobilenetv3_small*").set_index("name")
    assert list(table.index) == [f"timm:{n}" for n in timm.list_models("mobilenetv3_small*")]
    for name, row in table.iterrows():
        own = timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=10)
        assert row["params"] == sum(p.numel() for p in own.parameters()) and row["family"] == "timm"
