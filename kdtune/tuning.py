"""The thin Ray Tune layer: the trainable around `run_trial`, the searcher and the callbacks."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import optuna
import ray
import torch
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from kdtune import study, tracking
from kdtune.measure import Measurer, feasible, violations
from kdtune.space import parse_space, resolve
from kdtune.spec import Spec
from kdtune.trial import SweepData, run_trial

STATE_FILE = "trial_state.pt"
DEPLOY_KEY = "deploy"  # in a trial's config: its architecture's figures (kdtune.measure), added by the driver


@dataclass
class SweepContext:
    """Facts every trial needs besides its config and the shared data."""

    spec_dict: dict
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    phase: str = "search"
    optuna_storage: str | None = None  # the search's Optuna study: RDB storage URL and study name
    optuna_study: str | None = None


def trial_params(plan, config: dict) -> dict:
    """A trial's parameters for MLflow: the sampled config plus the resolved student and method."""
    method_defaults = {f"{plan.method}.{k}": v for k, v in plan.method_params.items()}
    student = plan.spec.student
    return {"loss": plan.method, "student.arch": student.arch, "width": student.width,
            **{f"student.kwargs.{k}": v for k, v in student.kwargs.items()}, "train.lr": plan.spec.train.lr, "train.epochs": plan.spec.train.epochs, "seed": plan.seed,
            "train.effective_batch_size": effective_batch(plan.spec), **method_defaults,
            **{k: v for k, v in config.items() if k != DEPLOY_KEY},
            **({"teacher": plan.teacher} if plan.teacher else {})}


def effective_batch(spec) -> int:
    """Examples per optimizer step: the batch of each worker, of each accumulated micro-batch."""
    return spec.train.batch_size * spec.train.accumulate * spec.resources.workers


def load_state(checkpoint: tune.Checkpoint, device="cpu") -> dict:
    """A trial checkpoint's state: student, distiller, optimizer, ..., and the trial's MLflow run id."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)


def trial_tags(plan, ctx: SweepContext, config: dict) -> dict:
    """Tags the MLflow UI groups and filters trial runs by: phase, method, student and sweep
    (the parent run). The student's size, `kdtune.params`, follows with the first epoch. The
    config lets a resume rebuild a trial Tune's snapshot missed."""
    return {"kdtune.phase": ctx.phase, "kdtune.loss": plan.method, "kdtune.student": plan.student,
            **({"kdtune.teacher": plan.teacher} if plan.teacher else {}),
            "kdtune.sweep": ctx.parent_run_id, tracking.CONFIG_TAG: json.dumps(config, default=str)}


