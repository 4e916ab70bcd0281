"""The driver's cost at cluster scale: kdtune against a hand-written Ray Tune + OptunaSearch sweep.

    python benchmarks/scale.py --data-root DIR [--sizes 100 300 1000] [--slots 16 32] [--out FILE]

One Ray head (`ray start --head --num-cpus MAX(slots) --block`, its own temp dir, loopback ports,
a token of its own, stopped by PID: the helpers of tests/test_cluster.py, so pytest is needed) that
both sweeps join with `--address`.
For each slot count and each N, in one run on the same head: kdtune's CLI
(`python -m kdtune.sweep ... --address`, tiny trials: MLP students, 512 training images, 1 epoch,
`confirm_seeds: 0`, no baselines, MLflow in a fresh sqlite file) and the hand-written sweep
(`python benchmarks/scale.py --hand-written ...`: Tune's Tuner with OptunaSearch (TPE, kdtune's two objectives)
over the same kind of space, a function trainable training the same MLP on the same 512 images and reporting
each epoch with a checkpoint, `reuse_actors=True`, no MLflow). Each driver runs as a child
process: its wall time and CPU time (user + system, from `wait4`) are measured. The slopes are the
driver CPU per added trial between the sizes, so start-up (imports, teacher, report) cancels out.
The trial actors' resident memory is sampled from /proc while the sweeps run.

With `--resume-check N`, a kdtune sweep of N trials at the largest slot count is SIGKILLed when
about half its trials have finished, resumed with `--resume`, and its MLflow runs and Optuna study
are checked: every trial one FINISHED child run with its per-epoch metrics, none RUNNING, no
duplicate, nothing that finished before the kill trained again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN, VAL, EPOCHS, BATCH = 512, 500, 1, 64
TIED_VAL = 20  # --ties: accuracy on 20 validation images moves in steps of 0.05, so most trials tie
WORKER_GIB = 0.6  # a kdtune trial actor's proportional set size, measured: torch, Ray, MLflow and kdtune imported
TARGETS = {"slope_ratio_16_max": 2.0, "slope_ratio_large_300_1000_max": 2.0, "flat_max": 1.25}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="MNIST goes to DIR/MNIST/raw (from kdtune's bundled copy)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--runs", nargs="+", metavar="SLOTS:N",
                        help="only these (slots, N) pairs, in this order (default: every pair of --slots and --sizes)")
    parser.add_argument("--previous", help="a scale.json of an earlier run whose rows join this run's table")
    parser.add_argument("--resume-check", type=int, default=0, metavar="N",
                        help="also SIGKILL a kdtune sweep of N trials at the largest slot count half way, then --resume")
    parser.add_argument("--memory-threshold", type=float, default=0.99,
                        help="the head's RAY_memory_usage_threshold (Ray's default 0.95)")
    parser.add_argument("--out", default="benchmarks/scale.json")
    parser.add_argument("--plot", default="docs/scale.png")
    parser.add_argument("--tools", nargs="+", default=["hand-written", "kdtune"], choices=["hand-written", "kdtune"])
    parser.add_argument("--ties", action="store_true",
                        help=f"accuracies that tie (both sweeps validate on {TIED_VAL} images) and kdtune's baselines on")
    parser.add_argument("--hand-written", action="store_true", help=argparse.SUPPRESS)  # the child: one sweep
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrent", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- the hand-written sweep (runs as its own driver process) ----

def train_mlp(config: dict, data: tuple) -> None:
    """The hand-written trainable: the MLP on the training images, a report and checkpoint per epoch."""
    import torch
    from ray import tune

    x, y, vx, vy = data
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), config["width"]), torch.nn.ReLU(),
                                torch.nn.Linear(config["width"], 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    for epoch in range(EPOCHS):
        for start in range(0, len(x), BATCH):
            loss = torch.nn.functional.cross_entropy(model(x[start:start + BATCH]), y[start:start + BATCH])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(vx).argmax(1) == vy).float().mean().item()
        params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(folder) / "state.pt")
            tune.report({"val_acc": accuracy, "params": params, "epoch": epoch + 1},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def mlp_space(trial) -> None:
    """The hand-written define-by-run space, kdtune's below (module level: Tune pickles the searcher)."""
    trial.suggest_categorical("width", [16, 32, 64])
    trial.suggest_float("lr", 0.01, 0.05, log=True)
    trial.suggest_categorical("loss", ["none", "kd"])


