"""Streamed data: a trial's memory against the dataset's size, the streamed epoch against the
resident one on MNIST, and teacher forwards in trials when its outputs are on disk.

    python benchmarks/streaming.py --data-root DIR [--scratch DIR] [--parts a b c] [--out FILE]

  a. peak memory (VmHWM) of one KD trial on a dataset of uint8 images in a file on disk, read
     in `__getitem__` (os.pread), at N images and at 10N (float32 size >= 2 GB), each in a fresh
     process, the peak reset after the sweep-side preparation so it counts the trial alone;
  b. MNIST, KD with cached teacher logits: epoch seconds of the resident path against the
     streamed path (data.resident: false, no transform) with data.workers 0, 1 and 2;
  c. a sweep through Ray Tune on streamed MNIST (teacher outputs on disk): teacher forward
     passes in the driver and in the trials.
Prints the numbers and writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kdtune
from kdtune.runner import prepare
from kdtune.teacher import FORWARD_PASSES
from kdtune.space import parse_space, resolve
from kdtune.trial import run_trial

SHAPE = (3, 64, 64)  # 49,152 bytes an image in float32
SMALL = 4_400
LARGE = 10 * SMALL  # 2.16 GB in float32, 541 MB of uint8 on disk
TARGETS = {"memory_growth_mb_max": 300, "streamed_over_resident_max": 2.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="MNIST goes to DIR/MNIST/raw (unpacked from kdtune's copy)")
    parser.add_argument("--scratch", default=None, help="where the large uint8 file is written (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=3, help="MNIST epochs per path; the median is reported (default 3)")
    parser.add_argument("--parts", nargs="+", choices="abc", default=list("abc"), help="which measures to run")
    parser.add_argument("--out", default="benchmarks/streaming.json")
    parser.add_argument("--child", nargs=2, metavar=("FILE", "COUNT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class RawImages(torch.utils.data.Dataset):
    """The first `count` uint8 images of a raw file, each read from disk on every `__getitem__`
    (as an image file would be) and scaled to [0, 1]; labels are the image index mod 10."""

    def __init__(self, path: str, count: int):
        self.path, self.count = path, count
        self.size = int(np.prod(SHAPE))
        self.targets = [i % 10 for i in range(count)]
        self._fd = None

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, self.size, i * self.size)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(SHAPE).float().div_(255), self.targets[i]


def tiny_teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(path: str, count: int) -> dict:
    """In a fresh process: the sweep's preparation, then the peak reset, then one KD trial epoch."""
    torch.set_num_threads(1)
    data = (RawImages(path, count), RawImages(path, 1000))
    spec = kdtune.load_spec({"name": "memory", "data": {"val_size": 500, "resident": False, "num_classes": 10},
                             "train": {"epochs": 1, "batch_size": 128},
                             "student": {"arch": "mlp", "width": 32},
                             "search": {"space": {"loss": {"kd": {}}}, "num_samples": 1}},
                            overrides={"teacher.arch": "python:tiny_teacher", "data.dataset": "python:data"})
    with tempfile.TemporaryDirectory() as folder:
        sweep_data, info, data_info = prepare(spec, parse_space(spec), tiny_teacher(), None, data, outputs_dir=Path(folder))
        before = status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak, to the current RSS
        metrics = run_trial(resolve(spec, {"loss": "kd"}), sweep_data, lambda m, s: None)
    return {"images": count, "float32_mb": count * int(np.prod(SHAPE)) * 4 / 2 ** 20, "path": data_info["path"],
            "rss_before_trial_mb": before / 1024, "trial_peak_mb": status_kb("VmHWM") / 1024,
            "epoch_seconds": metrics["epoch_seconds"], "teacher_live_batches": metrics["teacher_live_batches"]}


def memory(args, scratch: Path) -> dict:
    path = scratch / "images.u8"
    size = int(np.prod(SHAPE))
    if not path.is_file() or path.stat().st_size != LARGE * size:
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for start in range(0, LARGE, 2000):
                f.write(rng.integers(0, 256, (min(2000, LARGE - start), size), dtype=np.uint8).tobytes())
    runs = {}
    for count in (SMALL, LARGE):
        done = subprocess.run([sys.executable, __file__, "--data-root", args.data_root, "--child", str(path), str(count)],
                              capture_output=True, text=True, check=True)
        runs[count] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"small": runs[SMALL], "large": runs[LARGE], "file_mb": path.stat().st_size / 2 ** 20,
            "growth_mb": runs[LARGE]["trial_peak_mb"] - runs[SMALL]["trial_peak_mb"]}


