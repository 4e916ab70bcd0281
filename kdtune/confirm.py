"""Confirmation: retrain the front with fresh seeds, so the tables survive a rerun.

A search's best trial is the maximum of many noisy draws. Each Pareto-optimal student size
(and each family's best distilled size, so that every family is compared) gets its best
distilled and best baseline configuration retrained with `search.confirm_seeds` new seeds
(init and data order); the final front uses the means, and the KD gain is a paired
difference per seed with a 95% t-interval.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from kdtune.pareto import pareto_mask
from kdtune.results import best, evaluation_columns, finished, kd_gain_table, pareto_table, selection, test_metric


def candidates(trials: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """Best baseline and best distilled search trial (on the selection metric: val_acc, or the first
    objective on an `evaluate` metric) at every student size on the front, and at the best distilled
    size of each family with no size on it: every family gets a KD-gain row (the default spec's MLP is
    its positive control, dominated on the front by the conv nets)."""
    metric, mode = selection(objectives)
    done = finished(trials[trials["phase"] == "search"])
    students = list(pareto_table(trials, objectives)["student"].drop_duplicates())
    on_front = set(done.loc[done["student"].isin(students), "student.arch"])
    for arch, group in done[done["loss"] != "none"].groupby("student.arch"):
        if arch not in on_front:
            students.append(best(group, metric, mode)["student"])
    picks = []
    for student in students:
        same = done[done["student"] == student]
        distilled = same[same["loss"] != "none"]
        for group in (same[same["loss"] == "none"], distilled):
            if not group.empty:
                picks.append(best(group, metric, mode))
        if not distilled.empty and "teacher" in distilled.columns:  # and the best from each teacher (which teacher)
            for _, group in distilled.groupby(teacher_of(distilled), sort=True):
                found = best(group, metric, mode)
                if found["trial_id"] not in {p["trial_id"] for p in picks}:
                    picks.append(found)
    return pd.DataFrame(picks).reset_index(drop=True)


def teacher_of(trials: pd.DataFrame) -> pd.Series:
    """What each distilled trial learnt from: its teacher's name, or `(method)` for a method that
    reads no teacher (dml, byot)."""
    return trials["teacher"].where(trials["teacher"].notna(), "(" + trials["loss"] + ")")


def seeds(base_seed: int, count: int) -> list[int]:
    return [base_seed + 1 + i for i in range(count)]


def paired_interval(differences) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (NaN bounds with fewer than two)."""
    d = np.asarray(differences, dtype=float)
    mean = float(d.mean()) if len(d) else math.nan
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """Plain words for an interval; NaN bounds (one seed) are never a clear answer."""
    if low > 0:
        return "gain"
    if high < 0:
        return "loss"
    return "no clear gain"


def confirmed_means(runs: pd.DataFrame, picks: pd.DataFrame) -> pd.DataFrame:
    """One row per confirmed configuration: the search trial's columns with mean metrics over seeds
    (kdtune's accuracy and every `evaluate` metric)."""
    done = finished(runs)
    means = ["val_acc", "test_acc"] + evaluation_columns(done.columns)
    grouped = done.groupby("source_trial").agg(**{m: (m, "mean") for m in means}, test_acc_std=("test_acc", "std"),
                                               seeds=("seed", "count"))
    base = picks.drop(columns=means + ["phase", "status", "reason", "mlflow_run_id", "node_id",
                                       "epochs", "seed", "source_trial"], errors="ignore")
    merged = base.rename(columns={"trial_id": "source_trial"}).merge(grouped, on="source_trial")
    return merged


def confirmed_front(means: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    return means[pareto_mask(means, objectives)].sort_values("params").reset_index(drop=True)


def tables(trials: pd.DataFrame, objectives: list[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(front, KD gain) of one sweep: on confirmed means when confirmation ran to the end, else on
    the search trials. The sweep and the report rebuilt from MLflow both use it, so they agree."""
    reruns = trials[trials["phase"] == "confirm"]
    if reruns.empty or (reruns["status"] == "KILLED").any():
        return pareto_table(trials, objectives), kd_gain_table(trials, objectives)
    picks = candidates(trials, objectives)
    return confirmed_front(confirmed_means(reruns, picks), objectives), gain_table(reruns, picks, objectives)


def paired(done: pd.DataFrame, base_trial: str, kd_trial: str, test: str) -> pd.DataFrame:
    """The two configurations' confirmation runs side by side by seed (columns base, kd)."""
    runs = [done[done["source_trial"] == trial].set_index("seed")[test] for trial in (base_trial, kd_trial)]
    return pd.concat(runs, axis=1, keys=["base", "kd"]).dropna()


def which_teacher(trials: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """Per student size, the confirmed best configuration from each teacher (and each teacher-free
    method), against the no-KD baseline of that size, paired by seed with its 95% interval, as the
    KD-gain table. Empty for a sweep without a teacher column or without complete confirmation."""
    reruns = trials[trials["phase"] == "confirm"]
    if "teacher" not in trials.columns or reruns.empty or (reruns["status"] == "KILLED").any():
        return pd.DataFrame()
    picks = candidates(trials, objectives)
    test, done, rows = test_metric(selection(objectives)[0]), finished(reruns), []
    for student, group in picks.groupby("student"):
        base, kd = group[group["loss"] == "none"], group[group["loss"] != "none"]
        if base.empty:
            continue
        for (teacher, _), pick in kd.assign(teacher=teacher_of(kd)).groupby(["teacher", "trial_id"], sort=False):
            both = paired(done, base.iloc[0]["trial_id"], pick.iloc[0]["trial_id"], test)
            mean, low, high = paired_interval(both["kd"] - both["base"])
            rows.append({"student": student, "params": int(base.iloc[0]["params"]), "teacher": teacher,
                         "method": pick.iloc[0]["loss"], f"baseline_{test}": both["base"].mean(),
                         f"kd_{test}": both["kd"].mean(), "kd_std": both["kd"].std(), "gain": mean,
                         "ci95_low": low, "ci95_high": high, "seeds": len(both), "verdict": verdict(low, high)})
    table = pd.DataFrame(rows)
    return table.sort_values(["params", f"kd_{test}"], ascending=[True, False]).reset_index(drop=True) if rows else table


def gain_table(runs: pd.DataFrame, picks: pd.DataFrame, objectives=()) -> pd.DataFrame:
    """Per student size: distilled minus baseline on the test counterpart of the selection metric
    (test accuracy by default), paired by seed, with its interval."""
    test = test_metric(selection(objectives)[0])
    done = finished(runs)
    rows = []
    for student, group in picks.groupby("student"):
        base, kd = group[group["loss"] == "none"], group[group["loss"] != "none"]
        if base.empty or kd.empty:
            continue
        both = paired(done, base.iloc[0]["trial_id"], kd.iloc[0]["trial_id"], test)
        mean, low, high = paired_interval(both["kd"] - both["base"])
        first = base.iloc[0]
        rows.append({"student": student, "student.arch": first["student.arch"], "width": first["width"],
                     "params": int(first["params"]),
                     "method": kd.iloc[0]["loss"],
                     f"baseline_{test}": both["base"].mean(), "baseline_std": both["base"].std(),
                     f"kd_{test}": both["kd"].mean(), "kd_std": both["kd"].std(),
                     "gain": mean, "ci95_low": low, "ci95_high": high, "seeds": len(both),
                     "verdict": verdict(low, high)})
    return pd.DataFrame(rows)
