"""Training recipes and augmentation: schedules against formulas computed here, on-device
crop/flip against a per-image reference, and the teacher's logits cached for every augmented
view equal to the live teacher's, so a trial reads exactly what a live teacher would give."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kdtune
from kdtune.data.augment import Augment
from kdtune.data.resolve import load_splits
from kdtune.distill import METHODS
from kdtune.errors import SpecError
from kdtune.models import create_model
from kdtune.models.features import classifier_head
from kdtune.recipe import make_optimizer, make_schedule
from kdtune.space import resolve
from kdtune.teacher import compute_view_targets, teacher_targets
from kdtune.trial import SweepData, run_trial


def train(schedule, epochs=6, lr=0.1, optimizer="sgd"):
    return SimpleNamespace(optimizer=optimizer, lr=lr, momentum=0.9, nesterov=False, weight_decay=0.0, epochs=epochs,
                           schedule=SimpleNamespace(type=schedule["type"], warmup_epochs=schedule.get("warmup_epochs", 0),
                                                    milestones=schedule.get("milestones", []),
                                                    gamma=schedule.get("gamma", 0.1)))


def lrs_at_epoch_starts(recipe, steps_per_epoch):
    optimizer = make_optimizer(recipe, [torch.nn.Parameter(torch.zeros(1))])
    schedule = make_schedule(recipe, optimizer, steps_per_epoch)
    seen = []
    for step in range(recipe.epochs * steps_per_epoch):
        if step % steps_per_epoch == 0:
            seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


@pytest.mark.parametrize("schedule, expected", [
    ({"type": "constant"}, lambda e, s: 0.1),
    ({"type": "step", "milestones": [2, 4], "gamma": 0.1}, lambda e, s: 0.1 * 0.1 ** ((e >= 2) + (e >= 4))),
    # linear warm-up over one epoch (step k of it at (k+1)/steps), then a half cosine to 0 over the rest
    ({"type": "cosine", "warmup_epochs": 1},
     lambda e, s: 0.1 * (1 / s if e == 0 else 0.5 * (1 + math.cos(math.pi * (e - 1) * s / (5 * s))))),
])
def test_learning_rate_each_epoch_matches_the_formula(schedule, expected):
    steps = 10
    got = lrs_at_epoch_starts(train(schedule), steps)
    assert got == pytest.approx([expected(e, steps) for e in range(6)], rel=1e-9)


def test_onecycle_peaks_at_the_end_of_its_warm_up():
    steps = 10
    recipe = train({"type": "onecycle", "warmup_epochs": 2}, epochs=8, lr=0.04, optimizer="adamw")
    optimizer = make_optimizer(recipe, [torch.nn.Parameter(torch.zeros(1))])
    schedule = make_schedule(recipe, optimizer, steps)
    lrs = []
    for _ in range(recipe.epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.04) and lrs[0] == pytest.approx(0.04 / 25)  # torch's div_factor 25
    assert abs(peak - (0.25 * 80 - 1)) <= 1  # pct_start = warmup_epochs / epochs
    assert lrs[-1] < 1e-5


def reference_view(image, view, crop, flip, pad):
    """One image under one view, the obvious way: pad, slice, maybe flip."""
    side = 2 * crop + 1
    f = view % 2 if flip else 0
    shift = view // 2 if flip else view
    dy, dx = divmod(shift, side)
    c, h, w = image.shape
    padded = pad.expand(c, h + 2 * crop, w + 2 * crop).clone()  # a frame of value `pad` around the image
    padded[:, crop:crop + h, crop:crop + w] = image
    out = padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]
    return out.flip(-1) if f else out


@pytest.mark.parametrize("crop, flip", [(4, True), (2, False), (0, True)])
def test_batch_augmentation_equals_a_per_image_reference(crop, flip):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    augment = Augment(crop, flip, [-1.0, -2.0, -3.0])
    assert augment.num_views == (2 * crop + 1) ** 2 * (2 if flip else 1)
    views = augment.draw(16, torch.Generator().manual_seed(1))
    out = augment.apply(x, views)
    pads = torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1)
    for i in range(16):
        assert torch.equal(out[i], reference_view(x[i], int(views[i]), crop, flip, pads)), i
    assert torch.equal(views, augment.draw(16, torch.Generator().manual_seed(1)))  # seeded


@pytest.fixture(scope="module")
def small(mnist_root):
    spec = kdtune.load_spec({"name": "aug", "seed": 0,
                             "data": {"root": str(mnist_root), "val_size": 200, "train_limit": 1200, "test_limit": 200,
                                      "augment": {"crop": 2, "flip": True}},
                             "student": {"arch": "cnn", "width": 4},
                             "train": {"epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                                       "schedule": {"type": "cosine", "warmup_epochs": 0.5}, "label_smoothing": 0.1},
                             "search": {"space": {"loss": {"kd": {}}}}})
    splits = load_splits(spec.data, spec.seed)
    torch.manual_seed(0)
    teacher = create_model("mnist_cnn", splits.in_shape, splits.num_classes).eval()
    return spec, splits, teacher


def test_cached_view_targets_equal_the_live_teacher_on_that_view(small):
    spec, splits, teacher = small
    augment = Augment.of(spec.data.augment, splits)
    assert augment.num_views == 50
    x = splits.train_x[:40]
    cache = compute_view_targets(teacher, x, augment, ["logits", "embedding"], batch_size=16)
    assert cache["logits"].shape == (40, 50, 10) and cache["embedding"].shape == (40, 50, 128)
    assert cache["logits"].dtype == cache["embedding"].dtype == torch.float16
    g = torch.Generator().manual_seed(3)
    for i, view in zip(torch.randint(0, 40, (12,), generator=g).tolist(), torch.randint(0, 50, (12,), generator=g).tolist()):
        pad = torch.tensor([-m / s for m, s in zip(splits.mean, splits.std)]).view(1, 1, 1)
        live = teacher(reference_view(x[i], view, 2, True, pad).unsqueeze(0))
        assert torch.allclose(cache["logits"][i, view].float(), live.logits[0], atol=1e-2, rtol=1e-3), (i, view)
        assert torch.allclose(cache["embedding"][i, view].float(), live.embedding[0], atol=1e-2, rtol=1e-3), (i, view)


@pytest.mark.slow
@pytest.mark.parametrize("method, terms", [("kd", ["loss_kd"]), ("srrl", ["loss_srrl_feature", "loss_srrl_sr"])])
def test_a_trial_on_cached_views_reproduces_the_live_trial(small, method, terms):
    spec, splits, teacher = small
    with torch.no_grad():
        head = classifier_head(teacher, teacher(splits.train_x[:2]))
    keys = sorted(METHODS[method].teacher_keys)
    runs = {}
    for mode in ("augmentations", "live"):
        moded = kdtune.load_spec(spec, {"teacher.cache": mode})
        targets, live, per_view, used = teacher_targets(moded, teacher, splits, keys)
        assert used == mode and per_view == (mode == "augmentations")
        assert sorted(targets) == (keys if mode == "augmentations" else [])
        data = SweepData(splits, targets, teacher if live else None, per_view=per_view, teacher_head=head)
        runs[mode] = run_trial(resolve(moded, {"loss": method}), data, lambda m, s: None)
    cached, live = runs["augmentations"], runs["live"]
    assert cached["teacher_passes"] == 0 and live["teacher_passes"] == pytest.approx(2.0)  # 2 epochs, all batches
    for key in ["loss_ce", *terms, "val_acc", "test_acc"]:
        assert cached[key] == pytest.approx(live[key], abs=2e-3, rel=2e-3), key


def test_outputs_cache_refuses_augmented_images(small):
    spec, splits, teacher = small
    with pytest.raises(SpecError) as info:
        teacher_targets(kdtune.load_spec(spec, {"teacher.cache": "outputs"}), teacher, splits, ["logits"])
    assert info.value.path == "teacher.cache" and "augment" in info.value.message
    with pytest.raises(SpecError) as info:
        teacher_targets(kdtune.load_spec(spec, {"teacher.cache": "augmentations", "teacher.cache_mb": 0.1}),
                        teacher, splits, ["logits"])
    assert info.value.path == "teacher.cache_mb"


def test_label_smoothing_enters_the_cross_entropy():
    from kdtune.models import Features

    logits, labels = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0])
    features = Features(logits)
    none = METHODS["none"](features, {}, 100, 1.0, label_smoothing=0.2)
    target = torch.full((5, 4), 0.2 / 4) + 0.8 * F.one_hot(labels, 4)
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    assert none(features, {}, labels, torch.arange(5), 0.0)["ce"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.slow
def test_auto_caches_every_view_only_when_cheaper_than_running_the_teacher_live(small):
    """50 views against the sampled trials' epochs (2 each): 24 trials make 48 live passes, 25 make 50."""
    spec, splits, teacher = small
    for samples, expected in ((24, "live"), (25, "augmentations")):
        auto = kdtune.load_spec(spec, {"teacher.cache": "auto", "search.num_samples": samples})
        *_, used = teacher_targets(auto, teacher, splits, ["logits"])
        assert used == expected, samples
