"""Which teacher, and learning without one, on full MNIST: the default spec's students at all
their sizes, KD from each teacher kind (the default strong teacher, a weaker one, an assistant
distilled from the strong one, and the ensemble of the two) and the teacher-free methods, each
trained with fresh seeds and compared, paired by seed, with the no-KD baseline of its size; and
what each method costs an epoch.

    python benchmarks/teachers.py --part costs       # on a quiet machine: the epoch-time ratios
    python benchmarks/teachers.py --part accuracy    # the which-teacher table (--workers 2 on 2 cores)

Both parts update benchmarks/teachers.json. No search: default method parameters and the
default spec's recipe (5 epochs); the trials run through kdtune's own teacher and trial code,
one thread each, as a sweep's trials do.
"""
import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
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

DEFAULT = load_spec("search_spaces/mnist.yaml")
STRONG = DEFAULT.teacher.model_dump(exclude_none=True)  # gapnet_dense, 8 epochs: the default sweep's teacher
TEACHERS = {"gapnet_dense": STRONG,
            "mlp256": {**STRONG, "arch": "mlp", "kwargs": {"width": 256}},  # weaker with 3x the params: the largest student's arch
            "assistant": {**STRONG, "arch": "gapnet", "kwargs": {"width": 24}, "distil_from": "gapnet_dense"},
            "ensemble": {"ensemble": ["gapnet_dense", "mlp256"]}}
STUDENTS = [("gapnet", 4), ("gapnet", 6), ("gapnet", 12), ("mlp", 64), ("mlp", 256)]  # the default spec's sizes
COSTED = {"kd": {"loss": "kd", "teacher": "gapnet_dense"}, "ensemble_kd": {"loss": "kd", "teacher": "ensemble"},
          "dml2": {"loss": "dml", "dml.peers": 2}, "byot": {"loss": "byot"}}


def spec_for(args):
    return load_spec({"name": "teachers-bench", "seed": DEFAULT.seed,
                      "data": {"root": args.root, "val_size": DEFAULT.data.val_size, "train_limit": args.train_limit},
                      "teachers": TEACHERS, "student": {"arch": "gapnet"},
                      "train": {**DEFAULT.train.model_dump(exclude_none=True), "epochs": args.epochs},
                      "search": {"space": {"teacher": {"choice": list(TEACHERS)},
                                           "loss": {"none": {}, "kd": {}, "dml": {}, "byot": {}}}}})


def configs(arch: str):
    """Each compared configuration: the baseline, KD from each teacher, dml, and byot (it needs
    stage feature maps: the conv students only)."""
    yield {"loss": "none"}
    for teacher in TEACHERS:
        yield {"loss": "kd", "teacher": teacher}
    yield {"loss": "dml"}
    if arch == "gapnet":
        yield {"loss": "byot"}


def student(arch: str, width: int) -> dict:
    return {"student.arch": arch, "width": width}


