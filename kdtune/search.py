"""The Ray Tune search: OptunaSearch over the define-by-run space, optional ASHA, results as a table."""
from __future__ import annotations

import json
import re
import uuid
from functools import partial
from pathlib import Path

import optuna
import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from kdtune import results, study, tracking
from kdtune.log import log
from kdtune.measure import Measurer, feasible
from kdtune.spec import ARCH_METRICS
from kdtune.space import SearchSpace, resolve
from kdtune.tuning import (KDOptunaSearch, SweepContext, TrackingCallback, arch_violations, error_summary, trainable,
                           trial_status)

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


def sampler(spec, measurer: Measurer) -> optuna.samplers.BaseSampler:
    """The spec's Optuna sampler, seeded; with search.constraints, given them as its own
    `constraints_func` (the architecture's measured figures against the bounds)."""
    kwargs = {"seed": spec.seed}
    if spec.search.constraints:
        kwargs["constraints_func"] = partial(arch_violations, spec, measurer)
    return SAMPLERS[spec.search.sampler](**kwargs)


def _max_concurrent(spec) -> int:
    """search.max_concurrent, capped for multi-worker trials at how many the cluster holds."""
    if spec.resources.workers > 1:
        from kdtune import distributed

        return distributed.trials_at_once(spec, ray.nodes())
    return spec.search.max_concurrent


TRIAL_ID = re.compile(r"[0-9a-f]{8}")


def trial_name(trial) -> str:
    """kdtune's trial id, of one kind in both phases (terminal, trials.csv, MLflow run names and
    the `kdtune.trial_id` tag): Tune's own 8-hex id in the search, and a fresh one of the same
    kind for a grid's trials, which Tune numbers 9444f_00001. Tune keeps it with the trial."""
    return trial.trial_id if TRIAL_ID.fullmatch(trial.trial_id) else uuid.uuid4().hex[:8]


def _tune_config(spec, **kwargs) -> tune.TuneConfig:
    return tune.TuneConfig(max_concurrent_trials=_max_concurrent(spec), reuse_actors=True,
                           trial_name_creator=trial_name, **kwargs)


def _run_config(spec, storage: str, name: str, callback) -> tune.RunConfig:
    return tune.RunConfig(name=name, storage_path=storage, callbacks=[callback], verbose=0,
                          failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                          # keep every checkpoint: after a driver kill, the last experiment snapshot may
                          # name any older one, and deleting it makes the trial fail to resume
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=None))


def _restore(path: str, spec, data, ctx):
    """Continue an interrupted phase: finished trials stay, unfinished resume, errored restart."""
    return tune.Tuner.restore(path, trainable=_trainable(spec, data, ctx), resume_unfinished=True,
                              resume_errored=False, restart_errored=True).fit()


def _accuracy_objective(spec):
    """The objective ASHA stops trials on and the progress lines show: the first validation metric."""
    return next((o for o in spec.search.objectives if o.metric.startswith("val_")), spec.search.objectives[0])


def _baselines(spec, space: SearchSpace) -> list[dict]:
    return space.baseline_points() if spec.search.baselines else []


def search_size(spec, space: SearchSpace) -> int:
    """Trials in a complete search: fewer in its ResultGrid means Ctrl+C ended it early, even
    when no trial was running at that moment (none is then KILLED)."""
    return spec.search.num_samples + len(_baselines(spec, space))


def run_search(spec, space: SearchSpace, data, ctx: SweepContext, storage: str, resume: bool, measurer: Measurer):
    """The Optuna search through Ray Tune; with `resume`, the interrupted one continues. The
    baselines' students (every size the space chooses from) are measured first, while no trial
    runs beside the timing."""
    path = f"{storage}/search"
    if resume and tune.Tuner.can_restore(path):
        return _restore(path, spec, data, ctx)
    baselines = _baselines(spec, space)
    measurer.measure_all([resolve(spec, point).spec.student for point in baselines])
    if baselines:
        log(f"measured {len(measurer.cache)} student architecture(s) in {measurer.seconds:.1f} s, before any trial")
    objectives = spec.search.objectives
    total = search_size(spec, space)
    metrics, modes = [o.metric for o in objectives], [o.mode for o in objectives]
    searcher = KDOptunaSearch(space=space, metric=metrics if len(metrics) > 1 else metrics[0],
                              mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=baselines or None,
                              sampler=sampler(spec, measurer), epochs=spec.train.epochs,
                              total=total, ctx=ctx, measurer=measurer, resume=resume)
    accuracy = _accuracy_objective(spec)
    scheduler = None
    if spec.search.scheduler:
        scheduler = ASHAScheduler(metric=accuracy.metric, mode=accuracy.mode, time_attr="training_iteration",
                                  max_t=spec.train.epochs, grace_period=spec.search.scheduler.grace_period,
                                  reduction_factor=spec.search.scheduler.reduction_factor)
    callback = TrackingCallback(ctx, spec.train.epochs, total, accuracy.metric, accuracy.mode)
    tuner = tune.Tuner(
        _trainable(spec, data, ctx),
        tune_config=_tune_config(spec, search_alg=searcher, scheduler=scheduler, num_samples=total),
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
        tune_config=_tune_config(spec),
        run_config=_run_config(spec, storage, "confirm", callback))
    return tuner.fit()


def _config(config: dict | None) -> dict:
    """A trial's flat config: a confirmation run's point."""
    config = dict(config or {})
    return dict(config.get("point", config))


def newest_checkpoint(folder) -> "tune.Checkpoint | None":
    """The newest checkpoint in a trial's folder on local storage: the one a trial saved before a driver
    kill, when Tune's last snapshot predates it and the resumed trial only replayed its result."""
    saved = sorted(Path(folder).glob("checkpoint_*")) if folder and Path(folder).is_dir() else []
    return tune.Checkpoint.from_directory(str(saved[-1])) if saved else None


