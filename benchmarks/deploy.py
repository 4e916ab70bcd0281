"""Deployment figures on this CPU (docs/deploying.md): repeatability of the latency measurement,
latency against parameters for the default spec's students, a sweep constrained at the median
student's latency (infeasible trainings counted), and from a default sweep's results (the
README's set-up command): the share of its wall time spent measuring, and its front's int8 copies
against float.

    python -m kdtune.sweep search_spaces/mnist.yaml                                   # results/mnist-kd
    PYTHONPATH=. python benchmarks/deploy.py --data-root DIR --default-results results/mnist-kd

Writes benchmarks/deploy.json and benchmarks/deploy-latency.png beside this file (about 5 minutes
on 2 cores). The ties benchmark is benchmarks/scale.py --ties.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd

import kdtune
from kdtune.measure import Measurer, arch_key
from kdtune.space import parse_space, resolve

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parent / "search_spaces" / "mnist.yaml"
LIGHT = {"data.train_limit": 3000, "data.val_size": 500, "data.test_limit": 1000, "teacher.epochs": 1,
         "train.epochs": 1, "search.num_samples": 8, "search.confirm_seeds": 0}


def default_students(spec) -> list:
    """Each student architecture of the default spec's space (gapnet 4/6/12, mlp 64/256)."""
    return [resolve(spec, {k: v for k, v in point.items() if k != "loss"}).spec.student
            for point in parse_space(spec).baseline_points()]


def measured(students, repeat: int, timing_seconds: float) -> tuple[list[dict], float]:
    """Every student measured by `repeat` fresh measurers (no cache shared), each timing them
    together as a sweep's driver does before any trial; seconds of the first pass."""
    rows, first_s = [], 0.0
    for attempt in range(repeat):
        measurer = Measurer((1, 28, 28), 10, timing_seconds=timing_seconds)
        started = time.perf_counter()
        figures = measurer.measure_all(students)
        for student in students:
            rows.append({"attempt": attempt, "student": f"{student.arch} {student.width}",
                         **figures[arch_key(student)]})
        if attempt == 0:
            first_s = time.perf_counter() - started
    return rows, first_s


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(table["params"], table["latency_ms"])
    for _, row in table.iterrows():
        ax.annotate(row["student"], (row["params"], row["latency_ms"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("latency (ms, batch 1, 1 thread)")
    ax.set_title("default spec's students: latency against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def constrained_sweep(data_root: str, max_latency: float) -> dict:
    """The default space on a light budget, constrained at `max_latency` ms: infeasible trials
    are counted by the sweep's own figures (it measures every architecture again)."""
    spec = kdtune.load_spec(DEFAULT, {**LIGHT, "data.root": data_root, "name": "deploy-bench",
                                      "search.constraints": [{"metric": "latency_ms", "max": max_latency}]})
    with tempfile.TemporaryDirectory() as folder:
        started = time.time()
        result = kdtune.run(spec, results_dir=Path(folder) / "results", tracking_uri=f"sqlite:///{folder}/mlflow.db")
        wall = time.time() - started
        trials = pd.read_csv(result.results_dir / "trials.csv")
        front = pd.read_csv(result.results_dir / "pareto.csv")
    trained = trials[trials["epochs"] > 0]
    int8 = []
    for _, row in front.iterrows():
        if isinstance(row.get("quantized"), str) and row["quantized"]:
            int8.append({"student": row["student"], "test_acc": row["test_acc"], "quantized": row["quantized"]})
    return {"max_latency_ms": max_latency, "wall_seconds": round(wall, 1), "trials": len(trials),
            "infeasible_recorded": int((trials["status"] == "INFEASIBLE").sum()),
            "infeasible_trained": int((~trained["feasible"].astype(bool)).sum()),
            "trained_over_the_bound": int((trained["latency_ms"] > max_latency).sum()),
            "front": front[["student", "params", "latency_ms", "val_acc", "test_acc"]].to_dict("records"),
            "int8": int8}


def default_sweep(folder: Path) -> dict:
    """What a default sweep's own results say: its wall time, the share spent measuring, its int8 copies."""
    summary = json.loads((folder / "summary.json").read_text())
    front = pd.read_csv(folder / "pareto.csv")
    wall = summary["wall_seconds"]
    return {"date": date.fromtimestamp((folder / "summary.json").stat().st_mtime).isoformat(),
            "wall_seconds": wall, "measuring_share": round(wall["measuring"] / wall["total"], 4),
            "int8": front[["student", "params", "test_acc", "quantized"]].to_dict("records")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--default-results", required=True, type=Path,
                        help="a default sweep's results folder (python -m kdtune.sweep search_spaces/mnist.yaml)")
    args = parser.parse_args()
    spec = kdtune.load_spec(DEFAULT)
    students = default_students(spec)
    rows, measure_s = measured(students, 2, spec.deploy.timing_seconds)
    both = pd.DataFrame(rows).pivot_table(index="student", columns="attempt", values="latency_ms")
    repeat = {s: {"first_ms": round(r[0], 4), "second_ms": round(r[1], 4),
                  "difference": round(abs(r[1] - r[0]) / r[0], 4)} for s, r in both.iterrows()}
    table = pd.DataFrame([r for r in rows if r["attempt"] == 0]).drop(columns="attempt")
    table["params_rank"] = table["params"].rank().astype(int)
    table["latency_rank"] = table["latency_ms"].rank().astype(int)
    plot(table, HERE / "deploy-latency.png")
    sweep = constrained_sweep(args.data_root, float(table["latency_ms"].median()))  # the sweep measures anew
    out = {"date": date.today().isoformat(), "load_average_at_start": os.getloadavg(),
           "repeatability": repeat, "max_difference": max(v["difference"] for v in repeat.values()),
           "students": table.round(5).to_dict("records"), "measuring_seconds": round(measure_s, 2),
           "constrained_sweep": sweep, "default_sweep": default_sweep(args.default_results)}
    (HERE / "deploy.json").write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
