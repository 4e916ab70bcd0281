"""One sweep, start to end: data and teacher once, the Tune search, the result files and runs."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from kdtune import results, tracking
from kdtune.datasets import load_splits
from kdtune.distill import METHODS
from kdtune.models import has_maps
from kdtune.space import SearchSpace, parse_space
from kdtune.spec import spec_to_dict
from kdtune.sweep import Options, init_ray, log, versions
from kdtune.teacher import FORWARD_PASSES, compute_targets, get_teacher
from kdtune.trial import SweepData

SWEEP_STATE = "sweep.json"


def teacher_keys(spec, space: SearchSpace) -> list[str]:
    """Every teacher target some trial of this space may read."""
    archs = space.student_values("student.arch", spec.student.arch) or (spec.student.arch,)
    return sorted({key for method in space.methods for arch in archs
                   if has_maps(arch) or not METHODS[method].needs_conv_student
                   for key in METHODS[method].teacher_keys(has_maps(arch))})


def prepare(spec, space: SearchSpace) -> tuple[SweepData, dict]:
    """Load the splits, get the teacher, and compute its train-set targets once for all trials."""
    splits = load_splits(spec.data.dataset, Path(spec.data.root), spec.data.val_size, spec.seed,
                         spec.data.train_limit, spec.data.test_limit)
    log(f"data: {spec.data.dataset} train {len(splits.train_y)}, val {len(splits.val_y)}, test {len(splits.test_y)}")
    teacher, info = get_teacher(spec, splits, log)
    started = time.time()
    targets, live = compute_targets(teacher, splits.train_x, teacher_keys(spec, space), spec.teacher.feature_cache_mb)
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

    from kdtune.search import collect, run_search

    started = time.time()
    out_dir = Path(options.results_dir) / spec.name
    uri = tracking.absolute_uri(options.tracking_uri or spec.mlflow.tracking_uri)
    tracking.check_reachable(uri)
    space = parse_space(spec)
    spec_dict = spec_to_dict(spec)
    data, teacher_info = prepare(spec, space)
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, spec.name)
    state_path = out_dir / SWEEP_STATE
    if options.resume:
        if not state_path.is_file():
            from kdtune.spec import SpecError
            raise SpecError("", f"--resume: no interrupted sweep in {out_dir} (no {SWEEP_STATE})")
        parent_id = json.loads(state_path.read_text())["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        log(f"resuming sweep; MLflow parent run {parent_id}")
    else:
        parent_id = tracking.start_parent(client, exp_id, spec_dict)
        results.write_json({"parent_run_id": parent_id, "experiment_id": exp_id, "storage": _storage(spec, options),
                            "tracking_uri": uri}, state_path)
    log(f"MLflow: experiment {spec.name!r}, parent run {parent_id} ({uri})")
    temp_dir = init_ray(options.address or spec.ray.address)
    status, teacher_done = "FAILED", time.time()
    try:
        outcome = run_search(spec, space, data, uri, exp_id, parent_id, _storage(spec, options), options.resume)
        status = "KILLED" if outcome.interrupted else "FINISHED"
        trials = collect(outcome.grid, space, spec, "search")
        report(spec, space, trials, out_dir, client, parent_id, {
            "versions": versions(), "spec": spec_dict, "teacher": teacher_info,
            "teacher_forward_passes": dict(FORWARD_PASSES),
            "wall_seconds": {"teacher_and_data": round(teacher_done - started, 1),
                             "sweep": round(time.time() - teacher_done, 1), "total": round(time.time() - started, 1)},
            "interrupted": outcome.interrupted})
        if outcome.interrupted:
            log(f"interrupted: partial results written to {out_dir}/. Resume with: "
                f"python -m kdtune.sweep <spec> --resume --results-dir {options.results_dir}")
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


def report(spec, space, trials, out_dir: Path, client, parent_id: str, summary: dict) -> None:
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    front = results.pareto_table(trials, objectives)
    gain = results.kd_gain_table(trials)
    counts = trials["status"].value_counts().to_dict()
    summary.update({"trials": counts, "front": front.to_dict("records"), "kd_gain": gain.to_dict("records")})
    results.write_csv(trials, out_dir / "trials.csv")
    results.write_csv(front, out_dir / "pareto.csv")
    results.plot_pareto(trials, front, out_dir / "pareto.png", objectives[0][0] if objectives[0][0] != "params" else "val_acc")
    results.write_json(summary, out_dir / "summary.json")
    for name in ("trials.csv", "pareto.csv", "pareto.png", "summary.json"):
        client.log_artifact(parent_id, str(out_dir / name))
    finished = results.finished(trials)
    if not finished.empty:
        client.log_metric(parent_id, "best_val_acc", float(finished["val_acc"].max()))
    client.log_metric(parent_id, "trials_finished", len(finished))
    columns = ["loss"] + results.method_columns(front) + ["student.arch", "width", "params", "val_acc", "test_acc"]
    stopped = counts.get("STOPPED", 0)
    print(f"\nPareto-optimal students ({len(front)} of {len(finished)} finished trials"
          f"{f'; {stopped} early-stopped trials excluded' if stopped else ''}):")
    print(results.show(front, columns))
    print("\nKD gain per student size (best baseline vs best distilled, chosen on val_acc):")
    print(results.show(gain, list(gain.columns)))
    print(f"\nstatus: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; files in {out_dir}/")