def trained(grid) -> dict[str, tuple[dict, "tune.Checkpoint | None"]]:
    """trial id -> (the trial's config, its last checkpoint): what its trained student is rebuilt from."""
    return {_trial_id(r): (_config(r.config), r.checkpoint or newest_checkpoint(r.path)) for r in grid}


def _path_trial_id(result) -> str | None:
    """The trial id that starts the trial's folder name (<id>_<n>_...): always the trial's own."""
    match = re.match(r"([0-9a-f]{8})_", Path(str(result.path)).name)
    return match.group(1) if match else None


def _trial_id(result) -> str:
    return _path_trial_id(result) or (result.metrics or {}).get("trial_name") or str(result.path)


def recovered_runs(grid, ctx: SweepContext) -> list:
    """The completed runs of trials this phase's ResultGrid lacks: they started and ended between
    two of Tune's experiment snapshots, then the driver was killed, so the resumed Tune never knew
    them; MLflow did (the trials end their own runs). None when the tracking store is down."""
    known = {_trial_id(result) for result in grid}
    runs = tracking.guarded("find completed runs", tracking.completed_runs, tracking.client(ctx.tracking_uri),
                            ctx.experiment_id, ctx.parent_run_id, ctx.phase, default=[])
    return [run for run in runs if run.data.tags[tracking.TRIAL_TAG] not in known]


def recovered_config(run) -> dict:
    return _config(json.loads(run.data.tags[tracking.CONFIG_TAG]))


def recovered_students(runs: list, folder: str) -> dict[str, tuple[dict, "tune.Checkpoint | None"]]:
    """trial id -> (config, last checkpoint) of recovered trials, as `trained` gives them; the checkpoint
    is the newest in the trial's folder on local storage (none on a remote one)."""
    found = {}
    for run in runs:
        trial_id = run.data.tags[tracking.TRIAL_TAG]
        trial_folder = next(Path(folder).glob(f"{trial_id}_*"), None) if Path(folder).is_dir() else None
        found[trial_id] = (recovered_config(run), newest_checkpoint(trial_folder))
    return found


def record_recovered(ctx: SweepContext, spec, runs: list) -> int:
    """Add to the study on record the recovered trials that had not added themselves (the driver
    was killed, and their actors with it, between a trial ending its run and its study write)."""
    url, name = ctx.optuna_storage, ctx.optuna_study
    held = study.recorded_ids(url, name)
    missing = [run for run in runs if run.data.tags[tracking.TRIAL_TAG] not in held]
    for run in missing:
        study.record(url, name, spec, run.data.tags[tracking.TRIAL_TAG], recovered_config(run), run.data.metrics,
                     run.data.tags["kdtune.status"])
    return len(missing)


def known_feasible(figures: dict, spec) -> bool | None:
    """The `feasible` column: the architecture's figures within search.constraints; None when a trial
    ended before it reported them."""
    return None if None in figures.values() else feasible(figures, spec.search.constraints)


def _row(spec, phase: str, trial_id: str, config: dict, metrics: dict, status: str, reason: str) -> dict:
    plan = resolve(spec, config)
    if metrics.get("infeasible"):  # untrained: its validation objectives are placeholders (study.untrained_values)
        metrics = {k: v for k, v in metrics.items() if not k.startswith("val_")}
    figures = {name: metrics.get(name) for name in ARCH_METRICS}
    row = dict(config)
    row.update({k: metrics[k] for k in results.evaluation_columns(metrics)})  # the `evaluate` function's
    row.update({"trial_id": trial_id, "phase": phase, "loss": plan.method,
                "student.arch": plan.spec.student.arch, "width": plan.spec.student.width, "student": plan.student,
                "teacher": plan.teacher,
                **figures, "extra_params": metrics.get("extra_params"), "feasible": known_feasible(figures, spec),
                "val_acc": metrics.get("val_acc"), "test_acc": metrics.get("test_acc"),
                "epochs": metrics.get("epoch", 0), "teacher_passes": metrics.get("teacher_passes"),
                "status": status, "reason": reason,
                "mlflow_run_id": metrics.get("mlflow_run_id"), "node_id": metrics.get("node_id")})
    return row


def collect(grid, columns: list[str], spec, phase: str, ended: dict[str, tuple[str, str]],
            recovered: list = ()) -> pd.DataFrame:
    """One row per trial of a ResultGrid, in the trials.csv layout, and one per recovered run (see
    `recovered_runs`). `ended` holds the statuses the driver gave the trials' MLflow runs; a trial
    without one was interrupted."""
    rows = []
    for result in grid:
        metrics, config = result.metrics or {}, _config(result.config)
        if _path_trial_id(result) and metrics.get("trial_name") not in (None, _path_trial_id(result)):
            metrics = {}  # an error result of a reused actor can carry its previous trial's metrics
        if metrics.get("mlflow_run_id") in ended:
            status, reason = ended[metrics["mlflow_run_id"]]
        elif result.error is not None:
            status, reason = "FAILED", error_summary(result.error)
        elif metrics.get("done"):  # completed, but its run was not ended (the tracking server was down)
            status, reason = trial_status(metrics, spec.train.epochs, False)
        else:
            status, reason = "KILLED", "interrupted"
        rows.append(_row(spec, phase, _trial_id(result), config, metrics, status, reason))
    for run in recovered:
        metrics = {**run.data.metrics, "mlflow_run_id": run.info.run_id}
        rows.append(_row(spec, phase, run.data.tags[tracking.TRIAL_TAG], recovered_config(run), metrics,
                         run.data.tags["kdtune.status"], run.data.tags.get("kdtune.reason", "")))
    return results.trials_frame(rows, columns)
