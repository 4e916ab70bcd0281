"""CIFAR: a kdtune KD trial epoch against the RepDistiller/mdistiller loop, and teacher passes per sweep.

    python benchmarks/cifar.py [--batches 8] [--threads 2] [--workers 2] [--device cpu] [--out FILE]

One run, one device, student resnet8x4 <- teacher resnet32x4, both untrained (a forward costs the
same whatever the weights), on CIFAR-100-format data: random images written in the real pickle
layout, read by kdtune's cifar100 built-in and by torchvision's CIFAR100 class.
  1. images/s of a KD trial epoch (batch 64, SGD lr 0.05 momentum 0.9 wd 5e-4, KD T 4 alpha 0.9):
     kdtune's `run_trial` (images resident on the device, crop 4 and flip drawn there, the teacher's
     logits gathered from the cache of every augmented view) vs the reference loop (torchvision
     CIFAR100 with RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize in a DataLoader,
     the teacher's forward on every batch). The two alternate epoch by epoch; medians, the first
     (warm-up) epoch of each dropped.
  2. teacher passes per sweep of N trials x E epochs: `augmentations` (counted by running
     `teacher_targets` on a few images: one full-set pass per view) vs `live` (a trial's own
     `teacher_passes`), and what one full-set pass over CIFAR-100's 45,000 training images costs here.
The per-view cache the trial reads holds random fp16 logits of the exact shape: reading costs the
same whatever the values (their exactness is tested in tests/test_recipe.py), and building the
exact one costs 162 full-set teacher passes, priced in [2].
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kdtune.data import DATASETS
from kdtune.data.augment import Augment
from kdtune.data.cifar import official, unchecked, write_copy
from kdtune.data.resolve import load_splits
from kdtune.loading import load_spec
from kdtune.models import count_params, create_model
from kdtune.space import resolve
from kdtune.teacher import FORWARD_PASSES, teacher_targets
from kdtune.trial import SweepData, run_trial

BATCH, LR, MOMENTUM, WD, T, ALPHA = 64, 0.05, 0.9, 5e-4, 4.0, 0.9
VAL = 64  # kdtune's epoch includes a validation pass: kept small, as the reference loop has none
CIFAR100_TRAIN = 45_000  # cifar100.yaml's training split (50,000 less val_size 5,000)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="training batches of 64 per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each loop (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both loops")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="the reference DataLoader's workers (RepDistiller: 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--count-images", type=int, default=4, help="images the teacher-pass count runs on")
    parser.add_argument("--sweeps", default="4x1,32x240,41x240", help="N trials x E epochs to price, comma-separated")
    parser.add_argument("--out", default="benchmarks/cifar.json")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops(model, x) -> int:
    """FLOPs of one forward of `x` (multiply-adds count 2), by torch's own counter."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def make_spec(args, root: Path, cache: str = "auto", epochs: int = 1):
    return load_spec({
        "name": "bench-cifar", "seed": 0,
        "data": {"dataset": "cifar100", "root": str(root), "val_size": VAL, "test_limit": BATCH,
                 "augment": {"crop": 4, "flip": True}},
        "teacher": {"arch": args.teacher, "cache": cache},
        "student": {"arch": args.student},
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM,
                  "weight_decay": WD, "schedule": {"type": "step", "milestones": [150, 180, 210]}},
        "search": {"space": {"loss": {"kd": {"temperature": T, "alpha": ALPHA}}}, "num_samples": 1}})


class ReferenceLoop:
    """RepDistiller's and mdistiller's way: PIL images through torchvision transforms in a DataLoader,
    the teacher's forward on every batch, (1 - alpha) CE + alpha T^2 KL, SGD."""

    def __init__(self, args, root: Path, n_train: int, teacher, device: torch.device):
        from torch.utils.data import DataLoader, Subset
        from torchvision import transforms

        info = DATASETS["cifar100"]
        transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
        train = Subset(unchecked(official("cifar100"))(str(root), train=True, transform=transform), range(n_train))
        self.loader = DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=args.workers,
                                 pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
        torch.manual_seed(0)
        self.student = create_model(args.student, (3, 32, 32), 100).to(device).train()
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.teacher, self.device = teacher, device

    def epoch(self) -> float:
        started = time.perf_counter()
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.no_grad():
                teacher_logits = self.teacher(x).logits
            logits = self.student(x).logits
            soft = F.kl_div(F.log_softmax(logits / T, dim=1), F.softmax(teacher_logits / T, dim=1), reduction="batchmean")
            loss = (1 - ALPHA) * F.cross_entropy(logits, y) + ALPHA * T ** 2 * soft  # RepDistiller's DistillKL
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - started


