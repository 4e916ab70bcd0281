"""The report's arithmetic on fixed inputs (hypervolume against hand-computed values, the
student to register, the front of several sweeps), the deployable student of every model form,
and a trial run's system metrics."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kdtune.report import hypervolume as hv
from kdtune.registry import pick
from kdtune.report.runs import ReportError


def test_hypervolume_of_a_small_front_matches_a_hand_computed_value():
    # Minimised objectives, front (1, 3), (2, 2), (3, 1), reference (4, 4): the union of the three
    # dominated boxes is 3x1 + 2x1 + 1x1 along the first axis = 6.
    assert hv.hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    # a dominated point and a point beyond the reference add nothing
    assert hv.hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0]], [4, 4]) == pytest.approx(6.0)
    # 3 objectives: boxes [1,2]^3 (volume 1) and (0,0,1.5)-(2,2,2) (volume 2) overlap in [1,2]x[1,2]x[1.5,2]
    # (volume 0.5): 1 + 2 - 0.5 = 2.5
    assert hv.hypervolume([[1, 1, 1], [0, 0, 1.5]], [2, 2, 2]) == pytest.approx(2.5)


def test_front_hypervolume_in_accuracy_and_decades_of_parameters():
    front = pd.DataFrame({"params": [100, 1000], "val_acc": [0.90, 0.95]})
    objectives = [("val_acc", "max"), ("params", "min")]
    trials = pd.DataFrame({"phase": "search", "status": "FINISHED", "params": [100, 1000, 5000],
                           "val_acc": [0.9, 0.95, 0.94]})
    reference = hv.default_reference(trials, objectives)
    assert reference == {"val_acc": 0.0, "params": 10_000.0}  # next power of ten above 5000
    # by hand: 100 params dominates 0.90 x (4 - 2) decades = 1.80; 1000 params adds (0.95 - 0.90) x (4 - 3) = 0.05
    assert hv.front_hypervolume(front, objectives, reference) == pytest.approx(1.85)
    # a higher reference accuracy shrinks it: (0.90 - 0.5) x 2 + 0.05 x 1 = 0.85
    assert hv.front_hypervolume(front, objectives, {**reference, "val_acc": 0.5}) == pytest.approx(0.85)
    text = hv.describe(objectives, reference)
    assert "reference point val_acc = 0, params = 10000" in text and "log10 params" in text
    assert math.isclose(hv.front_hypervolume(front.iloc[:0], objectives, reference), 0.0)


def test_register_picks_the_most_accurate_front_student_within_the_size():
    front = pd.DataFrame({"trial_id": ["a", "b", "c"], "params": [2370, 3766, 8818], "val_acc": [0.97, 0.98, 0.99]})
    assert pick(front, "val_acc", "max", 5000)["trial_id"] == "b"
    assert pick(front, "val_acc", "max", 100_000)["trial_id"] == "c"
    assert pick(front, "val_acc", "max", 2370)["trial_id"] == "a"
    with pytest.raises(ReportError, match="at most 1,000 parameters"):
        pick(front, "val_acc", "max", 1000)


def test_the_front_of_several_sweeps_is_the_non_dominated_union_of_their_fronts():
    from kdtune.report.tables import tables

    def trial(sweep, tid, params, val_acc, loss="kd"):
        return {"sweep": sweep, "trial_id": tid, "phase": "search", "status": "FINISHED", "loss": loss,
                "student.arch": "gapnet", "width": params // 100, "student": f"gapnet {params // 100}",
                "params": params, "val_acc": val_acc, "test_acc": val_acc}

    trials = pd.DataFrame([trial("s1", "a", 1000, 0.90), trial("s1", "b", 2000, 0.95), trial("s1", "c", 3000, 0.93),
                           trial("s2", "d", 1000, 0.91), trial("s2", "e", 4000, 0.96), trial("s2", "f", 2000, 0.94)])
    objectives = [("val_acc", "max"), ("params", "min")]
    front, _ = tables(trials, objectives)
    # s1's front a, b; s2's front d, f, e; together a (0.90 at 1000) is beaten by d, f (0.94 at 2000) by b
    assert list(front["trial_id"]) == ["d", "b", "e"]
    assert list(front["sweep"]) == ["s2", "s1", "s2"] and set(front["basis"]) == {"search trial"}
    one, _ = tables(trials[trials["sweep"] == "s1"], objectives)
    assert list(one["trial_id"]) == ["a", "b"]


def test_a_trial_run_gets_system_metrics_where_psutil_is_installed(tmp_path, monkeypatch):
    pytest.importorskip("psutil")  # MLflow's system metrics need it; kdtune then skips them
    import time

    from mlflow.tracking import MlflowClient

    from kdtune import tuning
    from kdtune.tuning import SweepContext

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sysmetrics")).info.run_id
    monkeypatch.setattr(tuning, "SYSTEM_METRICS_INTERVAL_S", 0.2)
    monitor = tuning.system_metrics(SweepContext({}, uri, "0", "parent"), run_id, resumed=False)
    time.sleep(1.0)
    monitor.finish()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= m.value <= 100 for m in history)


def _splits(shape, normalised: bool):
    """A few random images as kdtune holds them: normalised with a mean and std, or given as is."""
    from kdtune.data.splits import Splits, normalise

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, *shape), dtype=torch.uint8, generator=generator)
    labels = torch.arange(24) % 10
    mean, std = ((0.4,) * shape[0], (0.2,) * shape[0]) if normalised else (None, None)
    x = normalise(images, mean, std) if normalised else images.float() / 255
    return Splits(x[:8], labels[:8], x[8:16], labels[8:16], x[16:], labels[16:], 10, mean, std), images[16:]


class TinyLogits(torch.nn.Module):
    """A student given to kdtune.run as a factory: plain logits, no kdtune types."""

    def __init__(self, num_classes: int, width: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, width, 3)
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("student, shape, normalised", [
    ({"arch": "gapnet", "width": 4}, (1, 28, 28), True),  # built-in family, dataset normalisation inside
    ({"arch": "torchvision:mobilenet_v3_small", "features": {"embedding": "flatten"}}, (3, 32, 32), True),
    ({"arch": "python:TinyLogits", "width": 3}, (1, 28, 28), False),  # in-memory factory, data given as is
])
def test_the_deployable_student_is_the_trials_student_behind_the_sweeps_normalisation(student, shape, normalised):
    import kdtune
    from kdtune import deploy
    from kdtune.trial import SweepData, build_student

    splits, raw = _splits(shape, normalised)
    data = SweepData(splits, {}, student_factory=TinyLogits)
    spec = kdtune.load_spec({"name": "deploy", "student": student})
    torch.manual_seed(1)
    trained = build_student(spec, data).eval()
    rebuilt = deploy.trained_student(spec, {}, data, trained.state_dict())
    model = deploy.deployable(rebuilt, splits)
    assert isinstance(model, torch.jit.ScriptModule)  # loads with torch alone: no kdtune, no user code
    images = raw.float() / 255 if normalised else splits.test_x  # what ToTensor gives, or the data as given
    with torch.no_grad():
        assert torch.allclose(model(images), trained(splits.test_x).logits, atol=1e-5)
    example = deploy.example(splits)
    assert example.shape == (2, *shape) and example.dtype == np.float32
    assert np.allclose(example, images[:2].numpy(), atol=1e-6)
