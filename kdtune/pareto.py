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
