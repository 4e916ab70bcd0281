"""Which teacher, and learning without one, on an MNIST slice: every teacher kind and the
teacher-free methods at the default gapnet student sizes, each configuration trained with
fresh seeds and compared, paired by seed, with the no-KD baseline of its size; and what each
costs an epoch, measured in the same run.

    python benchmarks/teachers.py [--train-limit 20000] [--epochs 5] [--seeds 3] [--out benchmarks/teachers.json]

Short by design (a slice, few epochs, default method parameters, no search): the trials run in
this process through kdtune's own trial and teacher code, one thread each, as a sweep's trials do.
"""
import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from kdtune import load_spec
from kdtune.confirm import which_teacher
from kdtune.data.resolve import load_splits
from kdtune.log import log
from kdtune.runner import prepare_teachers
from kdtune.space import parse_space, resolve
from kdtune.trial import run_trial

STRONG = {"arch": "gapnet_dense", "epochs": 6, "batch_size": 256, "optimizer": "adamw", "lr": 0.03,
          "weight_decay": 0.0005, "schedule": {"type": "onecycle", "warmup_epochs": 1}, "augment": {"crop": 2}}
TEACHERS = {"gapnet_dense": STRONG,
            "mlp32": {"arch": "mlp", "kwargs": {"width": 32}, "epochs": 1},  # the weaker teacher
            "assistant": {**STRONG, "arch": "gapnet", "kwargs": {"width": 12}, "distil_from": "gapnet_dense"},
            "ensemble": {"ensemble": ["gapnet_dense", "mlp32"]}}
WIDTHS = (4, 12)  # gapnet students of 1.5k and 9.0k params (the default spec's smallest and largest)


def spec_for(args):
    return load_spec({"name": "teachers-bench", "data": {"root": args.root, "val_size": 2000,
                                                          "train_limit": args.train_limit, "test_limit": 5000},
                      "teachers": TEACHERS, "student": {"arch": "gapnet"},
                      "train": {"epochs": args.epochs, "batch_size": 256, "optimizer": "adamw", "lr": 0.03,
                                "weight_decay": 0.0005, "schedule": {"type": "onecycle", "warmup_epochs": 0.5}},
                      "search": {"space": {"teacher": {"choice": list(TEACHERS)},
                                           "loss": {"none": {}, "kd": {}, "dml": {}, "byot": {}}}}})


def configs():
    """Each compared configuration: the baseline, KD from each teacher, dml and byot."""
    yield {"loss": "none"}
    for teacher in TEACHERS:
        yield {"loss": "kd", "teacher": teacher}
    yield {"loss": "dml"}
    yield {"loss": "byot"}


COSTED = {"kd": {"loss": "kd", "teacher": "gapnet_dense"}, "ensemble_kd": {"loss": "kd", "teacher": "ensemble"},
          "dml2": {"loss": "dml", "dml.peers": 2}, "byot": {"loss": "byot"}}


def cost_ratios(spec, data, rounds: int) -> dict:
    """Each costed method's median one-epoch time (validation included) over the KD epoch's, at
    each width: the methods take turns, round after round, so that the machine's other load
    weighs on all of them alike."""
    seconds = {(w, name): [] for w in WIDTHS for name in COSTED}
    for _ in range(rounds):
        for w in WIDTHS:
            for name, config in COSTED.items():
                plan = resolve(spec, {**config, "width": w, "train.epochs": 1})
                seconds[(w, name)].append(run_trial(plan, data, lambda m, get_state: None)["epoch_seconds"])
    median = {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}
    return {f"gapnet {w}": {**{f"{name}_over_kd": median[(w, name)] / median[(w, "kd")] for name in COSTED
                               if name != "kd"}, "kd_epoch_seconds": median[(w, "kd")]} for w in WIDTHS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data")
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cost-rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/teachers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = spec_for(args)
    splits = load_splits(spec.data, spec.seed)
    started = time.time()
    data, facts = prepare_teachers(spec, parse_space(spec), splits, None, None, None, None, Path("/tmp"))
    teachers_seconds = time.time() - started
    rows = []
    for width in WIDTHS:
        for n, config in enumerate(configs()):
            trial_id = f"w{width}-{n}"
            for seed in range(1, args.seeds + 1):
                plan = resolve(spec, {**config, "width": width, "seed": seed})
                epochs = []
                m = run_trial(plan, data, lambda metrics, get_state: epochs.append(metrics["epoch_seconds"]))
                row = {"trial_id": f"{trial_id}-s{seed}", "source_trial": trial_id, "seed": seed, "phase": "confirm",
                       "loss": plan.method, "teacher": plan.teacher, "student": plan.student, "width": width,
                       "student.arch": "gapnet",
                       "params": m["params"], "val_acc": m["val_acc"], "test_acc": m["test_acc"],
                       "epoch_seconds": sorted(epochs)[len(epochs) // 2], "status": "FINISHED"}
                log(f"{plan.student} {plan.method} {plan.teacher or '-'} seed {seed}: test_acc {m['test_acc']:.4f} "
                    f"({m['epoch_seconds']:.1f}s/epoch)")
                rows.append(row)
                if seed == 1:  # the configuration's "search" row: one per teacher, so each is its teacher's best
                    rows.append({**row, "trial_id": trial_id, "phase": "search"})
    trials = pd.DataFrame(rows)
    which = which_teacher(trials, [("val_acc", "max"), ("params", "min")])
    runs = trials[trials["phase"] == "confirm"]
    epoch = runs.groupby(["width", "loss", runs["teacher"].fillna("-")])["epoch_seconds"].median()
    ratios = cost_ratios(spec, data, args.cost_rounds)
    out = {"date": time.strftime("%Y-%m-%d"), "setting": vars(args), "teachers_seconds": round(teachers_seconds, 1),
           "teachers": {name: {k: facts["teachers"][name].get(k) for k in ("source", "params", "test_acc",
                                                                            "forward_passes")}
                        for name in facts["teachers"]},
           "which_teacher": which.to_dict("records"), "epoch_seconds": {"|".join(map(str, k)): v for k, v in epoch.items()},
           "cost_ratios": ratios}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(which.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(json.dumps({"teachers": out["teachers"], "cost_ratios": ratios}, indent=2, default=str))


if __name__ == "__main__":
    main()
