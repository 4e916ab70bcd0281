"""Hypervolume of a Pareto front: the objective-space volume it dominates up to a reference point.

Objectives are turned into minimisation (a maximised metric is negated), and parameter
counts and FLOPs (`params`, `extra_params`, `flops`) are measured in decades (log10), as the Pareto plot shows
them. The default reference point is 0 for a maximised metric (an accuracy) and, for a
minimised one, the next power of ten at or above the largest finished trial's value.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

LOG_METRICS = ("params", "extra_params", "flops")


def hypervolume(points, reference) -> float:
    """Volume dominated by `points` (rows; every objective minimised) and bounded by `reference`.
    Exact, by slicing along the first objective (fine for the small fronts of a sweep)."""
    pts = np.asarray(points, dtype=float).reshape(-1, len(reference))
    ref = np.asarray(reference, dtype=float)
    pts = pts[(pts < ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    if len(ref) == 1:
        return float(ref[0] - pts[:, 0].min())
    order = np.argsort(pts[:, 0], kind="stable")
    pts = pts[order]
    total = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, 0] if i + 1 < len(pts) else ref[0]
        width = upper - pts[i, 0]
        if width > 0:  # the slab [x_i, x_{i+1}) is dominated by the first i+1 points in the other objectives
            total += width * hypervolume(pts[: i + 1, 1:], ref[1:])
    return float(total)


def _scale(metric: str, values):
    values = np.asarray(values, dtype=float)
    return np.log10(values) if metric in LOG_METRICS else values


def default_reference(trials: pd.DataFrame, objectives: list[tuple[str, str]]) -> dict[str, float]:
    done = trials[(trials["status"] == "FINISHED") & (trials["phase"] == "search")]
    reference = {}
    for metric, mode in objectives:
        if mode == "max":
            reference[metric] = 0.0
        else:
            worst = float(done[metric].max()) if not done.empty else 1.0
            reference[metric] = 10.0 ** math.ceil(math.log10(worst)) if worst > 0 else 1.0
    return reference


def front_hypervolume(front: pd.DataFrame, objectives: list[tuple[str, str]],
                      reference: dict[str, float]) -> float:
    """Hypervolume of a front table in (maximised metrics, log10 parameter counts)."""
    if front.empty:
        return 0.0
    columns, ref = [], []
    for metric, mode in objectives:
        sign = -1.0 if mode == "max" else 1.0
        columns.append(sign * _scale(metric, front[metric].to_numpy(float)))
        ref.append(sign * float(_scale(metric, [reference[metric]])[0]))
    return hypervolume(np.column_stack(columns), ref)


def describe(objectives: list[tuple[str, str]], reference: dict[str, float]) -> str:
    axes = [f"{'log10 ' if m in LOG_METRICS else ''}{m} ({mode})" for m, mode in objectives]
    ref = ", ".join(f"{m} = {reference[m]:g}" for m, _ in objectives)
    return f"over {' x '.join(axes)}; reference point {ref}"