def teacher_pass_counts(args, root: Path, splits, teacher) -> dict:
    """Full-set-equivalent teacher passes, counted by kdtune's own code on a few images: the
    `augmentations` cache (driver passes) and a `live` trial's (its `teacher_passes`), 2 epochs."""
    few = replace(splits, train_x=splits.train_x[:args.count_images], train_y=splits.train_y[:args.count_images])
    before = FORWARD_PASSES["train"]
    teacher_targets(make_spec(args, root, "augmentations"), teacher, few, ["logits"])
    cached = FORWARD_PASSES["train"] - before
    live_spec = make_spec(args, root, "live", epochs=2)
    one_batch = replace(splits, train_x=splits.train_x[:BATCH], train_y=splits.train_y[:BATCH])
    metrics = run_trial(resolve(live_spec, {"loss": "kd"}), SweepData(one_batch, {}, teacher), lambda m, s: None)
    return {"augmentations_per_sweep": cached, "live_per_trial_epoch": metrics["teacher_passes"] / 2}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    n_train = args.batches * BATCH
    root = Path(tempfile.mkdtemp(prefix="kdtune-bench-cifar-"))
    rng = np.random.default_rng(0)
    write_copy(root, "cifar100", (rng.integers(0, 256, (n_train + VAL, 32, 32, 3), dtype=np.uint8),
                                  rng.integers(0, 100, n_train + VAL)),
               (rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, BATCH)))
    with warnings.catch_warnings():  # random files: not the official checksums, by design
        warnings.filterwarnings("ignore", "cifar100: .* official MD5")
        splits = load_splits(make_spec(args, root).data, 0)
    torch.manual_seed(0)
    teacher = create_model(args.teacher, (3, 32, 32), 100).to(device).eval().requires_grad_(False)
    student_params = count_params(create_model(args.student, (3, 32, 32), 100))
    one = splits.train_x[:1].to(device)
    flops = {"teacher_forward": forward_flops(teacher, one),
             "student_forward": forward_flops(create_model(args.student, (3, 32, 32), 100).to(device).eval(), one)}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    load_start = os.getloadavg()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, device {device} ({device_name}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} torch threads, reference DataLoader workers {args.workers}; "
          f"load average at start {load_start[0]:.2f}")
    print(f"student {args.student} ({student_params:,} params, {flops['student_forward'] / 1e9:.3f} GFLOP/image "
          f"forward) <- teacher {args.teacher} ({count_params(teacher):,} params, "
          f"{flops['teacher_forward'] / 1e9:.3f} GFLOP/image), both untrained; {n_train} training images, "
          f"batch {BATCH}")

    views = Augment.of(make_spec(args, root).data.augment, splits).num_views
    cache = torch.randn(n_train, views, 100, generator=torch.Generator().manual_seed(0)).half()
    data = SweepData(splits.map(lambda t: t.to(device)), {"logits": cache.to(device)}, per_view=True)
    print(f"per-view logits cache: {tuple(cache.shape)} fp16 (random values of the exact shape)")

    reference = ReferenceLoop(args, root, n_train, teacher, device)
    plan = resolve(make_spec(args, root), {"loss": "kd"})
    kdtune_seconds, reference_seconds = [], []
    for _ in range(args.repeats + 1):
        kdtune_seconds.append(run_trial(plan, data, lambda m, s: None, device=device)["epoch_seconds"])
        reference_seconds.append(reference.epoch())
    kd, ref = statistics.median(kdtune_seconds[1:]), statistics.median(reference_seconds[1:])
    speedup = ref / kd
    print(f"\n[1] KD trial epoch, {n_train} images (epochs in seconds, first one warm-up):")
    print(f"  reference loop (DataLoader + transforms, teacher forward per batch): {n_train / ref:8.1f} images/s  "
          f"{[round(s, 2) for s in reference_seconds]}")
    print(f"  kdtune run_trial (on-device crop/flip, per-view logits cache; its {VAL}-image val pass included): "
          f"{n_train / kd:8.1f} images/s  {[round(s, 2) for s in kdtune_seconds]}")
    print(f"  ratio kdtune / reference: {speedup:.2f}x images/s")

    counts = teacher_pass_counts(args, root, splits, copy.deepcopy(teacher).cpu())
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n_train, 256):
            teacher(data.splits.train_x[start:start + 256])
    sync(device)
    full_pass = (time.perf_counter() - started) / n_train * CIFAR100_TRAIN
    sweeps = []
    for item in args.sweeps.split(","):
        trials, epochs = map(int, item.split("x"))
        live = trials * epochs * counts["live_per_trial_epoch"]
        cached = counts["augmentations_per_sweep"]
        sweeps.append({"trials": trials, "epochs": epochs, "augmentations": cached, "live": live,
                       "live_over_augmentations": live / cached,
                       "teacher_hours_here_45k": {"augmentations": cached * full_pass / 3600,
                                                  "live": live * full_pass / 3600}})
    print(f"\n[2] teacher passes (full-set equivalents), counted: augmentations "
          f"{counts['augmentations_per_sweep']} per sweep; live {counts['live_per_trial_epoch']:g} per trial-epoch. "
          f"One pass over {CIFAR100_TRAIN:,} images here: {full_pass:.0f}s")
    for row in sweeps:
        hours = row["teacher_hours_here_45k"]
        print(f"  {row['trials']:3d} trials x {row['epochs']:3d} epochs: augmentations {row['augmentations']:5d}, "
              f"live {row['live']:8.0f}  (live / augmentations {row['live_over_augmentations']:.2f}x); teacher time "
              f"here on CIFAR-100: {hours['augmentations']:.1f} h vs {hours['live']:.1f} h")

    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end[0]:.2f} (other processes share the machine's cores)")
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(device),
                          "device_name": device_name, "torch": torch.__version__, "torch_threads": args.threads,
                          "dataloader_workers": args.workers, "loadavg_start": load_start, "loadavg_end": load_end},
              "settings": {"student": args.student, "teacher": args.teacher, "student_params": student_params,
                           "teacher_params": count_params(teacher), "forward_flops_per_image": flops,
                           "train_images": n_train, "batch_size": BATCH, "val_images_in_kdtune_epoch": VAL,
                           "cache": "random fp16 logits of the exact shape", "untrained_models": True},
              "kd_epoch_seconds": {"kdtune": kdtune_seconds, "reference": reference_seconds},
              "images_per_second": {"kdtune": n_train / kd, "reference": n_train / ref},
              "ratio_kdtune_over_reference_images_per_second": speedup,
              "teacher_passes": {**counts, "full_pass_seconds_45k_images": full_pass, "sweeps": sweeps}}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
