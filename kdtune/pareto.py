"""Pareto front of trials under several objectives."""
from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_mask(df: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.Series:
    """True for rows no other row dominates (no worse in every objective, better in one)."""
    if df.empty:
        return pd.Series([], dtype=bool, index=df.index)
    # Turn every objective into "larger is better".
    values = np.column_stack([df[m].to_numpy(float) * (1 if mode == "max" else -1) for m, mode in objectives])
    no_worse = (values[:, None, :] >= values[None, :, :]).all(axis=2)
    better = (values[:, None, :] > values[None, :, :]).any(axis=2)
    dominated = (no_worse & better).any(axis=0)
    return pd.Series(~dominated, index=df.index)


def representatives(front: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """One row per distinct objective vector of `front`, with a `trials` column counting the tied
    trials it stands for. The tie-break is the sampler's order: the first of the tied rows (the
    earliest trial), which makes the choice reproducible and never reads a test metric."""
    metrics = [m for m, _ in objectives]
    counts = front.groupby(metrics, sort=False, dropna=False)[metrics[0]].transform("size")
    first = ~front.duplicated(metrics, keep="first")
    return front.assign(trials=counts)[first]
