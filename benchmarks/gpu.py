"""On a GPU machine: how many trials to pack on one GPU, and what a second GPU buys one trial.

    python benchmarks/gpu.py [--epochs 3] [--train 20000] [--packing 1 2 4 8] [--out FILE]

  1. Packing (`resources.gpu: 1/k`): k trials at once on GPU 0, each a Ray task holding 1/k of it,
     as Tune places trials with a fractional `resources.gpu`; per-trial epoch time and the GPU's
     images/s in all, for each k.
  2. Data parallelism (`resources.workers: 2`, `resources.gpu: 1`, NCCL): one trial's epoch time on
     2 GPUs against the same trial (same global batch) on 1; needs 2 GPUs (NCCL cannot put two ranks
     on one device), skipped with a message otherwise.
Data: benchmarks/workers.py's CIFAR-10-format synthetic images; student resnet8x4, global batch 64,
bf16 autocast (train.mixed_precision). Epoch times are medians, the first (warm-up) epoch dropped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import ray
import torch

from kdtune.cluster import init_ray
from kdtune.distributed import TrialWorkers
from kdtune.space import resolve
from kdtune.trial import SweepData, run_trial
from workers import GLOBAL_BATCH, spec_for, synthetic_data

STUDENT = "resnet8x4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--packing", type=int, nargs="+", default=[1, 2, 4, 8], help="trials per GPU to try")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def gpu_spec(root: str, epochs: int, workers: int):
    spec = spec_for(root, epochs, 0, workers)
    spec.student.arch = STUDENT
    spec.train.mixed_precision = True
    spec.resources.gpu = 1
    return spec


def steady(reports: list[dict]) -> float:
    times = [r["epoch_seconds"] for r in reports]
    return statistics.median(times[1:] or times)


@ray.remote
def packed_trial(spec, data: SweepData) -> float:
    reports = []
    run_trial(resolve(spec, {"loss": "none"}), data.to("cuda"), lambda m, _: reports.append(m), device="cuda")
    return steady(reports)


def packing(spec, data_ref, k: int, images: int) -> dict:
    started = time.time()
    epochs = ray.get([packed_trial.options(num_gpus=1 / k).remote(spec, data_ref) for _ in range(k)])
    per_trial = statistics.median(epochs)
    return {"trials_per_gpu": k, "epoch_seconds_per_trial": round(per_trial, 2),
            "gpu_images_per_s": round(k * images / per_trial), "wall_seconds": round(time.time() - started, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine")
        return 1
    result = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as root:
        data = synthetic_data(root, args.train)
        temp_dir = init_ray(None)
        try:
            data_ref = ray.put(data)
            spec = gpu_spec(root, args.epochs, 1)
            result["packing"] = [packing(spec, data_ref, k, args.train) for k in args.packing]
            for row in result["packing"]:
                print(json.dumps(row), flush=True)
            if torch.cuda.device_count() >= 2:
                one = []
                run_trial(resolve(spec, {"loss": "none"}), data.to("cuda"), lambda m, _: one.append(m), device="cuda")
                two = []
                TrialWorkers(data_ref, 2, 1, 1).train(resolve(gpu_spec(root, args.epochs, 2), {"loss": "none"}),
                                                      lambda m, _: two.append(m), None, root)
                result["data_parallel"] = {"global_batch": GLOBAL_BATCH, "epoch_seconds_1_gpu": round(steady(one), 2),
                                           "epoch_seconds_2_gpus": round(steady(two), 2),
                                           "speedup": round(steady(one) / steady(two), 2)}
            else:
                result["data_parallel"] = "skipped: one GPU (a 2-worker NCCL trial needs 2)"
            print(json.dumps(result["data_parallel"]))
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