def mnist_spec(args, **data):
    return kdtune.load_spec({
        "name": "mnist-stream", "seed": 0, "data": {"root": args.data_root, "val_size": 5000, **data},
        "student": {"arch": "mlp", "width": 128}, "train": {"epochs": args.epochs, "batch_size": 64},
        "search": {"space": {"loss": {"kd": {}}}, "num_samples": 1}}, overrides={"teacher.arch": "python:teacher"})


def epochs(args) -> dict:
    """Median epoch seconds of a KD trial, resident and streamed with 0, 1 and 2 workers."""
    from kdtune.models import create_model

    torch.manual_seed(0)
    teacher = create_model("mnist_cnn", (1, 28, 28), 10).eval()
    out = {}
    for name, data in (("resident", {"resident": True}), ("streamed_workers_0", {"resident": False, "workers": 0}),
                       ("streamed_workers_1", {"resident": False, "workers": 1}),
                       ("streamed_workers_2", {"resident": False, "workers": 2})):
        spec = mnist_spec(args, **data)
        with tempfile.TemporaryDirectory() as folder:
            sweep_data, info, data_info = prepare(spec, parse_space(spec), teacher, None, None, outputs_dir=Path(folder))
            reports = []
            run_trial(resolve(spec, {"loss": "kd"}), sweep_data, lambda m, s: reports.append(m))
        seconds = [m["epoch_seconds"] for m in reports]
        out[name] = {"path": data_info["path"], "epoch_seconds": seconds, "median": statistics.median(seconds),
                     "teacher_live_batches": reports[-1]["teacher_live_batches"], "cache": info["cache"]}
    return out


def sweep(args, folder: Path) -> dict:
    """Three trials through Ray Tune on streamed MNIST: the teacher's passes, driver and trials."""
    spec = mnist_spec(args, resident=False, workers=1, train_limit=6000, val_size=1000)
    spec = kdtune.load_spec(spec, {"train.epochs": 1, "search.num_samples": 2, "search.confirm_seeds": 0,
                                   "search.space.loss": {"none": {}, "kd": {}}})
    from kdtune.models import create_model

    torch.manual_seed(0)
    FORWARD_PASSES.clear()  # the process's count, which (b)'s preparations added to
    result = kdtune.run(spec, teacher=create_model("mnist_cnn", (1, 28, 28), 10).eval(),
                        results_dir=folder / "results", tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    return {"trials": len(result.trials), "forward_passes": result.summary["teacher_forward_passes"],
            "trial_teacher_passes": float(result.trials["teacher_passes"].fillna(0).sum()),
            "cache": result.summary["teacher"]["cache"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(args.child[0], int(args.child[1]))))
        return 0
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 torch thread; "
          f"load average at start {load[0]:.2f}")
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_at_start": load[0]}}
    if "a" in args.parts:
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            results["a_memory"] = a = memory(args, Path(scratch))
        print(f"[a] one KD trial epoch, streamed, data.workers 0 (uint8 {SHAPE} images read from a file per item):")
        for key in ("small", "large"):
            r = a[key]
            print(f"    {r['images']:>6,} images ({r['float32_mb']:,.0f} MB float32): trial peak {r['trial_peak_mb']:.0f} "
                  f"MB (RSS {r['rss_before_trial_mb']:.0f} MB before it), epoch {r['epoch_seconds']:.1f} s")
        ok_a = a["growth_mb"] <= TARGETS["memory_growth_mb_max"]
        print(f"    growth at 10x the data: {a['growth_mb']:+.0f} MB  target <= {TARGETS['memory_growth_mb_max']} MB: "
              f"{'met' if ok_a else 'MISSED'}")
    if "b" in args.parts:
        results["b_epochs"] = b = epochs(args)
        base = b["resident"]["median"]
        print("[b] MNIST KD epoch (55,000 images, batch 64, mlp-128, teacher logits cached; median of "
              f"{args.epochs}, validation included):")
        for name, r in b.items():
            r["over_resident"] = r["median"] / base
            print(f"    {name:>20}: {r['median']:.2f} s ({r['over_resident']:.2f}x resident) epochs "
                  f"{', '.join(f'{s:.2f}' for s in r['epoch_seconds'])}")
    if "c" in args.parts:
        with tempfile.TemporaryDirectory() as folder:
            results["c_sweep"] = c = sweep(args, Path(folder))
        print(f"[c] {c['trials']} trials through Ray Tune on streamed MNIST: teacher forward passes "
              f"{c['forward_passes']} (the driver's, in full-set equivalents); in the trials {c['trial_teacher_passes']:g}")
    results["targets"] = TARGETS
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
