"""The library entry: `kdtune.run` runs one sweep start to end (data and teacher once, the
Tune search and confirmation, the result files and runs) and returns its tables.

The CLI (kdtune.sweep) is a thin layer over `run`; so is any notebook or pipeline.
"""
from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
from torch import nn

from kdtune import confirm, epilogue, evaluation, reconcile, results, study, tracking
from kdtune.cluster import init_ray, user_modules
from kdtune.data.resolve import load_data
from kdtune.errors import SpecError, TrackingError
from kdtune.loading import load_spec
from kdtune.measure import Measurer
from kdtune.log import log
from kdtune.models.resolve import IN_MEMORY, IMPORT_PATH
from kdtune.preflight import OWN_NAMES, arch_of, check_models, check_objectives, check_teacher
from kdtune.space import SearchSpace, parse_space
from kdtune.spec import Spec, spec_to_dict, trained_teachers
from kdtune.teacher import FORWARD_PASSES
from kdtune.teachers import Teachers, no_teacher, teacher_keys
from kdtune.report.tables import accuracy_metric
from kdtune.trial import SweepData, TeacherData

SWEEP_STATE = "sweep.json"


@dataclass
class SweepResult:
    """What a sweep found: the tables it wrote (as DataFrames) and where its runs and files are."""

    trials: pd.DataFrame
    front: pd.DataFrame
    kd_gain: pd.DataFrame
    experiment_id: str
    parent_run_id: str
    results_dir: Path
    status: str  # FINISHED, or KILLED when interrupted (partial tables; resume with resume=True)
    summary: dict
    # What MLflow lacks after the sweep (trial ids, "parent run ..."): the tracking server stayed
    # down. results_dir is complete all the same; `python -m kdtune.report --sync` uploads the rest.
    mlflow_missing: list[str] = field(default_factory=list)
    report_dir: Optional[Path] = None  # report.html and its tables (results_dir / "report")


