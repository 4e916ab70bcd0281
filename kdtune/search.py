"""The Ray Tune search: OptunaSearch over the define-by-run space, optional ASHA, results as a table."""
from __future__ import annotations

import re

import optuna
import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from kdtune import results
from kdtune.snapshots import EventSnapshots
from kdtune.space import SearchSpace, resolve
from kdtune.tuning import KDOptunaSearch, SweepContext, TrackingCallback, error_summary, trainable, trial_status

optuna.logging.set_verbosity(optuna.logging.WARNING)
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
            "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler}


def _trainable(spec, data, ctx):
    """The trainable with its resources: one process, or (resources.workers > 1) a trial that starts
    its workers, the shared data put once into the object store for all of them."""
    if spec.resources.workers > 1:
        from kdtune import distributed

        workers = distributed.TrialWorkers(ray.put(data), spec.resources.workers, spec.resources.cpu, spec.resources.gpu)
        return tune.with_resources(tune.with_parameters(trainable, data=None, ctx=ctx, workers=workers),
                                   distributed.trial_resources())
    return tune.with_resources(tune.with_parameters(trainable, data=data, ctx=ctx),
                               {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _max_concurrent(spec) -> int:
    """search.max_concurrent, capped for multi-worker trials at how many the cluster holds."""
    if spec.resources.workers > 1:
        from kdtune import distributed

        return distributed.trials_at_once(spec, ray.nodes())
    return spec.search.max_concurrent


def _run_config(spec, storage: str, name: str, callback) -> tune.RunConfig:
    return tune.RunConfig(name=name, storage_path=storage, callbacks=[callback, EventSnapshots()], verbose=0,
                          failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                          # keep every checkpoint: after a driver kill, the last experiment snapshot may
                          # name any older one, and deleting it makes the trial fail to resume
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=None))


def _restore(path: str, spec, data, ctx):
    """Continue an interrupted phase: finished trials stay, unfinished resume, errored restart."""
    return tune.Tuner.restore(path, trainable=_trainable(spec, data, ctx), resume_unfinished=True,
                              resume_errored=False, restart_errored=True).fit()


def _accuracy_objective(spec):
    return next((o for o in spec.search.objectives if o.metric in ("val_acc", "val_loss")), spec.search.objectives[0])


def _baselines(spec, space: SearchSpace) -> list[dict]:
    return space.baseline_points() if spec.search.baselines else []


def search_size(spec, space: SearchSpace) -> int:
    """Trials in a complete search: fewer in its ResultGrid means Ctrl+C ended it early, even
    when no trial was running at that moment (none is then KILLED)."""
    return spec.search.num_samples + len(_baselines(spec, space))


def fail_lost_trials(ctx: SweepContext) -> int:
    """Mark FAIL the Optuna trials still RUNNING when the search is complete: each was asked for just
    before a driver kill, after Tune's last snapshot, and the resumed search sampled another in its place."""
    study = optuna.load_study(study_name=ctx.optuna_study, storage=ctx.optuna_storage)
    lost = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in lost:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(lost)


def run_search(spec, space: SearchSpace, data, ctx: SweepContext, storage: str, resume: bool):
    """The Optuna search through Ray Tune; with `resume`, the interrupted one continues."""
    path = f"{storage}/search"
    if resume and tune.Tuner.can_restore(path):
        return _restore(path, spec, data, ctx)
    objectives = spec.search.objectives
    baselines = _baselines(spec, space)
    total = search_size(spec, space)
    metrics, modes = [o.metric for o in objectives], [o.mode for o in objectives]
    searcher = KDOptunaSearch(space=space, metric=metrics if len(metrics) > 1 else metrics[0],
                              mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=baselines or None,
                              sampler=SAMPLERS[spec.search.sampler](seed=spec.seed), epochs=spec.train.epochs,
                              storage=optuna.storages.RDBStorage(ctx.optuna_storage) if ctx.optuna_storage else None,
                              study_name=ctx.optuna_study)
    accuracy = _accuracy_objective(spec)
    scheduler = None
    if spec.search.scheduler:
        scheduler = ASHAScheduler(metric=accuracy.metric, mode=accuracy.mode, time_attr="training_iteration",
                                  max_t=spec.train.epochs, grace_period=spec.search.scheduler.grace_period,
                                  reduction_factor=spec.search.scheduler.reduction_factor)
    callback = TrackingCallback(ctx, spec.train.epochs, total, accuracy.metric, accuracy.mode)
    tuner = tune.Tuner(
        _trainable(spec, data, ctx),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total,
                                    max_concurrent_trials=_max_concurrent(spec), reuse_actors=True),
        run_config=_run_config(spec, storage, "search", callback))
    return tuner.fit()


