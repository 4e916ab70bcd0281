"""The report's tables, computed with the sweep's own functions (kdtune.results, confirm),
so a report rebuilt from MLflow shows the front the sweep wrote."""
from __future__ import annotations

import numpy as np
import pandas as pd

from kdtune import confirm, results
from kdtune.spec import ARCH_METRICS


def objectives(spec_dict: dict) -> list[tuple[str, str]]:
    found = (spec_dict.get("search") or {}).get("objectives") or [
        {"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}]
    return [(o["metric"], o["mode"]) for o in found]


def accuracy_metric(objs: list[tuple[str, str]]) -> str:
    return next((m for m, _ in objs if m not in ARCH_METRICS + ("extra_params",)), "val_acc")


def tables(trials: pd.DataFrame, objs: list[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One sweep: its own tables. Several (a `sweep` column): each sweep's front, then the
    students no other sweep's front dominates (`basis` says whether a row is a confirmed mean or
    a single search trial); the KD-gain rows of every sweep."""
    if "sweep" not in trials.columns or trials["sweep"].nunique() <= 1:
        return confirm.tables(trials, objs)
    fronts, gains = [], []
    for sweep, group in trials.groupby("sweep", sort=False):
        front, gain = confirm.tables(group, objs)
        # a confirmed mean and a single search trial are not alike (the best of many draws is high):
        # the table says which each row is
        fronts.append(front.assign(sweep=sweep, basis="confirmed mean" if "seeds" in front.columns else "search trial"))
        gains.append(gain.assign(sweep=sweep))
    front = pd.concat(fronts, ignore_index=True)
    if not front.empty:
        front = confirm.confirmed_front(front, objs)
    return front, pd.concat(gains, ignore_index=True)


def recipe(row: pd.Series, columns: list[str]) -> str:
    """`loss kd, gapnet 6, train.lr 0.003, kd.alpha 0.5` for one trial."""
    parts = [f"loss {row['loss']}", str(row["student"])]
    for column in columns:
        value = row.get(column)
        if value is not None and not (isinstance(value, float) and np.isnan(value)):
            parts.append(f"{column} {value:.4g}" if isinstance(value, float) else f"{column} {value}")
    return ", ".join(parts)


def methods_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per method, over the search trials: how many, how many finished, best and median
    val/test accuracy, and the best trial's parameters."""
    search = trials[trials["phase"] == "search"]
    columns = results.method_columns(trials)
    rows = []
    for loss, group in search.groupby("loss"):
        done = results.finished(group)
        row = {"method": loss, "trials": len(group), "finished": len(done)}
        if not done.empty:
            best = done.loc[done["val_acc"].idxmax()]
            row.update({"best_val_acc": done["val_acc"].max(), "median_val_acc": done["val_acc"].median(),
                        "best_test_acc": done["test_acc"].max(), "median_test_acc": done["test_acc"].median(),
                        "best_trial": best["trial_id"], "best_params": recipe(best, [c for c in columns
                                                                                      if c.startswith(f"{loss}.") or c.startswith("train.")])})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("best_val_acc", ascending=False, na_position="last").reset_index(drop=True) if "best_val_acc" in table else table
