"""One sweep, start to end: data and teacher once, the Tune search, the result files and runs."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from kdtune import confirm, results, tracking
from kdtune.datasets import load_splits
from kdtune.distill import METHODS
from kdtune.space import SearchSpace, parse_space
from kdtune.spec import spec_to_dict
from kdtune.sweep import Options, init_ray, log, versions
from kdtune.teacher import FORWARD_PASSES, compute_targets, get_teacher
from kdtune.tracking import TrackingError
from kdtune.trial import SweepData
from kdtune.tuning import SweepContext

SWEEP_STATE = "sweep.json"


def teacher_keys(space: SearchSpace) -> list[str]:
    """Every teacher target some trial of this space may read."""
    return sorted({key for method in space.methods for key in METHODS[method].teacher_keys})


def prepare(spec, space: SearchSpace) -> tuple[SweepData, dict]:
    """Load the splits, get the teacher, and compute its train-set targets once for all trials."""
    splits = load_splits(spec.data.dataset, Path(spec.data.root), spec.data.val_size, spec.seed,
                         spec.data.train_limit, spec.data.test_limit)
    log(f"data: {spec.data.dataset} train {len(splits.train_y)}, val {len(splits.val_y)}, test {len(splits.test_y)}")
    teacher, info = get_teacher(spec, splits, log)
    started = time.time()
    targets, live = compute_targets(teacher, splits.train_x, teacher_keys(space), spec.teacher.feature_cache_mb)
    info["targets_seconds"] = round(time.time() - started, 1)
    info["cached_targets"], info["live_targets"] = sorted(targets), live
    if targets:
        log(f"teacher outputs cached once for all trials: {', '.join(sorted(targets))}")
    if live:
        log(f"teacher outputs over the {spec.teacher.feature_cache_mb:g} MB budget, computed live in trials: {', '.join(live)}")
    return SweepData(splits, targets, spec.teacher.arch, teacher.state_dict()), info


def _storage(spec, options: Options) -> str:
    root = options.storage or spec.ray.storage_path or str(Path(options.results_dir).resolve())
    return f"{root.rstrip('/')}/{spec.name}"


def run_sweep(spec, options: Options) -> int:
    from mlflow.tracking import MlflowClient

    started = time.time()
    out_dir = Path(options.results_dir) / spec.name
    uri = tracking.absolute_uri(options.tracking_uri or spec.mlflow.tracking_uri)
    tracking.check_reachable(uri)
    space = parse_space(spec)
    spec_dict = spec_to_dict(spec)
    data, teacher_info = prepare(spec, space)
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, spec.name)
    storage = _storage(spec, options)
    parent_id = _parent_run(client, exp_id, spec_dict, out_dir, storage, uri, options.resume)
    log(f"MLflow: experiment {spec.name!r}, parent run {parent_id} ({uri})")
    status, teacher_done, temp_dir = "FAILED", time.time(), None
    try:
        temp_dir = init_ray(options.address or spec.ray.address)
        ctx = SweepContext(spec_dict, uri, exp_id, parent_id)
        trials = _search_and_confirm(spec, space, data, ctx, client, storage, options.resume)
        interrupted = bool((trials["status"] == "KILLED").any())
        status = "KILLED" if interrupted else "FINISHED"
        report(spec, trials, out_dir, client, parent_id, {
            "versions": versions(), "spec": spec_dict, "teacher": teacher_info,
            "teacher_forward_passes": dict(FORWARD_PASSES),
            "wall_seconds": {"teacher_and_data": round(teacher_done - started, 1),
                             "sweep": round(time.time() - teacher_done, 1), "total": round(time.time() - started, 1)},
            "interrupted": interrupted})
        if interrupted:
            log(f"interrupted: partial results written to {out_dir}/. {resume_hint(options)}")
    except KeyboardInterrupt:  # before or between Tune's own graceful stops: nothing to write yet
        status = "KILLED"
        log(f"interrupted. {resume_hint(options)}")
        raise
    finally:
        import ray

        closed = tracking.close_open_children(client, exp_id, parent_id, "KILLED")
        if closed:
            log(f"ended {closed} unfinished MLflow run(s) as KILLED")
        tracking.end_run(client, parent_id, status)
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 130 if status == "KILLED" else 0


def resume_hint(options: Options) -> str:
    return (f"Resume with: python -m kdtune.sweep SPEC --resume --results-dir {options.results_dir} "
            "(and the same --set options)")


def _parent_run(client, exp_id: str, spec_dict: dict, out_dir: Path, storage: str, uri: str, resume: bool) -> str:
    """A new parent run (recorded in results/<name>/sweep.json), or on --resume the recorded one."""
    state_path = out_dir / SWEEP_STATE
    if resume:
        if not state_path.is_file():
            raise TrackingError(f"--resume: no interrupted sweep in {out_dir} (no {SWEEP_STATE})")
        parent_id = json.loads(state_path.read_text())["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        log("resuming the interrupted sweep")
        return parent_id
    parent_id = tracking.start_parent(client, exp_id, spec_dict)
    results.write_json({"parent_run_id": parent_id, "experiment_id": exp_id, "storage": storage,
                        "tracking_uri": uri}, state_path)
    return parent_id


def _search_and_confirm(spec, space, data, ctx, client, storage: str, resume: bool) -> pd.DataFrame:
    """Both phases' trials in the trials.csv layout; confirmation only after a complete search."""
    from kdtune.search import collect, configs, run_confirm, run_search

    columns = space.columns + ["seed", "source_trial"]
    grid = run_search(spec, space, data, ctx, storage, resume)
    trials = collect(grid, columns, spec, "search", tracking.ended_statuses(client, ctx.experiment_id, ctx.parent_run_id))
    if spec.search.confirm_seeds == 0 or (trials["status"] == "KILLED").any():
        return trials
    picks = confirm.candidates(trials, objectives(spec))
    by_trial = configs(grid)
    points = [{**by_trial[tid], "seed": seed, "source_trial": tid}
              for tid in picks["trial_id"] for seed in confirm.seeds(spec.seed, spec.search.confirm_seeds)]
    log(f"confirming {len(picks)} configurations with {spec.search.confirm_seeds} fresh seeds each ({len(points)} runs)")
    grid = run_confirm(spec, data, replace(ctx, phase="confirm"), storage, points, resume)
    reruns = collect(grid, columns, spec, "confirm", tracking.ended_statuses(client, ctx.experiment_id, ctx.parent_run_id))
    return pd.concat([trials, reruns], ignore_index=True)


