"""The Ray Tune search: OptunaSearch over the define-by-run space, optional ASHA, results as a table."""
from __future__ import annotations

import re
from dataclasses import dataclass

import optuna
import pandas as pd
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from kdtune import results
from kdtune.space import SearchSpace, resolve
from kdtune.spec import spec_to_dict
from kdtune.tuning import KDOptunaSearch, SweepContext, TrackingCallback, trainable, trial_status

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
            "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler}


@dataclass
class SearchOutcome:
    grid: object
    interrupted: bool


def _trainable(spec, data, ctx):
    return tune.with_resources(tune.with_parameters(trainable, data=data, ctx=ctx),
                               {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def run_search(spec, space: SearchSpace, data, uri, exp_id, parent_id, storage, resume: bool) -> SearchOutcome:
    ctx = SweepContext(spec_to_dict(spec), uri, exp_id, parent_id, "search")
    path = f"{storage}/tune"
    if resume:
        tuner = tune.Tuner.restore(path, trainable=_trainable(spec, data, ctx), resume_unfinished=True,
                                   resume_errored=False, restart_errored=True)
    else:
        objectives = spec.search.objectives
        baselines = space.baseline_points() if spec.search.baselines else []
        total = spec.search.num_samples + len(baselines)
        metrics, modes = [o.metric for o in objectives], [o.mode for o in objectives]
        searcher = KDOptunaSearch(space=space, metric=metrics if len(metrics) > 1 else metrics[0],
                                  mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=baselines or None,
                                  sampler=SAMPLERS[spec.search.sampler](seed=spec.seed), epochs=spec.train.epochs)
        accuracy = next((o for o in objectives if o.metric in ("val_acc", "val_loss")), objectives[0])
        scheduler = None
        if spec.search.scheduler:
            scheduler = ASHAScheduler(metric=accuracy.metric, mode=accuracy.mode, time_attr="training_iteration",
                                      max_t=spec.train.epochs, grace_period=spec.search.scheduler.grace_period,
                                      reduction_factor=spec.search.scheduler.reduction_factor)
        callback = TrackingCallback(ctx, spec.train.epochs, total, accuracy.metric, accuracy.mode)
        tuner = tune.Tuner(
            _trainable(spec, data, ctx),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total,
                                        max_concurrent_trials=spec.search.max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=storage, callbacks=[callback], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    unfinished = [r for r in grid if not r.error and not r.metrics.get("done")]
    stopped_by_scheduler = spec.search.scheduler is not None
    return SearchOutcome(grid, bool(unfinished) and not stopped_by_scheduler)


def _trial_id(result) -> str:
    found = result.metrics.get("trial_id")
    if found:
        return found
    match = re.search(r"_([0-9a-f]{5,8}_\d{5})_", str(result.path))
    return match.group(1) if match else str(result.path)


def collect(grid, space: SearchSpace, spec, phase: str) -> pd.DataFrame:
    """One row per trial of a ResultGrid, in the trials.csv layout."""
    rows = []
    for result in grid:
        metrics, config = result.metrics or {}, dict(result.config or {})
        config = config.get("point", config)
        plan = resolve(spec, config)
        status, reason = trial_status(metrics, plan.spec.train.epochs, result.error is not None)
        if result.error is not None:
            reason = str(result.error).strip().splitlines()[-1][:300]
        row = dict(config)
        row.update({"trial_id": _trial_id(result), "phase": phase, "loss": plan.method,
                    "student.arch": plan.spec.student.arch, "width": plan.spec.student.width,
                    "params": metrics.get("params"), "extra_params": metrics.get("extra_params"),
                    "val_acc": metrics.get("val_acc"), "test_acc": metrics.get("test_acc"),
                    "epochs": metrics.get("epoch", 0), "status": status, "reason": reason,
                    "mlflow_run_id": metrics.get("mlflow_run_id"), "node_id": metrics.get("node_id")})
        rows.append(row)
    return results.trials_frame(rows, space.columns)
