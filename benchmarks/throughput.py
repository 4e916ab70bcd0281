"""Throughput of kdtune's training path against the tutorial loop, the compute floor and Ray Tune.

    python benchmarks/throughput.py --data-root DIR [--quick] [--trials N] [--out FILE]

Measures, in one run on the same data, machine and torch thread setting:
  1. seconds per KD-student epoch: the tutorial-style loop (torchvision DataLoader, teacher forward
     on every batch) vs kdtune's `run_trial` with the teacher logits cached once;
  2. a bare in-memory tensor loop of the same student without distillation (the compute floor)
     vs kdtune's KD trial epoch (the two interleaved epoch by epoch);
  3. N trials through kdtune's real Ray Tune path (`kdtune.search.run_search`: its trainable,
     OptunaSearch, reuse_actors=True, MLflow in a temp sqlite store) vs the same N configs run
     back to back in this process with `run_trial`;
  4. the KD epoch inside one Ray Tune trial with `--tune-threads` torch threads vs the floor loop
     with as many threads, in alternating rounds.
Prints the ratios and writes them as JSON. Times are wall-clock; the process CPU time of the
single-process loops is recorded too, as a cross-check that moves less with other load on
the machine. The teacher (mnist_cnn) is untrained: a random-init net costs the same per forward.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtune.data import DATASETS, batches
from kdtune.data.resolve import load_splits
from kdtune.models import count_params, create_model
from kdtune.space import parse_space, resolve
from kdtune.loading import validate
from kdtune.spec import spec_to_dict
from kdtune.teacher import compute_targets
from kdtune.trial import SweepData, run_trial

BATCH, LR, WIDTH, VAL_SIZE, SEED = 64, 1e-3, 128, 5000, 0
TEMPERATURE, ALPHA = 4.0, 0.9  # kdtune's KD defaults, used by every KD loop here
QUICK_FRACTION = 0.1
TARGETS = {"tutorial_over_kdtune_min": 30.0, "kdtune_over_floor_max": 1.5, "tune_overhead_per_trial_s_max": 1.5,
           "tune_trial_over_floor_max": 1.3}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="MNIST goes to DIR/MNIST/raw (unpacked from kdtune's bundled copy)")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON results (default: benchmarks/results.json)")
    parser.add_argument("--trials", type=int, default=8, help="trials in the Tune comparison (default 8)")
    parser.add_argument("--trial-epochs", type=int, default=2, help="epochs per trial in the Tune comparison (default 2)")
    parser.add_argument("--epochs", type=int, default=5, help="KD-trial and floor epochs; the median is reported (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every measured loop (default 1: what a kdtune trial with resources.cpu=1 uses)")
    parser.add_argument("--tune-threads", type=int, default=os.cpu_count(),
                        help="torch threads (resources.cpu) of the Tune trial and the floor loop in [4] (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating Tune-trial/floor rounds in [4] (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help=f"time the tutorial loop on {QUICK_FRACTION:.0%} of an epoch and extrapolate")
    return parser.parse_args(argv)


class Clock:
    """Wall and process-CPU seconds since construction."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def make_spec(args, trials: int = 1, epochs: int | None = None, threads: int | None = None):
    return validate({
        "name": "throughput", "seed": SEED,
        "data": {"dataset": "mnist", "root": args.data_root, "val_size": VAL_SIZE},
        "teacher": {"arch": "mnist_cnn"},
        "student": {"arch": "mlp", "width": WIDTH},
        "train": {"epochs": epochs or args.epochs, "batch_size": BATCH, "optimizer": "adam", "lr": LR},
        "search": {"space": {"loss": {"kd": {"temperature": {"loguniform": [1, 20]}, "alpha": {"uniform": [0.1, 0.99]}}}},
                   "num_samples": trials, "max_concurrent": 1, "baselines": False, "scheduler": None, "sampler": "tpe"},
        "resources": {"cpu": float(threads or args.threads), "gpu": 0.0},
    })