def one_run(job):
    """One seeded training (in a worker process: the data are the parent's, inherited by fork)."""
    config, seed = job
    torch.set_num_threads(1)
    epochs = []
    m = run_trial(resolve(SPEC, {**config, "seed": seed}), DATA, lambda metrics, _: epochs.append(metrics["epoch_seconds"]))
    return {"params": m["params"], "val_acc": m["val_acc"], "test_acc": m["test_acc"],
            "epoch_seconds": sorted(epochs)[len(epochs) // 2]}


def accuracy(args) -> dict:
    jobs, rows = [], []
    for arch, width in [s for s in STUDENTS if not args.students or f"{s[0]} {s[1]}" in args.students]:
        for n, config in enumerate(configs(arch)):
            jobs += [({**config, **student(arch, width), "trial_id": f"{arch}{width}-{n}"}, seed)
                     for seed in range(1, args.seeds + 1)]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for (config, seed), m in zip(jobs, pool.map(one_run, jobs)):
            plan = resolve(SPEC, config)
            row = {"trial_id": f"{config['trial_id']}-s{seed}", "source_trial": config["trial_id"], "seed": seed,
                   "phase": "confirm", "loss": plan.method, "teacher": plan.teacher, "student": plan.student,
                   "student.arch": config["student.arch"], "width": config["width"], **m, "status": "FINISHED"}
            log(f"{plan.student} {plan.method} {plan.teacher or '-'} seed {seed}: test_acc {m['test_acc']:.4f}")
            rows.append(row)
            if seed == 1:  # the configuration's "search" row: one per teacher, so each is its teacher's best
                rows.append({**row, "trial_id": config["trial_id"], "phase": "search"})
    trials = pd.DataFrame(rows)
    objectives = [("val_acc", "max"), ("params", "min")]
    which = pd.concat([which_teacher(group, objectives) for _, group in trials.groupby("student", sort=False)])
    print(which.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    runs = trials[trials["phase"] == "confirm"]  # each run's median epoch, two runs at a time on the 2 workers
    epoch = runs.groupby(["student", "loss", runs["teacher"].fillna("-")], sort=False)["epoch_seconds"].median()
    return {"which_teacher": which.to_dict("records"), "epoch_seconds": {" | ".join(k): v for k, v in epoch.items()}}


def costs(args) -> dict:
    """Each costed method's one-epoch time (validation included) over the KD epoch's, per student.
    The methods take turns, round after round. A shared CPU's slow episodes last seconds, as long
    as an epoch, so the ratio is of the fastest epochs (uncontended, as kdtune.measure times
    latency); beside it, the median over rounds of the ratio to the same round's KD epoch."""
    seconds = {}
    for _ in range(args.cost_rounds):
        for arch, width in STUDENTS:
            for name, config in COSTED.items():
                if name == "byot" and arch != "gapnet":
                    continue
                plan = resolve(SPEC, {**config, **student(arch, width), "train.epochs": 1})
                seconds.setdefault((f"{arch} {width}", name), []).append(run_trial(plan, DATA, lambda *_: None)["epoch_seconds"])
    out = {}
    for (who, name), values in seconds.items():
        kd = seconds[(who, "kd")]
        out.setdefault(who, {"kd_epoch_seconds": min(kd)})
        if name != "kd":
            paired = sorted(v / k for v, k in zip(values, kd))
            out[who][f"{name}_over_kd"] = min(values) / min(kd)
            out[who][f"{name}_over_kd_paired"] = paired[len(paired) // 2]
    print(pd.DataFrame(out).T.to_string(float_format=lambda v: f"{v:.3f}"))
    return {"cost_ratios": out, "cost_rounds": args.cost_rounds,
            "epoch_seconds": {f"{who} {name}": values for (who, name), values in seconds.items()}}


def main() -> None:
    global SPEC, DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["costs", "accuracy"], required=True)
    parser.add_argument("--root", default="data")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=DEFAULT.train.epochs)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--students", nargs="+", metavar="STUDENT", help='only these, e.g. "gapnet 4" "mlp 64"')
    parser.add_argument("--cost-rounds", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/teachers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    SPEC = spec_for(args)
    started = time.time()
    DATA, facts = prepare_teachers(SPEC, parse_space(SPEC), load_splits(SPEC.data, SPEC.seed), None, None, None, None,
                                   Path("/tmp"))
    teachers_seconds = round(time.time() - started, 1)
    teachers = {name: {k: facts["teachers"][name].get(k) for k in ("source", "params", "test_acc", "forward_passes")}
                for name in facts["teachers"]}
    print(json.dumps(teachers, indent=2, default=str))
    found = (accuracy if args.part == "accuracy" else costs)(args)
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.exists() else {}
    run = {"date": time.strftime("%Y-%m-%d %H:%M"), "setting": vars(args), "teachers": teachers,
           "teachers_seconds": teachers_seconds, **found}
    if args.part == "costs":  # every run kept: the spread between runs is part of the answer
        kept.setdefault("costs", []).append(run)
    else:
        kept["accuracy"] = run
    out.write_text(json.dumps(kept, indent=2, default=str))


if __name__ == "__main__":
    main()
