"""Optuna's parameter importances for val_acc, from the search trials as MLflow holds them.

The trials are replayed into an in-memory Optuna study with the spec's own distributions
(so a loguniform parameter is judged on its log scale), one objective: the accuracy. As in
any Optuna study, fANOVA ranks the parameters every finished trial has (a method's own
parameters exist only in that method's trials)."""
from __future__ import annotations

import math

import pandas as pd


def distributions(spec_dict: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from kdtune.space import parse_space
    from kdtune.spec import Spec

    space = parse_space(Spec.model_validate(spec_dict))

    def dist(dim):
        if dim.form == "choice":
            return CategoricalDistribution(list(dim.args))
        if dim.form == "int":
            return IntDistribution(*dim.args)
        if dim.form in ("uniform", "loguniform"):
            return FloatDistribution(*dim.args, log=dim.form == "loguniform")
        return None

    found = {name: dist(dim) for name, dim in space.params.items()}
    for key, branches in (("student.arch", space.archs), ("loss", space.methods)):
        if len(branches) > 1:
            found[key] = CategoricalDistribution(list(branches))
        for branch, dims in branches.items():
            found.update({f"{branch}.{p}": dist(d) for p, d in dims.items()})
    return {k: v for k, v in found.items() if v is not None}


def importances(trials: pd.DataFrame, spec_dict: dict, metric: str = "val_acc") -> pd.DataFrame:
    """(param, importance) sorted, for `metric` over the finished search trials; empty when
    fewer than two trials or no parameter varies."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(spec_dict)
    done = trials[(trials["phase"] == "search") & (trials["status"] == "FINISHED") & trials[metric].notna()]
    mode = next((o["mode"] for o in spec_dict["search"]["objectives"] if o["metric"] == metric), "max")
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, row in done.iterrows():
        params = {}
        for name, dist in dists.items():
            value = row.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                value = next((c for c in dist.choices if str(c) == str(value) or c == value), None)
                if value is None:
                    continue
            elif isinstance(dist, optuna.distributions.IntDistribution):
                value = int(value)
            else:
                value = float(value)
            params[name] = value
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=float(row[metric])))
    if len(study.trials) < 2:
        return pd.DataFrame(columns=["param", "importance"])
    try:
        found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # no parameter common to all trials, or none varies
        return pd.DataFrame(columns=["param", "importance"])
    return pd.DataFrame(list(found.items()), columns=["param", "importance"])