class TutorialLoop:
    """The PyTorch KD tutorial's loop: a DataLoader over torchvision's MNIST with ToTensor+Normalize,
    the teacher's forward on every batch, soft-target KL + label CE, Adam. `run(n)` times the
    next n batches of one shuffled epoch."""

    def __init__(self, args, splits, teacher):
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets, transforms

        info = DATASETS["mnist"]
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
        full = datasets.MNIST(args.data_root, train=True, download=False, transform=transform)
        # the same 55,000 images as kdtune's train split (load_splits' seeded permutation)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SEED))
        train = Subset(full, order[VAL_SIZE:].sort().values.tolist())
        assert len(train) == len(splits.train_y) and torch.allclose(train[0][0], splits.train_x[0], atol=1e-5)
        torch.manual_seed(SEED)
        self.loader = DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=0)
        self.teacher = teacher.eval()
        self.student = create_model("mlp", splits.in_shape, splits.num_classes, WIDTH).train()
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=LR)
        for _, batch in zip(range(3), self.loader):  # warm-up, untimed
            self.step(*batch)
        self.batches = iter(self.loader)

    def step(self, inputs, labels):
        self.optimizer.zero_grad()
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).logits
        student_logits = self.student(inputs).logits
        soft_targets = F.softmax(teacher_logits / TEMPERATURE, dim=-1)
        soft_prob = F.log_softmax(student_logits / TEMPERATURE, dim=-1)
        soft_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size(0) * TEMPERATURE ** 2
        loss = ALPHA * soft_loss + (1 - ALPHA) * F.cross_entropy(student_logits, labels)
        loss.backward()
        self.optimizer.step()

    def run(self, n: int) -> tuple[float, float]:
        clock = Clock()
        for _, batch in zip(range(n), self.batches):
            self.step(*batch)
        return clock.lap()


def fresh_floor(splits):
    """The floor loop's seeded student, its optimizer (fused Adam, what kdtune's trial uses for adam)
    and its batch-order generator."""
    torch.manual_seed(SEED)
    student = create_model("mlp", splits.in_shape, splits.num_classes, WIDTH)
    return student, torch.optim.Adam(student.parameters(), lr=LR, fused=True), torch.Generator().manual_seed(SEED)


def floor_epoch(student, optimizer, splits, generator) -> tuple[float, float]:
    """The compute floor: the same student on in-memory tensors, permuted indices, CE, no distillation.
    Rows are gathered with index_select, as kdtune does (about twice as fast as x[idx] on CPU)."""
    clock = Clock()
    for idx in batches(len(splits.train_y), BATCH, generator):
        x, y = splits.train_x.index_select(0, idx), splits.train_y.index_select(0, idx)
        loss = F.cross_entropy(student(x).logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return clock.lap()


def epochs_interleaved(args, data: SweepData, teacher) -> dict:
    """kdtune's KD trial epochs, floor epochs and the tutorial epoch, interleaved so that other load
    on the machine falls on all three alike: after each KD epoch, the report callback runs one
    floor epoch and the next 1/`epochs` of the tutorial epoch. KD wall time is kdtune's own
    `epoch_seconds` (it includes the validation pass); its CPU time is the process time between
    two callbacks."""
    tutorial = TutorialLoop(args, data.splits, teacher)
    per_epoch = len(tutorial.loader)
    timed = max(args.epochs, round(QUICK_FRACTION * per_epoch)) if args.quick else per_epoch
    chunks = [len(c) for c in torch.arange(timed).tensor_split(args.epochs)]
    student, optimizer, generator = fresh_floor(data.splits)
    out = {"kd": [], "kd_cpu": [], "floor": [], "floor_cpu": [], "tutorial": [], "tutorial_cpu": []}
    since = [time.process_time()]

    def report(metrics, _get_state):
        out["kd"].append(metrics["epoch_seconds"])
        out["kd_cpu"].append(time.process_time() - since[0])
        for name, (wall, cpu) in (("floor", floor_epoch(student, optimizer, data.splits, generator)),
                                  ("tutorial", tutorial.run(chunks[len(out["tutorial"])]))):
            out[name].append(wall)
            out[f"{name}_cpu"].append(cpu)
        since[0] = time.process_time()

    run_trial(resolve(make_spec(args), {"loss": "kd"}), data, report)
    scale = per_epoch / timed
    out["tutorial_epoch"] = {"seconds_per_epoch": sum(out["tutorial"]) * scale,
                             "cpu_seconds_per_epoch": sum(out["tutorial_cpu"]) * scale,
                             "batches_timed": timed, "batches_per_epoch": per_epoch, "extrapolated": timed < per_epoch,
                             "chunks_seconds": out.pop("tutorial"), "chunks_cpu_seconds": out.pop("tutorial_cpu")}
    return out


@contextmanager
def tune_session(spec):
    """A private local Ray and a temporary MLflow store, as a sweep has them; yields
    (run: () -> ResultGrid of kdtune's run_search, epoch_seconds: result -> its epochs' seconds,
    ray.init seconds). Everything is removed after."""
    import ray
    from mlflow.tracking import MlflowClient

    from kdtune import tracking
    from kdtune.cluster import init_ray
    from kdtune.search import run_search
    from kdtune.tuning import SweepContext

    workdir, ray_temp = tempfile.mkdtemp(prefix="kdtune-bench-"), None
    try:
        uri = f"sqlite:///{workdir}/mlflow.db"
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # the new store's table-creation notices
        client = MlflowClient(uri)
        exp_id = tracking.experiment_id(client, spec.name)
        parent_id = tracking.start_parent(client, exp_id, spec_to_dict(spec))
        clock = Clock()
        ray_temp = init_ray(None)
        ray_init = clock.lap()[0]
        ctx = SweepContext(spec_to_dict(spec), uri, exp_id, parent_id)

        def run(data: SweepData):
            grid = run_search(spec, parse_space(spec), data, ctx, f"{workdir}/ray", resume=False)
            errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error]
            if errors:
                raise RuntimeError(f"{len(errors)} of {len(grid)} Tune trial(s) failed: {errors[0]}")
            tracking.end_run(client, parent_id, "FINISHED")
            return grid

        def epoch_seconds(result) -> list[float]:
            """The trial's epoch times, as its MLflow run holds them (kdtune keeps no Tune logger files)."""
            return [m.value for m in client.get_metric_history(result.metrics["mlflow_run_id"], "epoch_seconds")]
        yield run, epoch_seconds, ray_init
    finally:
        ray.shutdown()
        for folder in (workdir, ray_temp):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