def objectives(spec) -> list[tuple[str, str]]:
    return [(o.metric, o.mode) for o in spec.search.objectives]


def tables(spec, trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(front, KD gain): on confirmed means when confirmation ran to the end, else on the search trials."""
    reruns = trials[trials["phase"] == "confirm"]
    if reruns.empty or (reruns["status"] == "KILLED").any():
        return results.pareto_table(trials, objectives(spec)), results.kd_gain_table(trials)
    picks = confirm.candidates(trials, objectives(spec))
    means = confirm.confirmed_means(reruns, picks)
    return confirm.confirmed_front(means, objectives(spec)), confirm.gain_table(reruns, picks)


def report(spec, trials, out_dir: Path, client, parent_id: str, summary: dict) -> None:
    front, gain = tables(spec, trials)
    search_front = results.pareto_table(trials, objectives(spec))
    trials = trials.assign(search_front=trials["trial_id"].isin(search_front["trial_id"]) & (trials["phase"] == "search"))
    counts = trials[trials["phase"] == "search"]["status"].value_counts().to_dict()
    summary.update({"trials": counts, "front": front.to_dict("records"), "kd_gain": gain.to_dict("records")})
    results.write_csv(trials, out_dir / "trials.csv")
    results.write_csv(front, out_dir / "pareto.csv")
    metric = next((m for m, _ in objectives(spec) if m != "params"), "val_acc")
    results.plot_pareto(trials, front, out_dir / "pareto.png", metric)
    results.write_json(summary, out_dir / "summary.json")
    for name in ("trials.csv", "pareto.csv", "pareto.png", "summary.json"):
        client.log_artifact(parent_id, str(out_dir / name))
    finished = results.finished(trials[trials["phase"] == "search"])
    if not finished.empty:
        client.log_metric(parent_id, "best_val_acc", float(finished["val_acc"].max()))
    client.log_metric(parent_id, "trials_finished", len(finished))
    print(results.terminal_report(front, gain, counts))
    print(f"files in {out_dir}/")
