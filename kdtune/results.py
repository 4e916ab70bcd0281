"""What a sweep writes: trials.csv, pareto.csv, pareto.png, summary.json, and the terminal tables."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd

from kdtune.models import MODELS
from kdtune.pareto import pareto_mask, representatives

BASE_COLUMNS = ["trial_id", "phase", "loss", "student.arch", "width", "student"]
METRIC_COLUMNS = ["params", "extra_params", "flops", "latency_ms", "model_mb", "feasible", "val_acc", "test_acc", "epochs", "teacher_passes", "status", "reason",
                  "mlflow_run_id", "node_id"]
OWN_SCORES = ("val_acc", "val_loss", "test_acc", "test_loss", "test_acc_std")  # kdtune's accuracy, not `evaluate`'s


def evaluation_columns(names) -> list[str]:
    """The `evaluate` function's metrics among `names` (result keys, columns): its val_<name>
    columns, then its test_<name> columns, each sorted."""
    found = sorted({n for n in names if isinstance(n, str) and n.startswith(("val_", "test_")) and n not in OWN_SCORES})
    return [n for n in found if n.startswith("val_")] + [n for n in found if n.startswith("test_")]


def selection(objectives) -> tuple[str, str]:
    """(validation metric, mode) that picks each student size's best trial for the KD gain and
    confirmation: the first objective on accuracy or on an `evaluate` metric, else val_acc."""
    return next(((m, mode) for m, mode in objectives if m.startswith("val_") and m != "val_loss"), ("val_acc", "max"))


def test_metric(val_metric: str) -> str:
    """val_f1 -> test_f1: the held-out counterpart a KD gain is measured on."""
    return "test_" + val_metric.removeprefix("val_")


def best(group: pd.DataFrame, metric: str, mode: str) -> pd.Series:
    return group.loc[group[metric].idxmax() if mode == "max" else group[metric].idxmin()]


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def trials_frame(rows: list[dict], param_columns: list[str]) -> pd.DataFrame:
    """trials.csv's layout: the trial, its parameters, kdtune's metrics with the `evaluate`
    function's (val_<name>, test_<name>) after test_acc, then its status."""
    extra = evaluation_columns({k for row in rows for k in row})
    at = METRIC_COLUMNS.index("test_acc") + 1
    columns = (BASE_COLUMNS + [c for c in param_columns if c not in BASE_COLUMNS] + METRIC_COLUMNS[:at] + extra
               + METRIC_COLUMNS[at:])
    df = pd.DataFrame(rows, columns=columns)
    return df.reset_index(drop=True)  # Tune's trial order: the order the sampler proposed them


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """Trials that ran all their epochs: the only ones whose metrics may enter a table."""
    return df[df["status"] == "FINISHED"]