def tune_vs_sequential(args, data: SweepData) -> dict:
    """N trials through kdtune's Tune path, then the same N configs back to back with `run_trial`."""
    spec = make_spec(args, trials=args.trials, epochs=args.trial_epochs)
    with tune_session(spec) as (run, epoch_seconds, ray_init):
        started, clock = time.time(), Clock()
        grid = run(data)
        tune_wall = clock.lap()[0]
        results = sorted(grid, key=lambda r: r.metrics.get("timestamp", 0))
        configs = [dict(r.config) for r in results]
        in_trial = [r.metrics["time_total_s"] for r in results]  # the trainable's start to its last report
        tune_epochs = [sum(epoch_seconds(r)) for r in results]
        ends = [r.metrics["timestamp"] for r in results]  # Ray's whole-second time of each trial's last report
    seq_walls, seq_epochs = [], []
    for config in configs:
        epochs, clock = [], Clock()
        run_trial(resolve(spec, config), data, lambda metrics, get_state: epochs.append(metrics["epoch_seconds"]))
        seq_walls.append(clock.lap()[0])
        seq_epochs.append(sum(epochs))
    n, sequential = len(configs), sum(seq_walls)
    around = [t - e for t, e in zip(in_trial, tune_epochs)]  # trainable setup, MLflow run, reports, checkpoints
    seq_around = sum(w - e for w, e in zip(seq_walls, seq_epochs))
    return {"trials": n, "epochs_per_trial": args.trial_epochs, "max_concurrent_trials": 1,
            "ray_init_seconds": ray_init, "tune_wall_seconds": tune_wall, "sequential_wall_seconds": sequential,
            "overhead_per_trial_seconds": (tune_wall - sequential) / n,
            "overhead_per_trial_with_ray_init_seconds": (tune_wall + ray_init - sequential) / n,
            "breakdown_seconds": {  # the three parts sum to tune_wall - sequential
                "outside_trials": tune_wall - sum(in_trial),
                "around_epochs_in_trials_beyond_sequential": sum(around) - seq_around,
                "epochs_slower_in_tune": sum(tune_epochs) - sum(seq_epochs),
                "before_first_trial_approx": ends[0] - in_trial[0] - started,
                "first_trial_around_epochs_beyond_median": around[0] - statistics.median(around[1:]) if n > 1 else 0.0,
                "median_around_epochs_per_trial": statistics.median(around),
                "sequential_around_epochs_per_trial": seq_around / n,
                "steady_gap_between_trials_approx": (ends[-1] - ends[0] - sum(in_trial[1:])) / (n - 1) if n > 1 else 0.0},
            "per_trial_seconds": {"tune_in_trial": in_trial, "tune_epochs": tune_epochs,
                                  "sequential_wall": seq_walls, "sequential_epochs": seq_epochs}}


