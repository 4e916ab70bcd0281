"""The interactive chart of a three-objective front: every finished trial in a plotly 3-D scatter,
the front marked, in one self-contained HTML file (plotly.js inlined, so it opens offline)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdtune import results


def write_front_3d(trials: pd.DataFrame, front: pd.DataFrame, objectives: list[tuple[str, str]], path: Path) -> None:
    import plotly.graph_objects as go

    done = results.finished(trials[trials["phase"] == "search"])
    x, y, z = (m for m, _ in objectives)
    hover = "trial %{text}<br>" + "<br>".join(f"{m} %{{{axis}}}" for m, axis in zip((x, y, z), "xyz"))
    fig = go.Figure()
    for loss, group in done.groupby("loss"):
        fig.add_trace(go.Scatter3d(x=group[x], y=group[y], z=group[z], mode="markers", name=loss,
                                   text=group["trial_id"], hovertemplate=hover, marker={"size": 4, "opacity": 0.7}))
    if not front.empty:
        fig.add_trace(go.Scatter3d(x=front[x], y=front[y], z=front[z], mode="markers", name="Pareto front",
                                   text=front.get("trial_id", front.get("source_trial")), hovertemplate=hover,
                                   marker={"size": 8, "color": "rgba(0,0,0,0)", "line": {"color": "black", "width": 2}}))
    log = {m: {"type": "log"} for m in results.COST_LABELS if m != "latency_ms"}
    fig.update_layout(title=f"{len(done)} finished trials; front of {len(front)}",
                      scene={"xaxis": {"title": x, **log.get(x, {})}, "yaxis": {"title": y, **log.get(y, {})},
                             "zaxis": {"title": z, **log.get(z, {})}})
    results.write_atomic(Path(path), lambda tmp: fig.write_html(tmp, include_plotlyjs=True))