def pareto_table(df: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """The search front: finished trials only (an infeasible one never trained), one row per
    distinct objective vector (kdtune.pareto.representatives)."""
    done = finished(df[df["phase"] == "search"])
    front = representatives(done[pareto_mask(done, objectives)], objectives)
    return front.sort_values("params").reset_index(drop=True)


def mark_search_front(df: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """trials.csv's `search_front` column: the search trials on the search phase's own front."""
    front = pareto_table(df, objectives)
    return df.assign(search_front=df["trial_id"].isin(front["trial_id"]) & (df["phase"] == "search"))


def method_columns(df: pd.DataFrame) -> list[str]:
    """The searched dotted parameters (train.lr, kd.alpha, ...) that have a value somewhere;
    an arch's own keys (cnn.width) are left to the resolved `width` column."""
    return [c for c in df.columns if "." in c and c not in BASE_COLUMNS and c.split(".")[0] not in MODELS
            and ":" not in c and df[c].notna().any()]


def kd_gain_table(df: pd.DataFrame, objectives=()) -> pd.DataFrame:
    """Per student size: the best baseline against the best distilled trial, chosen on the selection
    metric (val_acc unless an objective names an `evaluate` metric) and compared on its test counterpart."""
    metric, mode = selection(objectives)
    test = test_metric(metric)
    done = finished(df[df["phase"] == "search"])
    rows = []
    for student, group in done.groupby("student"):
        base = group[group["loss"] == "none"]
        kd = group[group["loss"] != "none"]
        if base.empty or kd.empty:
            continue
        b, k = best(base, metric, mode), best(kd, metric, mode)
        rows.append({"student": student, "student.arch": b["student.arch"], "width": b["width"], "params": int(b["params"]),
                     f"baseline_{metric}": b[metric], f"baseline_{test}": b[test],
                     "best_method": k["loss"], f"kd_{metric}": k[metric], f"kd_{test}": k[test],
                     "test_gain": k[test] - b[test]})
    return pd.DataFrame(rows)


COST_LABELS = {"params": "student parameters (deployable)", "flops": "FLOPs per image",
               "latency_ms": "latency (ms per batch)", "model_mb": "serialized size (MB)", "extra_params": "extra parameters"}


def cost_metrics(objectives) -> list[str]:
    """The objectives a plot puts on its x axes: the costs (size, FLOPs, latency), else params."""
    return [m for m, _ in objectives if m in COST_LABELS] or ["params"]


def plot_pareto(df: pd.DataFrame, front: pd.DataFrame, path: Path, metric: str = "val_acc",
                costs: list[str] = ("params",)) -> None:
    """Every finished trial coloured by method, against each cost (log scale), one panel each; the
    front marked on every panel, and drawn as a step line where it has only that one cost."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = finished(df[df["phase"] == "search"])
    fig, axes = plt.subplots(1, len(costs), figsize=(7 * len(costs), 4.5), squeeze=False)
    label = "Pareto front (confirmed means)" if "seeds" in front.columns else "Pareto front"
    for cost, ax in zip(costs, axes[0]):
        for loss, group in done.groupby("loss"):
            ax.scatter(group[cost], group[metric], label=loss, s=28, alpha=0.8)
        if not front.empty and len(costs) == 1:
            ordered = front.sort_values(cost)
            ax.step(ordered[cost], ordered[metric], where="post", color="black", lw=1.2, label=label)
        elif not front.empty:
            ax.scatter(front[cost], front[metric], s=90, facecolors="none", edgecolors="black", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(COST_LABELS[cost])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(done)} finished trials; front of {len(front)}")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(data: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str)))


def show(df: pd.DataFrame, columns: list[str]) -> str:
    if df.empty:
        return "  (none)"
    shown = df[[c for c in columns if c in df.columns]]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


GAP_WARNING = 0.005  # within half a point of the best baseline student, a teacher has little to teach


def gap_warning(teacher_acc: float, best: float) -> str | None:
    """What the teacher's test accuracy says against the best baseline student's: below it, the
    teacher cannot teach it; level with it (within GAP_WARNING), little; clearly above, no warning."""
    gap = teacher_acc - best
    numbers = f"the teacher ({teacher_acc:.2%}) is {abs(gap) * 100:.2f} points"
    if gap <= -GAP_WARNING:
        return (f"{numbers} below the best baseline student ({best:.2%}): it cannot teach it; "
                "train it longer or give a checkpoint")
    if gap < GAP_WARNING:
        return (f"{numbers} {'above' if gap >= 0 else 'below'} the best baseline student ({best:.2%}): level with it "
                f"(within {GAP_WARNING * 100:.1f} points), it has little to teach, so a 'no clear gain' verdict says little")
    return None


def teacher_gap(trials: pd.DataFrame, front: pd.DataFrame, gain: pd.DataFrame, teacher_acc: float) -> tuple[pd.DataFrame, dict]:
    """The front with the teacher's test accuracy beside each student's, and the gap to the best
    baseline, with a warning when the teacher is not clearly better than the students it teaches."""
    front = front.assign(teacher_test_acc=teacher_acc, teacher_gap=teacher_acc - front["test_acc"])
    baselines = finished(trials[(trials["phase"] == "search") & (trials["loss"] == "none")])["test_acc"]
    if "baseline_test_acc" in gain.columns:
        baselines = pd.concat([baselines, gain["baseline_test_acc"]])
    best = float(baselines.max()) if baselines.notna().any() else None
    warning = gap_warning(teacher_acc, best) if best is not None else None
    return front, {"teacher_test_acc": teacher_acc, "best_baseline_test_acc": best, "warning": warning}


def terminal_report(front: pd.DataFrame, gain: pd.DataFrame, counts: dict, gap: dict | None = None,
                    which: pd.DataFrame | None = None) -> str:
    """The end-of-sweep tables: the front (beside the teacher), the KD gain, which teacher (with
    several), and how many trials each status had."""
    confirmed = "test_acc_std" in front.columns
    columns = (["loss"] + method_columns(front) + ["student", "params", "flops", "latency_ms", "model_mb", "val_acc",
                                                   "test_acc"] + evaluation_columns(front.columns)
               + (["test_acc_std", "seeds"] if confirmed else ["trials"]) + ["teacher_gap", "quantized"])
    chosen_on = next((c.removeprefix("baseline_") for c in gain.columns if c.startswith("baseline_val_")), "val_acc")
    excluded = {k: v for k, v in counts.items() if k != "FINISHED"}
    note = "; ".join(f"{v} {k.lower()} excluded" for k, v in sorted(excluded.items()))
    title = "confirmed means over fresh seeds" if confirmed else "search trials"
    return "\n".join([
        f"\nPareto-optimal students ({title}; {counts.get('FINISHED', 0)} finished search trials{'; ' + note if note else ''}):",
        show(front, columns),
        "\nKD gain per student size (" + ("paired over seeds, 95% interval" if "verdict" in gain.columns
                                           else f"best baseline vs best distilled, chosen on {chosen_on}") + "):",
        show(gain, list(gain.columns)),
        *(["\nWhich teacher, per student size (confirmed best from each, paired over seeds against its "
           "no-KD baseline, 95% interval):", show(which, list(which.columns))] if which is not None and not which.empty
          else []),
        "\nstatus: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    ] + ([f"\nteacher test_acc {gap['teacher_test_acc']:.4f}; best baseline {gap['best_baseline_test_acc'] or float('nan'):.4f}"]
         if gap else []) + ([f"WARNING: {gap['warning']}"] if gap and gap["warning"] else []))