def tune_epoch_vs_floor(args, data: SweepData) -> dict:
    """KD epochs inside a Ray Tune trial vs the bare floor loop, both with `--tune-threads` torch threads.

    `--rounds` rounds, each: floor epochs in this process (no Ray running), then Ray started and one
    KD trial of `--trial-epochs` epochs through run_search (resources.cpu = threads, which the
    trainable turns into torch.set_num_threads), Ray stopped, floor epochs again. Each run of floor
    epochs trains a fresh student, so that floor and trial compare the same epochs of training. The
    floor keeps torch's default float mode (subnormals not flushed; kdtune's trial flushes them).
    A round's ratio is the trial's median epoch (its own `epoch_seconds`, validation pass included)
    over the median of the floor epochs around it, so that load from outside, which comes and goes
    over tens of seconds on a shared machine, falls on both alike; the result is the median of the
    rounds' ratios."""
    spec = make_spec(args, epochs=args.trial_epochs, threads=args.tune_threads)

    def floors() -> list[float]:
        student, optimizer, generator = fresh_floor(data.splits)
        return [floor_epoch(student, optimizer, data.splits, generator)[0] for _ in range(args.trial_epochs)]

    threads, rounds = torch.get_num_threads(), []
    try:
        torch.set_num_threads(args.tune_threads)
        torch.set_flush_denormal(False)  # torch's default, which run_trial in [1]-[3] changed in this thread
        for _ in range(args.rounds):
            before = floors()
            with tune_session(spec) as (run, epoch_seconds, _):
                (result,) = run(data)
                trial = epoch_seconds(result)
            floor = before + floors()
            rounds.append({"trial_epoch_seconds": trial, "floor_epoch_seconds": floor,
                           "ratio": statistics.median(trial) / statistics.median(floor)})
    finally:
        torch.set_num_threads(threads)
    return {"threads": args.tune_threads, "epochs_per_trial": args.trial_epochs, "rounds": rounds,
            "ratio": statistics.median(r["ratio"] for r in rounds),
            "trial_median_seconds": statistics.median(x for r in rounds for x in r["trial_epoch_seconds"]),
            "floor_median_seconds": statistics.median(x for r in rounds for x in r["floor_epoch_seconds"])}


