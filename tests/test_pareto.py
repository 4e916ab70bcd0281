"""Pareto front against a dominance check written out here, on generated points."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kdtune.pareto import pareto_mask, representatives


def at_least_as_good(a, b, mode):
    return a >= b if mode == "max" else a <= b


def strictly_better(a, b, mode):
    return a > b if mode == "max" else a < b


def dominates(p, q, objectives):
    """p dominates q: no worse in every objective and strictly better in at least one."""
    no_worse = True
    better = False
    for metric, mode in objectives:
        if not at_least_as_good(p[metric], q[metric], mode):
            no_worse = False
        if strictly_better(p[metric], q[metric], mode):
            better = True
    return no_worse and better


def check_front(df: pd.DataFrame, objectives):
    mask = pareto_mask(df, objectives)
    assert mask.dtype == bool
    assert list(mask.index) == list(df.index)
    rows = {label: df.loc[label] for label in df.index}
    front = [label for label in df.index if mask[label]]
    assert front, "a non-empty set always has a non-dominated point"
    for label in front:
        for other in df.index:
            assert not dominates(rows[other], rows[label], objectives), (label, other)
    for label in df.index:
        if not mask[label]:
            assert any(dominates(rows[f], rows[label], objectives) for f in front), label
    return mask


def generate(seed: int, n: int, metrics: list[str], discrete: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    if discrete:  # few distinct values: many ties and exact duplicates
        values = rng.integers(0, 4, size=(n, len(metrics))).astype(float)
    else:
        values = rng.random((n, len(metrics)))
        values[rng.integers(0, n, size=n // 4)] = values[rng.integers(0, n, size=n // 4)]  # copied rows
    df = pd.DataFrame(values, columns=metrics)
    df["other"] = rng.random(n)  # a column that is not an objective
    df.index = rng.permutation(n) * 10 + 7  # an index that is neither 0..n-1 nor sorted
    return df


OBJECTIVE_SETS = [
    [("val_acc", "max"), ("params", "min")],
    [("val_acc", "min"), ("params", "max")],
    [("val_acc", "max"), ("params", "max")],
    [("val_acc", "min"), ("params", "min")],
    [("val_acc", "max"), ("params", "min"), ("val_loss", "min")],
    [("val_acc", "max"), ("params", "max"), ("val_loss", "min")],
    [("params", "min"), ("val_loss", "max"), ("val_acc", "min")],
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("objectives", OBJECTIVE_SETS, ids=lambda o: ",".join(f"{m}:{d}" for m, d in o))
@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "ties"])
def test_front_on_generated_points(seed, objectives, discrete):
    df = generate(seed, 40, ["val_acc", "params", "val_loss"], discrete)
    mask = check_front(df, objectives)
    # identical objective vectors share their fate
    keys = [tuple(df.loc[label, m] for m, _ in objectives) for label in df.index]
    fate = {}
    for key, on_front in zip(keys, mask):
        assert fate.setdefault(key, on_front) == on_front


def test_duplicates_of_the_best_point_are_all_on_the_front():
    df = pd.DataFrame({"val_acc": [0.9, 0.9, 0.8, 0.9], "params": [100, 100, 50, 200]})
    mask = check_front(df, [("val_acc", "max"), ("params", "min")])
    assert list(mask) == [True, True, True, False]


def test_all_identical_points_are_all_on_the_front():
    df = pd.DataFrame({"val_acc": [0.5] * 5, "params": [10] * 5})
    assert pareto_mask(df, [("val_acc", "max"), ("params", "min")]).all()


def test_tie_in_one_objective_is_broken_by_the_other():
    df = pd.DataFrame({"val_acc": [0.9, 0.9, 0.95], "params": [100, 120, 120]})
    mask = check_front(df, [("val_acc", "max"), ("params", "min")])
    assert list(mask) == [True, False, True]


def test_single_objective_front_is_the_ties_for_best():
    df = pd.DataFrame({"val_acc": [0.7, 0.9, 0.9, 0.8]})
    assert list(check_front(df, [("val_acc", "max")])) == [False, True, True, False]


def test_one_row_and_empty():
    one = pd.DataFrame({"val_acc": [0.5], "params": [3]}, index=[42])
    assert pareto_mask(one, [("val_acc", "max"), ("params", "min")]).to_dict() == {42: True}
    empty = pd.DataFrame({"val_acc": [], "params": []})
    assert pareto_mask(empty, [("val_acc", "max"), ("params", "min")]).empty


def test_one_representative_per_objective_vector_with_its_count():
    df = pd.DataFrame({"val_acc": [0.9, 0.9, 0.8, 0.9, 0.8], "params": [10, 10, 5, 10, 5],
                       "trial_id": ["a", "b", "c", "d", "e"]}, index=[4, 3, 2, 1, 0])
    kept = representatives(df, [("val_acc", "max"), ("params", "min")])
    # the first of each tied group, in the sampler's (row) order: a stands for a, b, d; c for c, e
    assert list(kept["trial_id"]) == ["a", "c"] and list(kept["trials"]) == [3, 2]
