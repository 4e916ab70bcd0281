"""The sweep's Optuna study on record (RDB storage: `optuna.db`, or `search.optuna_storage`).

The searcher samples from its own in-memory study, as a hand-written Tune + OptunaSearch sweep
does, and Tune checkpoints it with the searcher. The study on record gets one write per trial,
made where the outcome is known: a completed or diverged trial adds itself from its own process,
after it ended its MLflow run; the driver adds the early-stopped and the failed, and the trials that
cannot reach the study (a sqlite file on another node). An RDB write per
ask, parameter and tell in the driver's event loop cost more than all the rest of its work.
"""
from __future__ import annotations

from pathlib import Path

import optuna

from kdtune import tracking
from kdtune.measure import violations
from kdtune.space import parse_space
from kdtune.spec import Spec

DB_FILE = "optuna.db"  # the study on record without `search.optuna_storage`, beside the results
RECORDED_KEY = "study_recorded"  # in a completed trial's last result: False when the driver must record it
TRIAL_ATTR = "kdtune.trial_id"  # the trial's id, as MLflow's `kdtune.trial_id` tag holds it
DIRECTIONS = {"max": "maximize", "min": "minimize"}
STATES = {"FINISHED": optuna.trial.TrialState.COMPLETE, "STOPPED": optuna.trial.TrialState.PRUNED,
          "FAILED": optuna.trial.TrialState.FAIL, "INFEASIBLE": optuna.trial.TrialState.COMPLETE}
UNTRAINED = {"max": 0.0, "min": 1e9}  # what an untrained (infeasible) trial is told on a trained metric, by mode


def location(spec: Spec, out_dir: Path, parent_id: str) -> tuple[str, str]:
    """(absolute storage URL, study name) of the sweep's Optuna study: `search.optuna_storage`, else
    sqlite next to the results. The name holds the parent run id, so --resume finds the same study."""
    url = spec.search.optuna_storage or f"sqlite:///{(Path(out_dir) / DB_FILE).resolve()}"
    url = tracking.absolute_uri(url) if url.startswith("sqlite:") else url
    if url.startswith("sqlite:////"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return url, f"{spec.name}-{parent_id}"


def create(url: str, name: str, spec: Spec) -> None:
    """The study with the spec's objectives (kept as it is on --resume)."""
    optuna.create_study(study_name=name, storage=url, load_if_exists=True,
                        directions=[DIRECTIONS[o.mode] for o in spec.search.objectives])


def reachable(url: str) -> bool:
    """Whether this process can write the study: a sqlite file must be on its own node's disk, which
    a trial on another node of a cluster without shared storage does not have (an RDB server is
    reached from every node)."""
    return not url.startswith("sqlite:///") or Path(url[len("sqlite:///"):]).is_file()


def sampled(spec: Spec, config: dict) -> optuna.trial.FixedTrial:
    """The trial's Optuna parameters and their distributions, replayed through the define-by-run space."""
    fixed = optuna.trial.FixedTrial(config)
    parse_space(spec)(fixed)
    return fixed


def record(url: str, name: str, spec: Spec, trial_id: str, config: dict, metrics: dict, status: str) -> None:
    """Add the trial's outcome (kdtune's status: FINISHED, STOPPED, FAILED or INFEASIBLE): its
    objectives and constraint values when it finished or was infeasible, as Tune's OptunaSearch
    tells them; a pruned or failed trial has none."""
    state = STATES[status]
    fixed = sampled(spec, config)
    complete = state == optuna.trial.TrialState.COMPLETE
    if complete and status == "INFEASIBLE":
        metrics = {**metrics, **untrained_values(spec, metrics)}
    values = [float(metrics[o.metric]) for o in spec.search.objectives] if complete else None
    constraints = named_violations(metrics, spec.search.constraints) if complete and spec.search.constraints else None
    trial = optuna.trial.create_trial(params=fixed.params, distributions=fixed.distributions, values=values,
                                      state=state, user_attrs={TRIAL_ATTR: trial_id}, constraints=constraints)
    optuna.load_study(study_name=name, storage=url).add_trial(trial)


def untrained_values(spec: Spec, metrics: dict) -> dict:
    """An infeasible trial's objectives: its measured costs, and on a metric only training gives the
    worst value (UNTRAINED). Optuna's constrained samplers rank infeasible trials by their violation
    alone, so these never steer the search; they only let Optuna take the trial as COMPLETE."""
    return {o.metric: metrics.get(o.metric, UNTRAINED[o.mode]) for o in spec.search.objectives}


def named_violations(metrics: dict, constraints) -> dict[str, float]:
    """The constraint values the study on record keeps: `<metric>.max` / `<metric>.min`, <= 0 when met."""
    names = [f"{c.metric}.{bound}" for c in constraints for bound in ("max", "min") if getattr(c, bound) is not None]
    return dict(zip(names, violations(metrics, constraints)))


def recorded_ids(url: str, name: str) -> set[str]:
    """The trial ids the study holds."""
    study = optuna.load_study(study_name=name, storage=url)
    return {t.user_attrs.get(TRIAL_ATTR) for t in study.get_trials(deepcopy=False)}


def recorded(url: str, name: str, trial_id: str) -> bool:
    """Whether the study holds the trial (a trial replayed after a driver kill may have added itself)."""
    return trial_id in recorded_ids(url, name)


def guarded(what: str, fn, *args, default=None):
    """`fn(*args)`, or `default` when the study's storage fails: the trial's training counts more
    than its line in the study (MLflow holds its outcome too)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any storage failure
        print(f"kdtune: Optuna study unavailable ({what}): {tracking.first_line(exc)}", flush=True)
        return default