def fmt(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    print(f"torch threads: {torch.get_num_threads()} in every measured loop (Tune trials get resources.cpu={args.threads}, "
          "which kdtune's trainable turns into the same torch.set_num_threads); DataLoader num_workers=0")

    clock = Clock()
    splits = load_splits(make_spec(args).data, SEED)
    load_seconds = clock.lap()[0]
    torch.manual_seed(SEED)
    teacher = create_model("mnist_cnn", splits.in_shape, splits.num_classes).eval().requires_grad_(False)
    clock = Clock()
    targets, _ = compute_targets(teacher, splits.train_x, ["logits"], budget_mb=1024, batch_size=BATCH)
    targets_seconds = clock.lap()[0]
    data = SweepData(splits, targets)
    student_params = count_params(create_model("mlp", splits.in_shape, splits.num_classes, WIDTH))
    print(f"data: MNIST train split {len(splits.train_y):,} images (val {len(splits.val_y):,}), loaded in {load_seconds:.1f}s; "
          f"batch {BATCH}; student mlp 784-{WIDTH}-{WIDTH // 2}-10 ({student_params:,} params); Adam lr {LR:g}; "
          f"KD T={TEMPERATURE:g} alpha={ALPHA:g}")
    print(f"teacher: mnist_cnn ({count_params(teacher):,} params), UNTRAINED (random init: the same cost per forward as "
          f"trained weights); its train-set logits cached once in {targets_seconds:.1f}s (compute_targets, batch {BATCH}; a sweep does this once)")

    print(f"\n[1] KD-student epoch: tutorial loop vs kdtune's trial path (the tutorial epoch is timed in {args.epochs} "
          f"chunks, each after one kdtune KD epoch and one floor epoch)")
    loops = epochs_interleaved(args, data, teacher)
    tutorial = loops["tutorial_epoch"]
    kd, floor = statistics.median(loops["kd"]), statistics.median(loops["floor"])
    kd_cpu, floor_cpu = statistics.median(loops["kd_cpu"]), statistics.median(loops["floor_cpu"])
    how = (f"EXTRAPOLATED from {tutorial['batches_timed']} of {tutorial['batches_per_epoch']} batches (--quick)"
           if tutorial["extrapolated"] else f"1 full epoch, {tutorial['batches_per_epoch']} batches")
    how += f"; chunks {fmt(tutorial['chunks_seconds'])} s"
    ratio1, ratio2 = tutorial["seconds_per_epoch"] / kd, kd / floor
    ok1, ok2 = ratio1 >= TARGETS["tutorial_over_kdtune_min"], ratio2 <= TARGETS["kdtune_over_floor_max"]
    print(f"  tutorial loop (torchvision MNIST + ToTensor/Normalize, DataLoader batch {BATCH}, teacher forward per batch):")
    print(f"      {tutorial['seconds_per_epoch']:7.2f} s/epoch  [{how}; CPU {tutorial['cpu_seconds_per_epoch']:.2f} s]")
    print(f"  kdtune run_trial, teacher logits cached (its epoch_seconds, incl. its val pass):")
    print(f"      {kd:7.2f} s/epoch  [median of {len(loops['kd'])}: {fmt(loops['kd'])}; CPU median {kd_cpu:.2f} s]")
    print(f"  ratio tutorial / kdtune: {ratio1:.1f}x  (CPU time: {tutorial['cpu_seconds_per_epoch'] / kd_cpu:.1f}x)  "
          f"target >= {TARGETS['tutorial_over_kdtune_min']:g}x: {verdict(ok1)}")

    print("\n[2] compute floor (same student, in-memory tensors, permuted indices, index_select, CE, fused Adam; no distillation)")
    print(f"      {floor:7.2f} s/epoch  [median of {len(loops['floor'])}, each right after a KD epoch: "
          f"{fmt(loops['floor'])}; CPU median {floor_cpu:.2f} s]")
    print(f"  kdtune KD trial epoch: {kd:.2f} s/epoch")
    print(f"  ratio kdtune / floor: {ratio2:.2f}x  (CPU time: {kd_cpu / floor_cpu:.2f}x)  "
          f"target <= {TARGETS['kdtune_over_floor_max']:g}x: {verdict(ok2)}")

    print(f"\n[3] {args.trials} trials x {args.trial_epochs} epochs through kdtune's Ray Tune path (run_search: its trainable, "
          "OptunaSearch TPE, reuse_actors=True, MLflow sqlite in a temp dir, 1 trial at a time) "
          "vs the same configs back to back in this process")
    tune = tune_vs_sequential(args, data)
    overhead, parts = tune["overhead_per_trial_seconds"], tune["breakdown_seconds"]
    ok3 = overhead < TARGETS["tune_overhead_per_trial_s_max"]
    print(f"  Ray Tune (Tuner + fit; Ray already up):  {tune['tune_wall_seconds']:6.1f} s wall")
    print(f"  back to back with run_trial:             {tune['sequential_wall_seconds']:6.1f} s wall")
    print(f"  ray.init (once per sweep, not above):    {tune['ray_init_seconds']:6.1f} s")
    print(f"  overhead per trial: {overhead:.2f} s ({tune['overhead_per_trial_with_ray_init_seconds']:.2f} s counting ray.init)  "
          f"target < {TARGETS['tune_overhead_per_trial_s_max']:g} s: {verdict(ok3)}")
    print(f"  where the {tune['tune_wall_seconds'] - tune['sequential_wall_seconds']:.1f} s go (the three parts add up):")
    print(f"    outside the trials (Tuner start, data to the object store, actor start, scheduling): "
          f"{parts['outside_trials']:5.1f} s; of it ~{parts['before_first_trial_approx']:.0f} s before the first trial "
          f"started, then ~{parts['steady_gap_between_trials_approx']:.1f} s between trials")
    print(f"    around the epochs inside the trials (trainable setup, MLflow child run, reports, checkpoints): "
          f"{parts['around_epochs_in_trials_beyond_sequential']:5.1f} s more than back to back; the first trial "
          f"{parts['first_trial_around_epochs_beyond_median']:.1f} s more than the median, which is "
          f"{parts['median_around_epochs_per_trial']:.2f} s/trial (back to back: {parts['sequential_around_epochs_per_trial']:.2f})")
    print(f"    the training epochs, slower in the Ray worker than in this process: {parts['epochs_slower_in_tune']:5.1f} s")
    per = tune["per_trial_seconds"]
    print(f"  per trial, in run order: Tune in-trial {fmt(per['tune_in_trial'])} (epochs {fmt(per['tune_epochs'])}); "
          f"back to back {fmt(per['sequential_wall'])} (epochs {fmt(per['sequential_epochs'])})")

    print(f"\n[4] KD epoch inside a Ray Tune trial vs the floor loop, both with {args.tune_threads} torch threads "
          f"({args.rounds} rounds: floor epochs, one {args.trial_epochs}-epoch KD trial through run_search with "
          f"resources.cpu={args.tune_threads} on a fresh private Ray, floor epochs)")
    in_tune = tune_epoch_vs_floor(args, data)
    ok4 = in_tune["ratio"] <= TARGETS["tune_trial_over_floor_max"]
    for i, r in enumerate(in_tune["rounds"], 1):
        print(f"  round {i}: trial epochs {fmt(r['trial_epoch_seconds'])} s; floor {fmt(r['floor_epoch_seconds'])} s; "
              f"ratio {r['ratio']:.2f}")
    print(f"  Tune trial epoch (its epoch_seconds, incl. its val pass): median {in_tune['trial_median_seconds']:.2f} s; "
          f"floor: median {in_tune['floor_median_seconds']:.2f} s")
    print(f"  ratio trial / floor (median of the rounds' ratios): {in_tune['ratio']:.2f}x  "
          f"target <= {TARGETS['tune_trial_over_floor_max']:g}x: {verdict(ok4)}")

    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": load_end},
        "settings": {"torch_threads": args.threads, "batch_size": BATCH, "student": f"mlp 784-{WIDTH}-{WIDTH // 2}-10",
                     "student_params": student_params, "optimizer": f"adam lr {LR:g}", "teacher": "mnist_cnn (untrained)",
                     "train_images": len(splits.train_y), "dataloader_workers": 0, "quick": args.quick},
        "setup_seconds": {"load_data": load_seconds, "teacher_targets": targets_seconds},
        "tutorial": tutorial,
        "kdtune_kd_epoch": {"median_seconds": kd, "epochs": loops["kd"], "median_cpu_seconds": kd_cpu, "cpu": loops["kd_cpu"]},
        "floor_epoch": {"median_seconds": floor, "epochs": loops["floor"], "median_cpu_seconds": floor_cpu,
                        "cpu": loops["floor_cpu"]},
        "tune": tune,
        "tune_trial_vs_floor": in_tune,
        "ratios": {"tutorial_over_kdtune": ratio1, "kdtune_over_floor": ratio2, "tune_overhead_per_trial_s": overhead,
                   "tune_trial_over_floor": in_tune["ratio"]},
        "ratios_cpu_time": {"tutorial_over_kdtune": tutorial["cpu_seconds_per_epoch"] / kd_cpu,
                            "kdtune_over_floor": kd_cpu / floor_cpu},
        "targets": TARGETS,
        "targets_met": {"tutorial_over_kdtune": ok1, "kdtune_over_floor": ok2, "tune_overhead_per_trial": ok3,
                        "tune_trial_over_floor": ok4},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