def trainable(config: dict, data: SweepData | None, ctx: SweepContext, workers=None) -> None:
    """Ray Tune function trainable: resume from a checkpoint if any, report every epoch. With
    `workers` (a kdtune.distributed.TrialWorkers, for resources.workers > 1) the trial is trained
    by them and this process only reports."""
    spec = Spec.model_validate(ctx.spec_dict)
    config = config.get("point", config)  # confirmation runs pass whole configs through grid_search
    figures = config.get(DEPLOY_KEY, {})  # measured by the driver, once per architecture
    plan = resolve(spec, config)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    device = "cuda" if spec.resources.gpu > 0 and torch.cuda.is_available() else "cpu"
    trial_id = tune.get_context().get_trial_name()  # kdtune's trial id (search.trial_name)
    checkpoint = tune.get_checkpoint()
    state = load_state(checkpoint, device) if checkpoint else None
    client = tracking.client(ctx.tracking_uri)
    run_id = state.get("mlflow_run_id") if state else None  # the checkpoint carries the trial's run
    if run_id is None:  # a new trial, or one whose run could not be created (tracking server down)
        name = f"{trial_id} {plan.method} {plan.student}"
        run_id = tracking.guarded("create run", tracking.child_run, client, ctx.experiment_id, ctx.parent_run_id,
                                  trial_id, name, trial_params(plan, config), trial_tags(plan, ctx, config))
    final = tracking.guarded("read run", tracking.final_result, client, run_id) if run_id else None
    if run_id and state and final is None:  # reopen the run (an interrupt may have ended it KILLED)
        tracking.guarded("reopen run", client.update_run, run_id, status="RUNNING")
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict, get_state) -> None:
        metrics = {**metrics, **figures, "mlflow_run_id": run_id, "node_id": node_id, "trial_name": trial_id}  # Tune sets "trial_id" itself
        if run_id and not metrics.get("replayed"):
            log_own_result(client, run_id, metrics, spec.train.epochs)
        if metrics.get("infeasible"):  # Tune and Optuna want every objective; never logged to MLflow
            metrics.update(study.untrained_values(spec, metrics))
        if metrics.get("done") and ctx.phase == "search":
            metrics[study.RECORDED_KEY] = record_own_outcome(ctx, spec, trial_id, config, metrics)
        if get_state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save({**get_state(), "mlflow_run_id": run_id}, Path(folder) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    if final is not None:  # the trial completed, but the driver was killed before Tune recorded it
        report({**final, "replayed": True}, None)
        return
    if figures and not figures["feasible"]:  # the architecture breaks a constraint: recorded, never trained
        report({"epoch": 0, "infeasible": True, "done": True}, None)
        return
    monitor = system_metrics(ctx, run_id, resumed=state is not None) if run_id else None
    try:
        if workers is not None:
            node_metrics = partial(system_metrics, ctx, run_id, state is not None) if run_id else None
            workers.train(plan, report, state, tune.get_context().get_trial_dir(), node_metrics)
        else:
            run_trial(plan, data.to(device) if device != "cpu" else data, report, state, device)
    finally:
        if monitor is not None:
            tracking.guarded("system metrics", monitor.finish)


def record_own_outcome(ctx: SweepContext, spec: Spec, trial_id: str, config: dict, metrics: dict) -> bool:
    """The completed search trial's outcome to the study on record (kdtune.study), after its run
    ended. False when this process cannot reach the study (a sqlite file on another node): the
    driver records it."""
    if not study.reachable(ctx.optuna_storage):
        return False
    status, _ = trial_status(metrics, spec.train.epochs, error=False)
    record_outcome(ctx, spec, trial_id, config, metrics, status)
    return True


def record_outcome(ctx: SweepContext, spec: Spec, trial_id: str, config: dict, metrics: dict, status: str) -> None:
    """The trial's outcome to the study on record, unless a replayed trial added it before the
    driver was killed."""
    url, name = ctx.optuna_storage, ctx.optuna_study
    if metrics.get("replayed") and study.guarded("read study", study.recorded, url, name, trial_id, default=True):
        return
    study.guarded("record trial", study.record, url, name, spec, trial_id, config, metrics, status)


def log_own_result(client, run_id: str, metrics: dict, epochs: int) -> None:
    """The trial's epoch to its run from the trial's own process, off Tune's event loop; a trial
    that completed (all epochs, or diverged) ends its run itself, before Tune hears of it, so a
    driver killed at any moment finds the run complete and a resume replays it."""
    tracking.guarded("log metrics", tracking.log_epoch, client, run_id, metrics)
    if metrics.get("done"):
        status, reason = trial_status(metrics, epochs, error=False)
        tracking.guarded("end run", tracking.end_run, client, run_id, status, reason or None)


SYSTEM_METRICS_INTERVAL_S = 5.0


def system_metrics(ctx: SweepContext, run_id: str, resumed: bool, node_id: str | None = None):
    """MLflow's system metrics for the trial's run (system/cpu_utilization_percentage, memory, disk,
    network; GPU with pynvml), sampled every 5 s in a thread; None without psutil, which MLflow needs.
    With `node_id` (a multi-worker trial's node), under system/<node_id>/.
    benchmarks/system_metrics.py measures what it costs a trial."""
    if importlib.util.find_spec("psutil") is None:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = tracking.guarded("system metrics", SystemMetricsMonitor, run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                               resume_logging=resumed, node_id=node_id, tracking_uri=ctx.tracking_uri)
    if monitor is not None:
        monitor.start()
    return monitor


class KDOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials without full results (a diverged
    trial is a FAIL and an early-stopped one PRUNED, never an accuracy), and that counts the trials
    MLflow holds as completed though Tune's last experiment snapshot never saw them (they started
    and ended between two snapshots, then the driver was killed): a resumed search samples that
    many fewer, so the search keeps its size and reruns nothing."""

    def __init__(self, *args, space, epochs: int, total: int, ctx: SweepContext, measurer: Measurer,
                 resume: bool = False, **kwargs):
        super().__init__(*args, space=space, **kwargs)
        self._epochs, self._total, self._ctx = epochs, total, ctx
        self._spec, self._measurer = Spec.model_validate(ctx.spec_dict), measurer
        self._suggested: set[str] = set()  # saved with the searcher in each experiment snapshot
        self._recovered = self._completed_elsewhere() if resume else set()  # resumed before Tune's first snapshot

    def _completed_elsewhere(self) -> set[str]:
        """Trial ids of the phase's completed runs that this searcher never suggested."""
        completed = tracking.guarded("find completed runs", tracking.completed_trial_ids, tracking.client(self._ctx.tracking_uri),
                                     self._ctx.experiment_id, self._ctx.parent_run_id, self._ctx.phase, default=set())
        return completed - self._suggested

    def suggest(self, trial_id: str):
        if trial_id not in self._suggested and len(self._suggested) + len(self._recovered) >= self._total:
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        self._suggested.add(trial_id)
        if isinstance(config, dict):
            figures = self._measurer(resolve(self._spec, config).spec.student)
            config = {**config, DEPLOY_KEY: {**figures, "feasible": feasible(figures, self._spec.search.constraints)}}
        return config

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._recovered = self._completed_elsewhere()

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and result.get("diverged"):
            result, error = None, True
        elif result and not error and not result.get("infeasible") and result.get("epoch", 0) < self._epochs:
            # an infeasible trial stays COMPLETE, so that constraints_func tells the sampler why
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)


