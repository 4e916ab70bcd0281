"""`--smoke` and the teacher-gap warning: how kdtune shrinks a spec (its own rules, then the spec's
`smoke:` block, then `--set`), and the warning's three cases against the numbers it prints.
The smoke sweep of the default spec itself runs end to end in test_sweep.py."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kdtune import SpecError, load_spec
from kdtune.results import teacher_gap

ROOT = Path(__file__).resolve().parents[1]
DEFAULT, CUSTOM = ROOT / "search_spaces" / "mnist.yaml", ROOT / "search_spaces" / "custom.yaml"


def test_smoke_shrinks_the_default_spec_from_its_own_values():
    full, smoke = load_spec(DEFAULT), load_spec(DEFAULT, smoke=True)
    assert (full.teacher.epochs, full.train.epochs, full.train.batch_size) == (8, 5, 256)
    assert (smoke.data.train_limit, smoke.data.val_size, smoke.data.test_limit) == (12000, 1000, 1000)
    assert (smoke.teacher.epochs, smoke.train.epochs) == (3, 2)
    assert (smoke.teacher.batch_size, smoke.train.batch_size) == (128, 128)
    # warm-up keeps its share of the run: 1 of 8 teacher epochs, 1.25 of 5 student epochs
    assert smoke.teacher.schedule.warmup_epochs == pytest.approx(3 / 8)
    assert smoke.train.schedule.warmup_epochs == pytest.approx(1.25 * 2 / 5)
    assert smoke.teacher.schedule.type == smoke.train.schedule.type == "onecycle"
    assert (smoke.search.num_samples, smoke.search.confirm_seeds, smoke.search.scheduler) == (4, 2, None)
    assert (smoke.resources.cpu, smoke.resources.gpu) == (1, 0)
    assert (full.deploy.timing_seconds, smoke.deploy.timing_seconds) == (10, 1)  # latency sampled for 1 s, not 10
    # the shape stays: families, methods, search, objectives
    assert smoke.search.space == full.search.space and smoke.search.objectives == full.search.objectives


def test_smoke_scales_step_milestones_and_keeps_smaller_values():
    spec = {"name": "s", "data": {"train_limit": 3000}, "teacher": {"epochs": 2, "batch_size": 32},
            "train": {"epochs": 40, "schedule": {"type": "step", "milestones": [20, 30], "gamma": 0.5}},
            "search": {"num_samples": 3, "confirm_seeds": 1}}
    smoke = load_spec(spec, smoke=True)
    assert smoke.data.train_limit == 3000 and (smoke.teacher.epochs, smoke.teacher.batch_size) == (2, 32)
    assert smoke.train.epochs == 2 and smoke.train.schedule.milestones == [1, 2] and smoke.train.schedule.gamma == 0.5
    assert (smoke.search.num_samples, smoke.search.confirm_seeds) == (3, 1)
    assert load_spec({**spec, "deploy": {"timing_seconds": 0.5}}, smoke=True).deploy.timing_seconds == 0.5


def test_the_specs_smoke_block_comes_after_kdtunes_rules_and_set_after_both():
    assert load_spec(CUSTOM, smoke=True).train.epochs == 3  # custom.yaml's smoke: {train: {epochs: 3}}
    assert load_spec(CUSTOM).train.epochs == 3 and load_spec(CUSTOM, smoke=True).teacher.epochs == 2
    assert load_spec(CUSTOM, ["train.epochs=1"], smoke=True).train.epochs == 1
    assert load_spec(DEFAULT, {"search.confirm_seeds": 5}, smoke=True).search.confirm_seeds == 5
    block = {"name": "s", "train": {"epochs": 9}, "smoke": {"train": {"epochs": 1}, "data": {"val_size": 50}}}
    assert load_spec(block).train.epochs == 9  # without --smoke the block does nothing
    smoke = load_spec(block, smoke=True)
    assert (smoke.train.epochs, smoke.data.val_size) == (1, 50)


@pytest.mark.parametrize("block, path, fragment", [
    ({"train": {"epochz": 1}}, "smoke.train.epochz", "allowed keys here: epochs"),
    ({"search": {"sampler": "grid"}}, "smoke.search.sampler", "'tpe', 'nsga2', 'gp' or 'random'"),
    ({"smoke": {}}, "smoke.smoke", "cannot hold another"),
    ([1], "smoke", "valid dictionary"),
])
def test_a_bad_smoke_block_names_its_key_even_without_smoke(block, path, fragment):
    with pytest.raises(SpecError) as caught:
        load_spec({"name": "s", "smoke": block})
    assert caught.value.path == path and fragment in caught.value.message


def gap(teacher_acc: float, baselines: list[float], distilled: float = 0.5):
    """teacher_gap on a search of baselines (loss none) and one distilled trial, no confirmation."""
    rows = [{"trial_id": f"{i:08x}", "phase": "search", "loss": "none", "status": "FINISHED", "test_acc": acc}
            for i, acc in enumerate(baselines)]
    rows.append({"trial_id": "ffffffff", "phase": "search", "loss": "kd", "status": "FINISHED", "test_acc": distilled})
    trials = pd.DataFrame(rows)
    return teacher_gap(trials, trials, pd.DataFrame(), teacher_acc)[1]


def test_a_teacher_below_the_students_cannot_teach_them():
    found = gap(0.344, [0.80, 0.839])
    assert found["best_baseline_test_acc"] == 0.839
    assert found["warning"] == ("the teacher (34.40%) is 49.50 points below the best baseline student (83.90%): "
                                "it cannot teach it; train it longer or give a checkpoint")


@pytest.mark.parametrize("teacher_acc, side, points", [(0.962, "above", "0.20"), (0.958, "below", "0.20"),
                                                       (0.9645, "above", "0.45")])
def test_a_teacher_level_with_the_students_has_little_to_teach(teacher_acc, side, points):
    found = gap(teacher_acc, [0.91, 0.96])
    assert found["warning"] == (f"the teacher ({teacher_acc:.2%}) is {points} points {side} the best baseline student "
                                "(96.00%): level with it (within 0.5 points), it has little to teach, so a "
                                "'no clear gain' verdict says little")


@pytest.mark.parametrize("teacher_acc", [0.966, 0.982])
def test_a_teacher_clearly_above_the_students_is_not_warned_about(teacher_acc):
    found = gap(teacher_acc, [0.91, 0.96], distilled=0.97)  # a distilled student near the teacher is no baseline
    assert found["warning"] is None and found["teacher_test_acc"] == teacher_acc