def hand_written(args) -> None:
    """What a user writes with Tune and Optuna alone: no tracking, a checkpoint per epoch, the same
    two objectives as kdtune's search (accuracy up, size down) in Optuna's in-memory study."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from kdtune.data.resolve import load_splits
    from kdtune.loading import validate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    splits = load_splits(validate(kdtune_spec(args.data_root, args.n, args.concurrent, args.ties)).data, 0)
    ray.init(address=args.address, log_to_driver=False)
    data = (splits.train_x, splits.train_y, splits.val_x, splits.val_y)
    searcher = OptunaSearch(space=mlp_space, metric=["val_acc", "params"], mode=["max", "min"],
                            sampler=optuna.samplers.TPESampler(seed=0))
    tuner = tune.Tuner(tune.with_resources(tune.with_parameters(train_mlp, data=data), {"cpu": 1}),
                       tune_config=tune.TuneConfig(search_alg=searcher, num_samples=args.n,
                                                   max_concurrent_trials=args.concurrent, reuse_actors=True),
                       run_config=tune.RunConfig(name="hand", storage_path=args.storage, verbose=0))
    grid = tuner.fit()
    assert len(grid) == args.n and not grid.errors, (len(grid), grid.errors)


# ---- the kdtune sweep ----

def kdtune_spec(data_root: str, n: int, slots: int, ties: bool = False) -> dict:
    val = TIED_VAL if ties else VAL
    return {"name": "scale", "seed": 0,
            "data": {"dataset": "mnist", "root": data_root, "val_size": val, "train_limit": TRAIN + val,
                     "test_limit": VAL},
            "teacher": {"arch": "mlp", "epochs": 2, "batch_size": 64},
            "student": {"arch": "mlp"},
            "train": {"epochs": EPOCHS, "batch_size": BATCH, "checkpoint_every": 1},
            "search": {"space": {"width": {"choice": [16, 32, 64]}, "train.lr": {"loguniform": [0.01, 0.05]},
                                 "loss": {"none": {}, "kd": {}}},
                       "num_samples": n, "max_concurrent": slots, "baselines": ties, "confirm_seeds": 0},
            "resources": {"cpu": 1, "gpu": 0}}


# ---- measuring ----

class ActorMemory:
    """Peak memory of each Tune trial actor (`ray::...` processes), sampled from /proc: its proportional
    set size (its own pages plus its share of those it shares, such as torch's libraries)."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(1.0):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    if not re.match(rb"ray::(ImplicitFunc|train|trainable)", cmdline):
                        continue
                    rollup = Path(f"/proc/{entry}/smaps_rollup").read_text()
                except OSError:
                    continue
                pss = int(re.search(r"Pss:\s+(\d+)", rollup).group(1)) // 1024
                self.peak[int(entry)] = max(self.peak.get(int(entry), 0), pss)

    def summary(self) -> dict:
        values = sorted(self.peak.values())
        return {"actors": len(values), "median_mib": values[len(values) // 2] if values else None,
                "max_mib": values[-1] if values else None}


def timed(command: list[str], env: dict, cwd: Path, log: Path, watch=None) -> dict:
    """Run a driver to its end; its wall time and CPU time (with any children it waited for)."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE if watch else out,
                                stderr=subprocess.STDOUT, text=True)
        if watch:
            watch(proc, out)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    return {"wall_s": round(time.time() - started, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "rc": proc.returncode, "bottleneck_warnings": text.count("may be a performance bottleneck"),
            "locked": text.count("database is locked")}


def kdtune_command(folder: Path, address: str, spec_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdtune.sweep", str(spec_path), "--address", address, "--results-dir",
            str(folder / "results"), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--storage",
            str(folder / "storage"), *extra]


def run_kdtune(folder: Path, env: dict, address: str, data_root: str, n: int, slots: int, ties: bool) -> dict:
    folder.mkdir(parents=True)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(kdtune_spec(data_root, n, slots, ties)))
    result = timed(kdtune_command(folder, address, spec_path), env, folder, folder / "driver.log")
    if result["rc"] == 0:
        result.update(check_runs(folder, n + 3 * ties))  # with the baselines: one per width
        result.update(front_rows(folder))
    return result


def front_rows(folder: Path) -> dict:
    """The front against the trials it stands for: pareto.csv's rows and their `trials` counts, the
    distinct (val_acc, params) points of the finished search trials, and the models MLflow holds."""
    import mlflow
    import pandas as pd

    trials = pd.read_csv(folder / "results" / "scale" / "trials.csv")
    front = pd.read_csv(folder / "results" / "scale" / "pareto.csv")
    done = trials[(trials["phase"] == "search") & (trials["status"] == "FINISHED")]
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    models = mlflow.search_logged_models(experiment_ids=[mlflow.get_experiment_by_name("scale").experiment_id],
                                         output_format="list")
    return {"distinct_points": len(done[["val_acc", "params"]].drop_duplicates()), "front_rows": len(front),
            "front_trials": int(front["trials"].sum()), "logged_models": len(models)}


def run_hand_written(folder: Path, env: dict, address: str, data_root: str, n: int, slots: int, ties: bool) -> dict:
    folder.mkdir(parents=True)
    command = [sys.executable, __file__, "--hand-written", "--data-root", data_root, "--n", str(n), "--concurrent",
               str(slots), "--address", address, "--storage", str(folder / "storage"), *(["--ties"] if ties else [])]
    return timed(command, {**env, "RAY_AUTH_MODE": "token"}, folder, folder / "driver.log")  # kdtune sets it itself


def check_runs(folder: Path, n: int, finished_before: dict | None = None) -> dict:
    """What MLflow and the Optuna study hold after a kdtune sweep of n trials."""
    import optuna
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scale")
    runs = client.search_runs([experiment.experiment_id], max_results=50000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    trial_ids = [r.data.tags.get("kdtune.trial_id") for r in children]
    complete = [r for r in children if r.info.status == "FINISHED" and r.data.tags.get("kdtune.status") == "FINISHED"
                and sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(1, EPOCHS + 1))]
    summary = json.loads((folder / "results" / "scale" / "summary.json").read_text())["optuna"]
    study = optuna.load_study(study_name=summary["study_name"], storage=summary["storage"])
    states = [t.state.name for t in study.trials]
    checked = {"child_runs": len(children), "complete_runs": len(complete), "duplicate_trial_ids": len(trial_ids) - len(set(trial_ids)),
               "running": sum(r.info.status == "RUNNING" for r in runs),
               "optuna_complete": states.count("COMPLETE"), "optuna_other": len(states) - states.count("COMPLETE")}
    if finished_before is not None:
        by_id = {r.info.run_id: r for r in children}
        checked["finished_before_kill"] = len(finished_before)
        checked["finished_before_kill_rerun"] = sum(
            1 for run_id in finished_before if run_id not in by_id or by_id[run_id].data.tags.get("kdtune.starts") != "1"
            or len(client.get_metric_history(run_id, "val_acc")) != EPOCHS)
    checked["all_ok"] = (len(children) == len(complete) == n == checked["optuna_complete"] and checked["duplicate_trial_ids"] == 0
                         and checked["running"] == 0 and checked.get("finished_before_kill_rerun", 0) == 0)
    return checked


def resume_check(folder: Path, env: dict, address: str, data_root: str, n: int, slots: int) -> dict:
    """SIGKILL the driver when about half the trials finished, then --resume."""
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(kdtune_spec(data_root, n, slots)))

    def kill_half_way(proc, out):
        for line in proc.stdout:
            out.write(line)
            if line.startswith(f"[{n // 2}/"):
                os.kill(proc.pid, signal.SIGKILL)
                break

    first = timed(kdtune_command(folder, address, spec_path), env, folder, folder / "killed.log", kill_half_way)
    time.sleep(10)  # the killed job's trial actors end
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scale")
    finished = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=50000)
                if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags}
    second = timed(kdtune_command(folder, address, spec_path, "--resume"), env, folder, folder / "resumed.log")
    recovered = re.search(r"(\d+) trial\(s\) that ended after Tune's last snapshot", (folder / "resumed.log").read_text())
    return {"killed": first, "resumed": second, "recovered_from_mlflow": int(recovered.group(1)) if recovered else 0,
            **check_runs(folder, n, finished)}


# ---- the table ----

def slopes(rows: list[dict], tool: str, slots: int, sizes: list[int]) -> dict:
    cpu = {r["n"]: r["cpu_s"] for r in rows if r["tool"] == tool and r["slots"] == slots}
    return {f"{a}-{b}": round((cpu[b] - cpu[a]) / (b - a) * 1000, 1) for a, b in zip(sizes, sizes[1:])
            if a in cpu and b in cpu}


def table(rows: list[dict], sizes: list[int], slot_counts: list[int]) -> tuple[str, dict]:
    lines = ["| slots | N | kdtune wall s | kdtune driver CPU s | hand-written wall s | hand-written driver CPU s |",
             "|---|---|---|---|---|---|"]
    for slots in slot_counts:
        for n in sizes:
            k = next((r for r in rows if (r["tool"], r["slots"], r["n"]) == ("kdtune", slots, n)), None)
            h = next((r for r in rows if (r["tool"], r["slots"], r["n"]) == ("hand-written", slots, n)), None)
            if k and h:
                lines.append(f"| {slots} | {n} | {k['wall_s']} | {k['cpu_s']} | {h['wall_s']} | {h['cpu_s']} |")
    found = {}
    lines += ["", "| slots | sizes | kdtune ms CPU per added trial | hand-written | ratio |", "|---|---|---|---|---|"]
    for slots in slot_counts:
        ours, theirs = slopes(rows, "kdtune", slots, sizes), slopes(rows, "hand-written", slots, sizes)
        for span in ours:
            ratio = round(ours[span] / theirs[span], 2) if theirs.get(span) else None
            found[f"{slots}:{span}"] = {"kdtune_ms": ours[span], "hand_written_ms": theirs.get(span), "ratio": ratio}
            lines.append(f"| {slots} | {span.replace('-', ' to ')} | {ours[span]} | {theirs.get(span)} | {ratio} |")
    return "\n".join(lines), found


def plot(rows: list[dict], path: Path, slot_counts: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for slots, style in zip(slot_counts, ("-", "--", ":")):
        for tool, color in (("kdtune", "tab:blue"), ("hand-written", "tab:orange")):
            points = sorted((r["n"], r["cpu_s"], r["wall_s"]) for r in rows if r["tool"] == tool and r["slots"] == slots)
            if points:
                n, cpu, wall = zip(*points)
                axes[0].plot(n, cpu, style, marker="o", color=color, label=f"{tool}, {slots} slots")
                axes[1].plot(n, wall, style, marker="o", color=color, label=f"{tool}, {slots} slots")
    for ax, title in zip(axes, ("driver CPU (s)", "wall time (s)")):
        ax.set_xlabel("trials")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Sweep driver cost against the number of tiny trials (MLP, 512 images, 1 epoch)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def available_gib() -> float:
    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024 ** 2


def wait_for_memory(slots: int, timeout_s: float = 900) -> bool:
    """Whether `slots` trial actors fit in the memory available now (other jobs share this machine):
    waits up to `timeout_s` for it, rather than start enough actors to make the kernel kill processes."""
    deadline = time.time() + timeout_s
    while available_gib() < slots * WORKER_GIB + 2:
        if time.time() > deadline:
            return False
        time.sleep(10)
    return True


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024 ** 2
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "python": platform.python_version(),
            "load_at_start": os.getloadavg()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.hand_written:
        hand_written(args)
        return
    from kdtune.data.mnist import unpack_bundled

    sys.path.insert(0, str(REPO / "tests"))
    from test_cluster import new_cluster, start_head  # the cluster tests' head: own temp dir, token, ports

    unpack_bundled(args.data_root)
    cluster = new_cluster(cpus=max(args.slots))
    # 32 kdtune trial actors of ~0.62 GiB fill 95% of a 23.5 GiB machine, where Ray's memory monitor
    # kills actors by default; the head is started with the kernel's limit nearer instead
    cluster.env["RAY_memory_usage_threshold"] = str(args.memory_threshold)
    root = cluster.root
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    report = {"machine": machine(), "targets": TARGETS, "memory_threshold": args.memory_threshold, "rows": []}
    if args.previous:  # its rows keep their own head and machine state: "previous_run" says which
        earlier = json.loads(Path(args.previous).read_text())
        report["previous_run"] = {"machine": earlier["machine"], "actor_memory": earlier.get("actor_memory")}
        report["rows"] = [{**row, "previous_run": True} for row in earlier["rows"]]
    pairs = [tuple(map(int, pair.split(":"))) for pair in args.runs] if args.runs else [
        (slots, n) for slots in args.slots for n in args.sizes]
    out = Path(args.out)
    try:
        start_head(cluster)
        address = cluster.gcs
        with ActorMemory() as memory:
            for slots, n in pairs:
                if not wait_for_memory(slots):
                    report.setdefault("skipped", []).append(f"{slots} slots, N {n}: {available_gib():.1f} GiB available")
                    continue
                for tool, runner in (("hand-written", run_hand_written), ("kdtune", run_kdtune)):
                    if tool not in args.tools:
                        continue
                    row = {"tool": tool, "slots": slots, "n": n,
                           **runner(root / f"{tool}-{slots}-{n}", env, address, args.data_root, n, slots, args.ties)}
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    out.write_text(json.dumps(report, indent=2))
            if args.resume_check:
                report["resume_check"] = resume_check(root / "resume", env, address, args.data_root, args.resume_check,
                                                      max(args.slots))
                print(json.dumps(report["resume_check"]), flush=True)
        report["actor_memory"] = memory.summary()
    finally:
        cluster.stop()
    report["rows_failed"] = [row for row in report["rows"] if row["rc"] != 0]  # their logs stay in the temp dir
    report["rows"] = [row for row in report["rows"] if row["rc"] == 0]
    sizes = sorted({row["n"] for row in report["rows"]})
    slot_counts = sorted({row["slots"] for row in report["rows"]})
    report["table"], report["slopes"] = table(report["rows"], sizes, slot_counts)
    out.write_text(json.dumps(report, indent=2))
    plot(report["rows"], Path(args.plot), slot_counts)
    print(report["table"])
    if not report["rows_failed"]:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
