"""report.html: one self-contained page (plotly.js inlined; opens from disk with no network):
the interactive Pareto plot, parallel coordinates over the searched parameters, and the tables."""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from kdtune import results
from kdtune.report.tables import recipe

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left} .note{color:#555;font-size:13px}
"""


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def table_html(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    if df is None or df.empty:
        return "<p class='note'>(none)</p>"
    shown = df[[c for c in (columns or list(df.columns)) if c in df.columns]]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in shown.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pareto_figure(trials: pd.DataFrame, front: pd.DataFrame, metric: str):
    import plotly.graph_objects as go

    done = results.finished(trials[trials["phase"] == "search"])
    columns = results.method_columns(trials)
    fig = go.Figure()
    for loss, group in done.groupby("loss"):
        hover = [f"<b>{html.escape(str(r['trial_id']))}</b> method {html.escape(str(r['loss']))}<br>"
                 f"{html.escape(recipe(r, columns))}<br>params {int(r['params']):,}<br>"
                 f"val_acc {r['val_acc']:.4f}, test_acc {r['test_acc']:.4f}" for _, r in group.iterrows()]
        fig.add_trace(go.Scatter(x=group["params"], y=group[metric], mode="markers", name=str(loss),
                                 marker={"size": 10, "opacity": 0.85}, text=hover, hoverinfo="text"))
    if not front.empty:
        confirmed = "seeds" in front.columns
        hover = [f"<b>front</b> method {html.escape(str(r['loss']))}<br>{html.escape(recipe(r, columns))}<br>"
                 f"params {int(r['params']):,}<br>{metric} {r[metric]:.4f}, test_acc {r['test_acc']:.4f}"
                 + (f" ± {r['test_acc_std']:.4f} over {int(r['seeds'])} seeds" if confirmed and not pd.isna(r.get('test_acc_std')) else "")
                 for _, r in front.iterrows()]
        fig.add_trace(go.Scatter(x=front["params"], y=front[metric], mode="lines+markers", line_shape="hv",
                                 name="Pareto front" + (" (confirmed means)" if confirmed else ""),
                                 line={"color": "black", "width": 1.5}, marker={"symbol": "diamond-open", "size": 13},
                                 text=hover, hoverinfo="text"))
    fig.update_layout(title=f"{len(done)} finished search trials; front of {len(front)}", height=480,
                      xaxis={"type": "log", "title": "student parameters (deployable)"},
                      yaxis={"title": metric}, hovermode="closest", template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def parallel_figure(trials: pd.DataFrame, metric: str):
    """One line per finished search trial over every searched parameter, coloured by `metric`.
    A method's own parameter is 'n/a' on the other methods' lines; lr-like ranges on a log axis."""
    import plotly.graph_objects as go

    done = results.finished(trials[trials["phase"] == "search"]).reset_index(drop=True)
    if done.empty:
        return None
    dims = []
    for column in ["loss", "student.arch", "width"] + results.method_columns(trials) + ["params", metric]:
        if column not in done.columns or done[column].isna().all():
            continue
        values = done[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric[values.notna()].notna().all():
            label, data = column, numeric.astype(float)
            positive = data.dropna()
            if len(positive) and (positive > 0).all() and positive.max() / positive.min() >= 20:
                label, data = f"log10 {column}", np.log10(data)
            if data.isna().any():  # not applicable to some trials: a tick below the range
                low, high = data.min(), data.max()
                na = low - max((high - low) * 0.15, 1e-3)
                ticks = list(np.linspace(low, high, 4))
                dims.append({"label": label, "values": data.fillna(na), "range": [na, high],
                             "tickvals": [na] + ticks, "ticktext": ["n/a"] + [f"{t:.3g}" for t in ticks]})
            else:
                dims.append({"label": label, "values": data})
        else:
            cats = sorted(values.dropna().astype(str).unique())
            codes = values.astype(str).map({c: i for i, c in enumerate(cats)})
            if values.isna().any():
                cats, codes = ["n/a"] + cats, codes.where(values.notna(), -1) + 1
            dims.append({"label": column, "values": codes.astype(float), "tickvals": list(range(len(cats))),
                         "ticktext": cats, "range": [0, max(len(cats) - 1, 1)]})
    fig = go.Figure(go.Parcoords(line={"color": done[metric].astype(float), "colorscale": "Viridis",
                                       "showscale": True, "colorbar": {"title": metric}}, dimensions=dims))
    fig.update_layout(title=f"Searched parameters of the finished search trials, coloured by {metric}", height=460,
                      margin={"l": 80, "r": 60, "t": 100, "b": 30})
    return fig


def write_page(path, title: str, subtitle: str, trials: pd.DataFrame, front: pd.DataFrame, gain: pd.DataFrame,
               methods: pd.DataFrame, importances: pd.DataFrame, hv_text: str, metric: str, notes: list[str],
               which: pd.DataFrame | None = None) -> None:
    pareto = pareto_figure(trials, front, metric)
    parallel = parallel_figure(trials, metric)
    plots = pareto.to_html(full_html=False, include_plotlyjs=True, div_id="pareto", config={"responsive": True})
    if parallel is not None:
        plots_par = parallel.to_html(full_html=False, include_plotlyjs=False, div_id="parallel")
    else:
        plots_par = "<p class='note'>no finished trial</p>"
    confirmed = "test_acc_std" in front.columns
    front_cols = (["loss"] + results.method_columns(front) + ["student", "params", "val_acc", "test_acc"]
                  + results.evaluation_columns(front.columns)
                  + (["test_acc_std", "seeds", "source_trial"] if confirmed else []) + ["trial_id", "basis", "sweep_name"])
    trial_cols = [c for c in trials.columns if c not in ("node_id", "sweep", "model_uri")]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(subtitle)}</p>",
        "<h2>Pareto front</h2>", plots,
        f"<p class='note'>Hypervolume {html.escape(hv_text)}</p>",
        table_html(front, front_cols),
        "<h2>Searched parameters</h2>", plots_par,
        "<h2>KD gain per student size</h2>", table_html(gain),
        *(["<h2>Which teacher, per student size</h2>", table_html(which)] if which is not None and not which.empty
          else []),
        "<h2>Methods</h2>", table_html(methods),
        f"<h2>Parameter importances for {html.escape(metric)} (Optuna, fANOVA)</h2>", table_html(importances),
        *[f"<p class='note'>{html.escape(n)}</p>" for n in notes],
        f"<h2>Trials</h2><details><summary>{len(trials)} runs</summary>", table_html(trials, trial_cols), "</details>",
        "</body></html>",
    ]
    results.write_atomic(Path(path), lambda tmp: Path(tmp).write_text("\n".join(parts), encoding="utf-8"))