def versions() -> dict:
    names = ["kdtune", "torch", "torchvision", "ray", "optuna", "mlflow", "pandas", "pydantic"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": platform.python_version(), **found}


def _object_name(obj) -> str:
    return IN_MEMORY + getattr(obj, "__qualname__", type(obj).__qualname__)


def with_objects(spec: Spec, teacher, student, data, evaluate=None) -> Spec:
    """The spec with each object given to `run` in place of the key it replaces."""
    overrides = {}
    if evaluate is not None:
        overrides["evaluate"] = evaluate if isinstance(evaluate, str) else _object_name(evaluate)
    if teacher is not None:
        overrides["teacher.arch"] = _object_name(teacher)
    if student is not None:
        overrides["student.arch"] = _object_name(student)
    if data is not None:
        overrides["data.dataset"] = IN_MEMORY + "data"
    spec = load_spec(spec, overrides) if overrides else spec
    space_keys = spec.search.space
    if student is not None and "student.arch" in space_keys:
        raise SpecError("search.space.student.arch", "kdtune.run(student=...) replaces student.arch, so it cannot "
                                                     "be searched; search the factory's own arguments as "
                                                     "student.kwargs.<name>")
    return spec


def prepare(spec, space: SearchSpace, teacher=None, student=None, data=None, evaluate=None, *,
            outputs_dir: Optional[Path] = None) -> tuple[SweepData, dict, dict]:
    """Import the evaluation function, load the data on the path `data.resident` chooses, get the
    teacher, check every model on one batch and the evaluation on a student, and compute the
    teacher's train-set targets (and take its classifier head, if a method reuses it) once for all
    trials: in memory, or for streamed data in files under `outputs_dir` (a new temporary folder if
    None). Returns (data, teacher facts, data facts)."""
    evaluate = evaluation.resolve(spec.evaluate, None if isinstance(evaluate, str) else evaluate)
    if evaluate is None:
        check_objectives(spec, OWN_NAMES, evaluated=False)
    loaded = load_data(spec.data, spec.seed, data)
    splits, stream = loaded.splits, loaded.stream
    shown = (f"train {len(stream.train)}, val {', '.join(f'{k} {len(v)}' for k, v in stream.val.items())}, "
             f"test {len(stream.test)}") if stream else \
        f"train {len(splits.train_y)}, val {len(splits.val_y)}, test {len(splits.test_y)}"
    log(f"data: {spec.data.dataset} {shown}, input {tuple(splits.in_shape)}, {splits.num_classes} classes")
    log(f"data: {loaded.path} ({loaded.reason})")
    data_info = {"path": loaded.path, "reason": loaded.reason,
                 **({"workers": stream.workers, "random_transform": stream.random} if stream else {})}
    data_, info = prepare_teachers(spec, space, splits, stream, teacher, student, evaluate,
                                   outputs_dir or Path(tempfile.mkdtemp(prefix="kdtune-teacher-outputs-")))
    return replace(data_, student_factory=student, evaluate=evaluate), info, data_info


def prepare_teachers(spec, space: SearchSpace, splits, stream, given, student, evaluate,
                     outputs_dir: Path) -> tuple[SweepData, dict]:
    """Each teacher the space can choose, loaded once with its train-set targets computed once, and
    every model and method checked on one batch (kdtune.preflight). Returns the data (the first
    teacher's targets as its own, the others' by name) and the first teacher's facts, with
    `teachers:` each one's (with its forward passes) under `teachers` (summary.json's)."""
    loader = Teachers(spec, splits, log, given, stream)
    names = space.teachers
    started = time.time()
    models = {name: loader.get(name).model for name in names}
    where = {name: name if name == "teacher" else f"teachers.{name}" for name in names}
    head = check_models(spec, space, splits, models[names[0]] if names else None, student, evaluate,
                        where[names[0]] if names else "teacher")
    heads = {names[0]: head} if names else {}
    for name in names[1:]:
        heads[name] = check_teacher(space, splits, models[name], where[name], arch_of(spec, where[name]))[1]
    chosen, wanted = {}, loader.wanted(names, teacher_keys(space))
    for name in wanted:
        found, facts = loader.targets(name, wanted[name], outputs_dir)
        if name in names:
            chosen[name] = replace(found, teacher_head=heads[name])
            loader.get(name).facts.update(facts)
            _log_cache(name, facts, found)
    if not names:
        log("no teacher: no method of the space reads one")
        return SweepData(splits, {}, stream=stream), no_teacher()
    first = chosen.pop(names[0])
    info = {**loader.get(names[0]).facts, "targets_seconds": round(time.time() - started, 1)}
    if spec.teachers:
        info["teachers"] = {name: {**loader.get(name).facts, "forward_passes": dict(loader.passes[name])}
                            for name in loader.loaded}
    return SweepData(splits, first.targets, first.teacher, None, first.per_view, first.teacher_head, None, stream,
                     first.outputs, chosen, first.weights), info


def _log_cache(name: str, facts: dict, found: TeacherData) -> None:
    cached, live, mode = facts["cached_targets"], facts["live_targets"], facts["cache"]
    name = "teacher" if name == "teacher" else f"teacher {name}"  # `teacher:` itself, or a `teachers:` entry
    if cached:
        views = f" for each of the {next(iter(found.targets.values())).shape[1]} augmented views" if found.per_view else ""
        where = f" on disk in {found.outputs.folder}" if found.outputs else ""
        log(f"{name} outputs cached once for all trials (teacher.cache: {mode}){views}{where}: {', '.join(cached)}")
    if live:
        why = facts.get("cache_reason")
        log(f"{name} outputs computed live in the trials (teacher.cache: {mode}"
            f"{f'; {why}' if why else ''}): {', '.join(live)}")


def forward_passes(trials: pd.DataFrame) -> dict:
    """Teacher passes over each split in full-set equivalents: the driver's (targets once, or one
    per augmented view) plus the trials' live forwards."""
    passes = dict(FORWARD_PASSES)
    live = float(trials["teacher_passes"].fillna(0).sum())
    passes["train"] = passes.get("train", 0) + (round(live, 3) if live else 0)
    return passes


def _storage(spec, results_dir: str, storage: Optional[str]) -> str:
    root = storage or spec.ray.storage_path or str(Path(results_dir).resolve())
    return f"{root.rstrip('/')}/{spec.name}"


def _ship_by_value(*objects) -> None:
    """Objects given to `run` reach Ray workers pickled by value when their module is the user's
    own (a notebook's __main__ always is; a script or test module beside it too), so workers
    need not import it."""
    import sys

    from ray import cloudpickle

    for obj in objects:
        if obj is None or isinstance(obj, (tuple, list, str)):
            continue
        name = getattr(obj, "__module__", None) or type(obj).__module__
        module = sys.modules.get(name)
        if module is not None and name != "__main__" and user_modules([f"{name}:x"]):
            cloudpickle.register_pickle_by_value(module)


def given_datasets(data) -> list:
    """The datasets given to `run` (a pair, or behind a dict of DataLoaders): streamed trials
    unpickle them, so their classes ship like the models'."""
    if isinstance(data, dict):
        loaders = [v for k, v in data.items() if k != "val"] + list(
            data["val"].values() if isinstance(data.get("val"), dict) else [data.get("val")])
        return [getattr(loader, "dataset", None) for loader in loaders]
    return list(data) if isinstance(data, (tuple, list)) else []


def run(spec: Union[str, Path, dict, Spec], *, teacher: Union[nn.Module, Callable, None] = None,
        student: Optional[Callable] = None, data: Union[tuple, dict, None] = None,
        evaluate: Union[Callable, str, None] = None, results_dir: Union[str, Path] = "results",
        tracking_uri: Optional[str] = None, smoke: bool = False, address: Optional[str] = None,
        storage: Optional[str] = None, resume: bool = False) -> SweepResult:
    """Run one sweep and return its tables.

    `spec` is a YAML path, a mapping or a Spec. `teacher` (a trained module, used as is, or a
    factory), `student` (a factory) and `data` (a `(train, test)` pair of datasets of
    `(image tensor, int label)`, or DataLoaders as `{"train": ..., "test": ..., "val": loader
    or {name: loader}}`) replace the spec's `teacher.arch`, `student.arch` and `data.dataset`;
    `evaluate` (a `function(model, data_loader) -> {name: number}`, or its import path) replaces
    the spec's `evaluate`. Bad input raises SpecError (or DataError, TeacherError, TrackingError)
    before Ray starts; with `resources.workers` > 1, Ray starts first, and workers the cluster
    cannot place raise SpecError before the teacher is trained.
    """
    started = time.time()
    spec = with_objects(load_spec(spec, smoke=smoke), teacher, student, data, evaluate)
    results_dir = str(results_dir)
    out_dir = Path(results_dir) / spec.name
    tracking.use_retries()  # a restarting tracking server costs waiting, not runs
    uri = tracking.absolute_uri(tracking_uri or spec.mlflow.tracking_uri)
    tracking.check_reachable(uri)
    tracking.use_wal(uri)
    space = parse_space(spec)
    spec_dict = spec_to_dict(spec)
    paths = [t.arch for t in trained_teachers(spec).values()] + [spec.data.dataset, spec.evaluate or ""] + list(
        space.student_values("student.arch", spec.student.arch))
    ray_paths = user_modules(p for p in paths if IMPORT_PATH.match(p))
    # whether a trial's workers fit is a question for the cluster: asked before the teacher trains
    temp_dir = _start_ray(spec, address, ray_paths) if spec.resources.workers > 1 else None
    try:
        data_, teacher_info, data_info = prepare(spec, space, teacher, student, data, evaluate,
                                                 outputs_dir=out_dir / "teacher_outputs")
        teachers_info = teacher_info.pop("teachers", None)
        client = tracking.client(uri)
        exp_id = tracking.experiment_id(client, spec.name)
        storage = _storage(spec, results_dir, storage)
        parent_id = _parent_run(client, exp_id, spec_dict, out_dir, storage, uri, resume)
        log(f"MLflow: experiment {spec.name!r}, parent run {parent_id} ({uri})")
        optuna_url, study_name = study.location(spec, out_dir, parent_id)
        study.create(optuna_url, study_name, spec)
        tracking.tag_study(client, parent_id, optuna_url, study_name)
    except BaseException:
        if spec.resources.workers > 1:
            _stop_ray(temp_dir)
        raise
    status, teacher_done, missing = "FAILED", time.time(), []
    hint = resume_hint(results_dir)
    try:
        if spec.resources.workers == 1:
            temp_dir = _start_ray(spec, address, ray_paths)
        _ship_by_value(teacher, student, evaluate, *given_datasets(data))
        from kdtune.tuning import SweepContext

        ctx = SweepContext(spec_dict, uri, exp_id, parent_id, optuna_storage=optuna_url, optuna_study=study_name)
        measurer = Measurer.for_sweep(spec, data_.splits, data_.student_factory)
        trials, students, interrupted = _search_and_confirm(spec, space, data_, ctx, client, storage, resume, measurer)
        trials, missing = reconcile.reconcile(client, exp_id, parent_id, trials)
        interrupted = interrupted or bool((trials["status"] == "KILLED").any())
        status = "KILLED" if interrupted else "FINISHED"
        trials, front, gain, summary = report(spec, trials, out_dir, {
            "versions": versions(), "spec": spec_dict, "data": data_info, "teacher": teacher_info,
            **({"teachers": teachers_info} if teachers_info else {}),
            "teacher_forward_passes": forward_passes(trials),
            "wall_seconds": {"teacher_and_data": round(teacher_done - started, 1),
                             "sweep": round(time.time() - teacher_done, 1), "total": round(time.time() - started, 1),
                             "measuring": round(measurer.seconds, 1)},
            "interrupted": interrupted, "optuna": {"storage": optuna_url, "study_name": study_name}})
        missing += epilogue.at_sweep_end(epilogue.Sweep(spec, data_, out_dir, client, uri, parent_id),
                                         trials, front, students, interrupted)
        log(f"runs in the MLflow UI: {tracking.ui_link(uri, exp_id)}")
        if interrupted:
            log(f"interrupted: partial results written to {out_dir}/. {hint}")
    except KeyboardInterrupt:  # before or between Tune's own graceful stops: nothing to write yet
        status = "KILLED"
        log(f"interrupted. {hint}")
        raise
    finally:
        closed = tracking.guarded("close runs", tracking.close_open_children, client, exp_id, parent_id, "KILLED")
        if closed:
            log(f"ended {closed} unfinished MLflow run(s) as KILLED")
        if tracking.guarded("end parent", tracking.end_run, client, parent_id, status, default=False) is False:
            missing.append("parent run status")
        _stop_ray(temp_dir)
    epilogue.record_missing(out_dir, parent_id, missing)
    return SweepResult(trials, front, gain, exp_id, parent_id, out_dir, status, summary, sorted(set(missing)),
                       out_dir / "report")


def _start_ray(spec, address: Optional[str], py_modules: list[str]) -> Optional[str]:
    """init_ray; with multi-worker trials, a SpecError (Ray stopped again) when one trial's workers
    cannot all be placed on the cluster. Returns init_ray's temp dir."""
    temp_dir = init_ray(address or spec.ray.address, py_modules)
    if spec.resources.workers > 1:
        import ray

        from kdtune.distributed import check_placeable

        try:
            check_placeable(spec, ray.nodes())
        except SpecError:
            _stop_ray(temp_dir)
            raise
    return temp_dir


def _stop_ray(temp_dir: Optional[str]) -> None:
    """ray.shutdown, and the private local Ray's temp dir removed."""
    import ray

    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def resume_hint(results_dir: str) -> str:
    return (f"Resume with: python -m kdtune.sweep SPEC --resume --results-dir {results_dir} "
            "(and the same --set options), or kdtune.run(..., resume=True)")


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


def _search_and_confirm(spec, space, data, ctx, client, storage: str, resume: bool,
                        measurer) -> tuple[pd.DataFrame, dict, bool]:
    """Both phases' trials in the trials.csv layout, confirmation only after a complete search;
    (phase, trial id) -> (config, last checkpoint) of every trial, to rebuild its student; and
    whether a phase ended short of its trials (interrupted)."""
    from kdtune.search import (collect, record_recovered, recovered_runs, recovered_students, run_confirm, run_search,
                               search_size, trained)

    columns = space.columns + ["seed", "source_trial"]
    grid = run_search(spec, space, data, ctx, storage, resume, measurer)
    lost = recovered_runs(grid, ctx) if resume else []  # only a killed driver's snapshot can miss a trial
    if lost:
        log(f"{len(lost)} trial(s) that ended after Tune's last snapshot before a driver kill recovered from MLflow")
        added = study.guarded("record recovered trials", record_recovered, ctx, spec, lost, default=0)
        if added:
            log(f"Optuna: {added} recovered trial(s) added to the study on record")
    trials = collect(grid, columns, spec, "search", _ended(client, ctx), lost)
    students = {("search", tid): found for tid, found in trained(grid).items()}
    students.update({("search", tid): found for tid, found in recovered_students(lost, f"{storage}/search").items()})
    if len(trials) < search_size(spec, space) or (trials["status"] == "KILLED").any():
        return trials, students, True
    if spec.search.confirm_seeds == 0:
        return trials, students, False
    picks = confirm.candidates(trials, objectives(spec))
    by_trial = {tid: config for (_, tid), (config, _) in students.items()}
    points = [{**by_trial[tid], "seed": seed, "source_trial": tid}
              for tid in picks["trial_id"] for seed in confirm.seeds(spec.seed, spec.search.confirm_seeds)]
    log(f"confirming {len(picks)} configurations with {spec.search.confirm_seeds} fresh seeds each ({len(points)} runs)")
    grid = run_confirm(spec, data, replace(ctx, phase="confirm"), storage, points, resume)
    reruns = collect(grid, columns, spec, "confirm", _ended(client, ctx))
    students.update({("confirm", tid): found for tid, found in trained(grid).items()})
    return pd.concat([trials, reruns], ignore_index=True), students, len(grid) < len(points)


def _ended(client, ctx) -> dict:
    """The statuses the driver gave the runs; none when the tracking server is down (collect then
    reads them from Tune's results)."""
    return tracking.guarded("read statuses", tracking.ended_statuses, client, ctx.experiment_id, ctx.parent_run_id,
                            default={})


def objectives(spec) -> list[tuple[str, str]]:
    return [(o.metric, o.mode) for o in spec.search.objectives]


def report(spec, trials, out_dir: Path, summary: dict) -> tuple:
    """Write the result files and print the tables: (trials, front, gain, summary)."""
    front, gain = confirm.tables(trials, objectives(spec))
    front, gap = results.teacher_gap(trials, front, gain, summary["teacher"]["test_acc"])
    trials = results.mark_search_front(trials, objectives(spec))
    counts = trials[trials["phase"] == "search"]["status"].value_counts().to_dict()
    which = confirm.which_teacher(trials, objectives(spec))
    summary.update({"trials": counts, "front": front.to_dict("records"), "kd_gain": gain.to_dict("records"),
                    "teacher_gap": gap, **({"which_teacher": which.to_dict("records")} if not which.empty else {})})
    results.write_csv(trials, out_dir / "trials.csv")
    results.write_csv(front, out_dir / "pareto.csv")
    results.plot_pareto(trials, front, out_dir / "pareto.png", accuracy_metric(objectives(spec)),
                        results.cost_metrics(objectives(spec)))
    results.write_json(summary, out_dir / "summary.json")
    if not which.empty:
        results.write_csv(which, out_dir / "which_teacher.csv")
    print(results.terminal_report(front, gain, counts, gap, which))
    print(f"files in {out_dir}/")
    return trials, front, gain, summary