def run_confirm(spec, data, ctx: SweepContext, storage: str, points: list[dict], resume: bool):
    """Retrain whole configurations with fresh seeds: a grid over the given points, no search."""
    path = f"{storage}/confirm"
    if resume and tune.Tuner.can_restore(path):
        return _restore(path, spec, data, ctx)
    accuracy = _accuracy_objective(spec)
    callback = TrackingCallback(ctx, spec.train.epochs, len(points), accuracy.metric, accuracy.mode)
    tuner = tune.Tuner(
        _trainable(spec, data, ctx), param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=_max_concurrent(spec), reuse_actors=True),
        run_config=_run_config(spec, storage, "confirm", callback))
    return tuner.fit()


def configs(grid) -> dict[str, dict]:
    """trial id -> the trial's flat config, to rerun it."""
    return {_trial_id(r): dict(r.config) for r in grid}


def trained(grid) -> dict[str, tuple[dict, "tune.Checkpoint | None"]]:
    """trial id -> (the trial's config, its last checkpoint): what its trained student is rebuilt from."""
    return {_trial_id(r): (dict(r.config or {}).get("point", dict(r.config or {})), r.checkpoint) for r in grid}


def _path_trial_id(result) -> str | None:
    """The trial id in the trial's folder name (trainable_<id>_<n>_...): always the trial's own."""
    match = re.search(r"trainable_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_", str(result.path))
    return match.group(1) if match else None


def _trial_id(result) -> str:
    return _path_trial_id(result) or (result.metrics or {}).get("trial_id") or str(result.path)


def collect(grid, columns: list[str], spec, phase: str, ended: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """One row per trial of a ResultGrid, in the trials.csv layout. `ended` holds the statuses
    the driver gave the trials' MLflow runs; a trial without one was interrupted."""
    rows = []
    for result in grid:
        metrics, config = result.metrics or {}, dict(result.config or {})
        if _path_trial_id(result) and metrics.get("trial_id") not in (None, _path_trial_id(result)):
            metrics = {}  # an error result of a reused actor can carry its previous trial's metrics
        config = config.get("point", config)
        plan = resolve(spec, config)
        if metrics.get("mlflow_run_id") in ended:
            status, reason = ended[metrics["mlflow_run_id"]]
        elif result.error is not None:
            status, reason = "FAILED", error_summary(result.error)
        elif metrics.get("done"):  # completed, but its run was not ended (the tracking server was down)
            status, reason = trial_status(metrics, spec.train.epochs, False)
        else:
            status, reason = "KILLED", "interrupted"
        row = dict(config)
        row.update({"trial_id": _trial_id(result), "phase": phase, "loss": plan.method,
                    "student.arch": plan.spec.student.arch, "width": plan.spec.student.width, "student": plan.student,
                    "params": metrics.get("params"), "extra_params": metrics.get("extra_params"),
                    "val_acc": metrics.get("val_acc"), "test_acc": metrics.get("test_acc"),
                    "epochs": metrics.get("epoch", 0), "teacher_passes": metrics.get("teacher_passes"),
                    "status": status, "reason": reason,
                    "mlflow_run_id": metrics.get("mlflow_run_id"), "node_id": metrics.get("node_id")})
        rows.append(row)
    return results.trials_frame(rows, columns)
