"""Write a report folder from a trials table: the sweep's files, the analysis tables and report.html."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdtune import confirm, results
from kdtune.report import hypervolume as hv
from kdtune.report.importance import importances
from kdtune.report.page import write_page
from kdtune.report.plot3d import write_front_3d
from kdtune.report.tables import accuracy_metric, methods_table, objectives, tables

FILES = ("trials.csv", "pareto.csv", "pareto.png", "kd_gain.csv", "methods.csv", "importances.csv",
         "hypervolume.json", "report.html")  # and pareto-3d.html for three objectives


def write_report(trials: pd.DataFrame, spec_dict: dict, out_dir: Path, title: str, subtitle: str = "",
                 reference: dict | None = None, teacher_acc: float | None = None) -> dict:
    """Every report file in `out_dir`; returns the front, gain, methods, importances and hypervolume.
    With the teacher's test accuracy (one sweep), the front shows it beside each student, as the
    sweep's pareto.csv does."""
    out_dir = Path(out_dir)
    objs = objectives(spec_dict)
    metric = accuracy_metric(objs)
    trials = results.mark_search_front(trials, objs)
    front, gain = tables(trials, objs)
    if teacher_acc is not None and not pd.isna(teacher_acc):
        front, _ = results.teacher_gap(trials, front, gain, float(teacher_acc))
    if "sweep_name" in trials.columns and "sweep_name" not in front.columns and "sweep" in trials.columns:
        names = trials.drop_duplicates("sweep").set_index("sweep")["sweep_name"]
        if "sweep" in front.columns:
            front = front.assign(sweep_name=front["sweep"].map(names))
    which = confirm.which_teacher(trials, objs) if "sweep" not in trials.columns or trials["sweep"].nunique() <= 1 \
        else pd.DataFrame()
    methods = methods_table(trials)
    notes = []
    try:
        ranked = importances(trials, spec_dict, metric)
    except Exception as exc:  # noqa: BLE001 - a report without importances is still a report
        ranked, notes = pd.DataFrame(columns=["param", "importance"]), [f"importances unavailable: {exc}"]
    reference = {**hv.default_reference(trials, objs), **(reference or {})}
    volume = hv.front_hypervolume(front, objs, reference)
    hv_info = {"hypervolume": volume, "objectives": [{"metric": m, "mode": mode, "log10": m in hv.LOG_METRICS}
                                                     for m, mode in objs],
               "reference_point": reference, "front_size": len(front), "description": hv.describe(objs, reference)}
    results.write_csv(trials.drop(columns=["model_uri"], errors="ignore"), out_dir / "trials.csv")
    results.write_csv(front, out_dir / "pareto.csv")
    results.plot_pareto(trials, front, out_dir / "pareto.png", metric, results.cost_metrics(objs))
    if len(objs) == 3:
        write_front_3d(trials, front, objs, out_dir / "pareto-3d.html")
    results.write_csv(gain, out_dir / "kd_gain.csv")
    if not which.empty:
        results.write_csv(which, out_dir / "which_teacher.csv")
    results.write_csv(methods, out_dir / "methods.csv")
    results.write_csv(ranked, out_dir / "importances.csv")
    results.write_json(hv_info, out_dir / "hypervolume.json")
    write_page(out_dir / "report.html", title, subtitle, trials, front, gain, methods, ranked,
               f"{volume:.4f} {hv_info['description']}", metric, notes, which)
    return {"trials": trials, "front": front, "gain": gain, "which": which, "methods": methods, "importances": ranked,
            "hypervolume": hv_info, "metric": metric}


def terminal(report: dict, out_dir: Path) -> str:
    """What `python -m kdtune.report` prints: the front, KD gain, methods, importances, hypervolume."""
    counts = report["trials"][report["trials"]["phase"] == "search"]["status"].value_counts().to_dict()
    info = report["hypervolume"]
    ranked = report["importances"]
    lines = [results.terminal_report(report["front"], report["gain"], counts, which=report["which"]),
             *(["Front of several sweeps, each row on its sweep's own basis: " + "; ".join(
                 f"{int(r['params']):,} params: {r['basis']} ({r.get('sweep_name', r['sweep'])})"
                 for _, r in report["front"].iterrows())] if "basis" in report["front"].columns else []),
             "\nMethods (search trials):",
             results.show(report["methods"], list(report["methods"].columns)),
             f"\nParameter importances for {report['metric']} (fANOVA):",
             results.show(ranked, ["param", "importance"]),
             f"\nHypervolume of the front: {info['hypervolume']:.4f} {info['description']}",
             f"\nreport: {Path(out_dir) / 'report.html'} (and {', '.join(f for f in FILES if f != 'report.html')})"]
    return "\n".join(lines)