def arch_violations(spec: Spec, measurer: Measurer, trial: "optuna.trial.FrozenTrial") -> list[float]:
    """Optuna's `constraints_func`: the sampled architecture's violations of search.constraints
    (figures the searcher measured when it suggested the trial)."""
    config = {**trial.params, **parse_space(spec)(optuna.trial.FixedTrial(trial.params))}
    return violations(measurer(resolve(spec, config).spec.student), spec.search.constraints)


def error_summary(error) -> str:
    """The last line of an error's trace: the exception and its message."""
    lines = [line for line in str(error or "").strip().splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else "error"


def trial_status(result: dict | None, epochs: int, error: bool) -> tuple[str, str]:
    """(status, reason) of a trial, as trials.csv and MLflow show it."""
    if error:
        return "FAILED", "error"
    if not result:
        return "KILLED", "no result"
    if result.get("infeasible"):
        return "INFEASIBLE", "the architecture breaks search.constraints; not trained"
    if result.get("diverged"):
        return "FAILED", "diverged"
    if result.get("epoch", 0) >= epochs:
        return "FINISHED", ""
    return "STOPPED", "early-stopped by the scheduler"


class TrackingCallback(tune.Callback):
    """Driver side, a bounded amount of work per trial and none per epoch (the trials log their
    own epochs, end their own runs and record their own outcome in the study when they complete):
    ends the run of a trial that the scheduler stopped, that failed or that never reported, records
    the stopped and failed in the study, and prints one progress line per finished trial."""

    def __init__(self, ctx: SweepContext, epochs: int, total: int, objective: str, mode: str, out=sys.stdout):
        self.ctx, self.epochs, self.total = ctx, epochs, total
        self.objective, self.sign = objective, 1 if mode == "max" else -1
        self.done, self.best = 0, None
        self.out = out

    def __getstate__(self):  # Tune pickles callbacks with the experiment; streams do not pickle
        return {**self.__dict__, "out": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.out = sys.stdout

    @property
    def client(self) -> "tracking.MlflowClient":
        return tracking.client(self.ctx.tracking_uri)

    def _run_id(self, trial) -> str | None:
        if trial.last_result and trial.last_result.get("mlflow_run_id"):
            return trial.last_result["mlflow_run_id"]
        runs = tracking.guarded(
            "find run", self.client.search_runs, [self.ctx.experiment_id],
            f"tags.`{tracking.TRIAL_TAG}` = '{trial}' and tags.`{tracking.PARENT_TAG}` = '{self.ctx.parent_run_id}'",
            default=[])
        return runs[0].info.run_id if runs else None

    def _finish(self, trial, error: bool, reason: str | None = None):
        status, why = trial_status(trial.last_result, self.epochs, error)
        last = trial.last_result or {}
        ended_by_driver = error or not (last.get("done") or last.get("replayed"))  # else the trial ended its run
        if ended_by_driver:
            run_id = self._run_id(trial)
            if run_id:
                tracking.guarded("end run", tracking.end_run, self.client, run_id, status, reason or why or None)
        if self.ctx.phase == "search" and status in study.STATES and (
                ended_by_driver or last.get(study.RECORDED_KEY) is False):
            record_outcome(self.ctx, Spec.model_validate(self.ctx.spec_dict), str(trial), trial.config, last, status)
        self.done += 1
        value = last.get(self.objective)
        if status == "FINISHED" and isinstance(value, (int, float)) and not math.isnan(value):
            if self.best is None or self.sign * value > self.sign * self.best[0]:
                self.best = (value, str(trial))
        best = f"best {self.objective} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no finished trial yet"
        shown = f"{self.objective} {value:.4f}" if isinstance(value, float) and status != "INFEASIBLE" else ""
        print(f"[{self.done}/{self.total}] {trial} {status.lower()} {shown} | {best}", file=self.out, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=True, reason=error_summary(trial_error(trial)))


def trial_error(trial) -> str | None:
    """The trial's error trace: Tune writes it to the trial's local folder at once and copies it to
    the storage path (where `get_error` reads) with the next sync, which Tune's own snapshot period
    may not have reached yet when the callback runs."""
    local = trial.error_file
    if local and Path(local).is_file():
        return Path(local).read_text()
    return trial.get_error()
