"""Which configurations the confirmation phase retrains, and the paired KD-gain interval."""
import math

import pandas as pd

from kdtune.confirm import candidates, confirmed_means, gain_table
from kdtune.results import kd_gain_table

OBJECTIVES = [("val_acc", "max"), ("params", "min")]


def search_trial(trial_id, loss, arch, width, params, val_acc):
    return {"trial_id": trial_id, "phase": "search", "loss": loss, "student.arch": arch, "width": width,
            "student": f"{arch} {width}", "params": params, "val_acc": val_acc, "test_acc": val_acc,
            "status": "FINISHED"}


# gapnet dominates the front; mlp (a dense family) is never on it.
TRIALS = pd.DataFrame([
    search_trial("g4-none", "none", "gapnet", 4, 1546, 0.975),
    search_trial("g4-kd", "kd", "gapnet", 4, 1546, 0.978),
    search_trial("g12-none", "none", "gapnet", 12, 9034, 0.990),
    search_trial("g12-crd", "crd", "gapnet", 12, 9034, 0.988),
    search_trial("m64-none", "none", "mlp", 64, 52650, 0.972),
    search_trial("m64-rkd", "rkd", "mlp", 64, 52650, 0.974),
    search_trial("m256-none", "none", "mlp", 256, 235146, 0.976),
    search_trial("m256-kd", "kd", "mlp", 256, 235146, 0.979),
    search_trial("m256-crd", "crd", "mlp", 256, 235146, 0.977),
])


def test_front_sizes_and_each_off_front_familys_best_distilled_size_are_confirmed():
    picks = candidates(TRIALS, OBJECTIVES)
    assert sorted(picks["trial_id"]) == sorted(["g4-none", "g4-kd", "g12-none", "g12-crd", "m256-none", "m256-kd"])


def test_a_family_on_the_front_adds_nothing_more():
    gapnet_only = TRIALS[TRIALS["student.arch"] == "gapnet"]
    assert sorted(candidates(gapnet_only, OBJECTIVES)["trial_id"]) == ["g12-crd", "g12-none", "g4-kd", "g4-none"]


def test_gain_is_paired_by_seed_with_a_t_interval():
    picks = candidates(TRIALS, OBJECTIVES)
    base, kd = [0.970, 0.974, 0.972], [0.975, 0.980, 0.979]
    runs = pd.DataFrame([{"source_trial": tid, "seed": seed, "test_acc": acc, "status": "FINISHED",
                          "phase": "confirm"}
                         for tid, accs in (("m256-none", base), ("m256-kd", kd)) for seed, acc in zip((1, 2, 3), accs)])
    row = gain_table(runs, picks).set_index("student").loc["mlp 256"]
    diffs = [k - b for k, b in zip(kd, base)]  # 0.005, 0.006, 0.007
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, df=2)
    assert math.isclose(row["gain"], mean) and math.isclose(row["ci95_low"], mean - half)
    assert math.isclose(row["ci95_high"], mean + half)
    assert (row["method"], row["seeds"], row["verdict"]) == ("kd", 3, "gain")


# An `evaluate` metric as the first objective: where val_f1 and val_acc disagree, val_f1 decides.
F1_OBJECTIVES = [("val_f1", "max"), ("params", "min")]
F1_TRIALS = pd.DataFrame([
    {**search_trial("g4-none", "none", "gapnet", 4, 1546, 0.975), "val_f1": 0.90, "test_f1": 0.91},
    {**search_trial("g4-kd", "kd", "gapnet", 4, 1546, 0.980), "val_f1": 0.93, "test_f1": 0.92},
    {**search_trial("g4-crd", "crd", "gapnet", 4, 1546, 0.985), "val_f1": 0.92, "test_f1": 0.95},
])


def test_an_evaluate_metric_as_first_objective_chooses_the_trials_and_measures_the_gain():
    picks = candidates(F1_TRIALS, F1_OBJECTIVES)
    assert sorted(picks["trial_id"]) == ["g4-kd", "g4-none"]  # on val_acc it would be g4-crd
    [row] = kd_gain_table(F1_TRIALS, F1_OBJECTIVES).to_dict("records")
    assert (row["best_method"], row["baseline_val_f1"], row["kd_test_f1"]) == ("kd", 0.90, 0.92)
    assert math.isclose(row["test_gain"], 0.92 - 0.91)
    runs = pd.DataFrame([{"source_trial": tid, "seed": seed, "val_acc": 0.9, "test_acc": 0.9, "val_f1": f1 - 0.01,
                          "test_f1": f1, "status": "FINISHED", "phase": "confirm"}
                         for tid, f1s in (("g4-none", (0.90, 0.91)), ("g4-kd", (0.93, 0.95))) for seed, f1 in zip((1, 2), f1s)])
    [gain] = gain_table(runs, picks, F1_OBJECTIVES).to_dict("records")
    assert math.isclose(gain["gain"], 0.035) and math.isclose(gain["kd_test_f1"], 0.94)
    means = confirmed_means(runs, picks).set_index("source_trial")
    assert math.isclose(means.loc["g4-kd", "val_f1"], 0.93) and math.isclose(means.loc["g4-none", "test_f1"], 0.905)
