"""A CIFAR student trained by 2 data-parallel workers (Ray Train, gloo, 1 CPU each) against 1 worker
at the same global batch: validation accuracy over seeds, and epoch times side by side.

    python benchmarks/workers.py [--seeds 3] [--epochs 4] [--train 4000] [--out FILE]

No real CIFAR is at hand here, so the data are CIFAR-10-format files (the real pickle layout, read by
kdtune's cifar10 built-in) of synthetic but learnable images: each class a fixed random 32x32x3
pattern, every image its class's pattern under heavy noise. Student resnet8 (width 16), plain
cross-entropy (loss `none`: the comparison is of the training, not of a method), SGD lr 0.05
momentum 0.9, global batch 64: batch_size 64 on 1 worker (the default, one-process path) or 32 on
each of 2 workers. The 2-worker trial's epoch time is rank 0's, reduction and all; the 1-worker's
is the trial's own. Both use one torch thread per worker.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings

import numpy as np
import ray
import torch

from kdtune.cluster import init_ray
from kdtune.data.cifar import write_copy
from kdtune.data.resolve import load_splits
from kdtune.distributed import TrialWorkers
from kdtune.loading import load_spec
from kdtune.space import resolve
from kdtune.trial import SweepData, run_trial

GLOBAL_BATCH, VAL = 64, 1000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=4000, help="training images (plus 1,000 for validation)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def write_data(root: str, n: int) -> None:
    """CIFAR-10 files of class patterns under noise: learnable, but not to 100% in a few epochs."""
    rng = np.random.default_rng(0)
    patterns = rng.normal(size=(10, 32, 32, 3))

    def images(count: int):
        labels = rng.integers(0, 10, count)
        pixels = 128 + 18 * patterns[labels] + 70 * rng.normal(size=(count, 32, 32, 3))
        return np.clip(pixels, 0, 255).astype(np.uint8), labels
    write_copy(root, "cifar10", images(n + VAL), images(VAL))


def synthetic_data(root: str, n: int) -> SweepData:
    """The sweep data of `write_data`'s files, read by kdtune's cifar10 built-in."""
    write_data(root, n)
    with warnings.catch_warnings():  # synthetic files: not the official checksums, by design
        warnings.simplefilter("ignore")
        return SweepData(load_splits(spec_for(root, 1, 0, 1).data, 0), {})


def spec_for(root: str, epochs: int, seed: int, workers: int):
    return load_spec({"name": "workers-bench", "seed": seed,
                      "data": {"dataset": "cifar10", "root": root, "val_size": VAL, "test_limit": VAL},
                      "student": {"arch": "resnet8"},
                      "train": {"epochs": epochs, "batch_size": GLOBAL_BATCH // workers, "optimizer": "sgd",
                                "lr": 0.05, "momentum": 0.9, "mixed_precision": False},
                      "resources": {"cpu": 1, "workers": workers}})


def one_trial(spec, data: SweepData, workers: TrialWorkers | None, storage: str) -> list[dict]:
    reports = []
    plan = resolve(spec, {"loss": "none"})
    if workers is None:
        run_trial(plan, data, lambda metrics, _: reports.append(metrics))
    else:
        workers.train(plan, lambda metrics, _: reports.append(metrics), None, storage)
    return reports


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        data = synthetic_data(root, args.train)
        temp_dir = init_ray(None)
        try:
            pool = TrialWorkers(ray.put(data), 2, 1, 0)
            for seed in range(args.seeds):
                for workers in (1, 2):
                    started = time.time()
                    reports = one_trial(spec_for(root, args.epochs, seed, workers), data,
                                        pool if workers == 2 else None, root)
                    rows.append({"seed": seed, "workers": workers, "val_acc": reports[-1]["val_acc"],
                                 "epoch_seconds": [round(r["epoch_seconds"], 2) for r in reports],
                                 "wall_seconds": round(time.time() - started, 1)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    summary = {}
    for workers in (1, 2):
        mine = [r for r in rows if r["workers"] == workers]
        accs = [r["val_acc"] for r in mine]
        summary[workers] = {"val_acc_mean": statistics.mean(accs), "val_acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                            "epoch_seconds_median": statistics.median(s for r in mine for s in r["epoch_seconds"][1:] or r["epoch_seconds"])}
    ratio = summary[2]["epoch_seconds_median"] / summary[1]["epoch_seconds_median"]
    print(f"\nval_acc, {args.seeds} seeds, global batch {GLOBAL_BATCH}, {args.epochs} epochs of {args.train} images:")
    for workers, s in summary.items():
        print(f"  {workers} worker(s): {s['val_acc_mean']:.4f} +- {s['val_acc_sd']:.4f}   "
              f"epoch {s['epoch_seconds_median']:.2f} s (median, first epoch dropped)")
    print(f"  2-worker epoch / 1-worker epoch: {ratio:.2f}x")
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"rows": rows, "summary": summary, "epoch_ratio": ratio, "args": vars(args)}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
