"""A real two-node Ray cluster on this machine, and the sweep on it.

`ray start --head` and `ray start --address` (1 CPU each, own temp dirs, free loopback ports, token auth
with a token file of the test's own), then a `--smoke` sweep joining with `--address` and one submitted
with `ray job submit` (sweeps/ray-job.sh). Every process is started here and stopped here by PID.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from conftest import LIGHT_SMOKE

RAY = shutil.which("ray")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None, reason="needs the `ray` CLI (pip install 'ray[default]')")]

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "search_spaces" / "mnist.yaml"
HOST = "127.0.0.1"
# A smaller slice than --smoke (the teacher trains on it first), and two trials at once on two 1-CPU nodes.
SMALL = [*LIGHT_SMOKE, "data.train_limit=2000", "data.val_size=500", "data.test_limit=500", "resources.cpu=1",
         "search.max_concurrent=2", "search.num_samples=2", "search.baselines=false", "search.confirm_seeds=0"]
# Trials of ~20 s (7500 steps), far longer than the two nodes' trial actors start apart (5-10 s under
# load): Tune (reuse_actors) would else move the second trial onto the first node's actor once it is free.
SPREAD = ["train.epochs=40", "train.batch_size=8"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def descendants(roots: list[int]) -> set[int]:
    """The roots and every process below them (from /proc), found before anything is killed."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def mentioning(text: str) -> set[int]:
    """Processes whose command line holds `text` (the test's own temp dir: a job driver has its own session)."""
    pids = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(entry))
            except OSError:
                pass
    return pids


@dataclass
class Cluster:
    root: Path
    gcs: str = ""
    dashboard: str = ""
    env: dict = field(default_factory=dict)  # for drivers and clients: the token, but no RAY_AUTH_MODE
    node_ids: set = field(default_factory=set)
    procs: list = field(default_factory=list)
    cpus: int = 1  # CPU slots each node advertises

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        node_env = {**self.env, "RAY_AUTH_MODE": "token"}  # every node of a token cluster needs it
        self.procs.append(subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={self.cpus}",
                                            f"--node-ip-address={HOST}", f"--temp-dir={self.root / name}",
                                            "--object-store-memory=200000000", *args],
                                           env=node_env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))  # own process group, killed by PID
        log.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        pids = descendants([p.pid for p in self.procs]) | mentioning(str(self.root))
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids | descendants(list(pids)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in self.procs:
            proc.wait(timeout=30)


def wait_for_nodes(cluster: Cluster, count: int, timeout: float = 90) -> set[str]:
    probe = ("import json, sys, time, ray\n"
             f"ray.init(address={cluster.gcs!r}, log_to_driver=False)\n"
             f"end = time.time() + {timeout}\n"
             "while True:\n"
             "    alive = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
             f"    if len(alive) >= {count} or time.time() > end: break\n"
             "    time.sleep(1)\n"
             "print(json.dumps(alive))\n")
    env = {**cluster.env, "RAY_AUTH_MODE": "token"}
    deadline = time.time() + timeout
    while True:
        try:
            run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                 timeout=timeout + 60)
            output = f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
            if run.returncode == 0 and len(alive := set(json.loads(run.stdout.splitlines()[-1]))) >= count:
                return alive
        except subprocess.TimeoutExpired:
            output = "probe timed out"
        if time.time() > deadline or any(p.poll() is not None for p in cluster.procs):
            pytest.fail(f"cluster did not come up ({count} nodes):\n{output}\n{cluster.logs()}")
        time.sleep(2)


def new_cluster(cpus: int = 1) -> Cluster:
    """A Cluster in a temp dir of its own, with a token of its own."""
    # A short path: Ray's unix sockets live under the temp dirs and must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="kdtc-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), KDTUNE_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1")
    return Cluster(root, env=env, cpus=cpus)


def start_head(c: Cluster) -> None:
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(7)
    c.gcs, c.dashboard = f"{HOST}:{gcs}", f"http://{HOST}:{dash}"
    c.start("head", ["--head", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-host={HOST}",
                     f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                     f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                     f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"])
    wait_for_nodes(c, 1)


@pytest.fixture(scope="module")
def cluster():
    c = new_cluster()
    root = c.root
    try:
        start_head(c)
        agent_http, agent_grpc, runtime_env, metrics = free_ports(4)
        c.start("worker", [f"--address={c.gcs}", f"--dashboard-agent-listen-port={agent_http}",
                           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
                           f"--metrics-export-port={metrics}"])
        c.node_ids = wait_for_nodes(c, 2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def sweep_args(out: Path, *extra: str) -> list[str]:
    sets = [f"data.root={out.parent / 'data'}", *SMALL, *extra]
    return ["--smoke", *[a for s in sets for a in ("--set", s)], "--results-dir", str(out / "results"),
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"]


def check_results(out: Path) -> pd.DataFrame:
    trials = pd.read_csv(out / "results" / "mnist-kd" / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "FINISHED").all(), trials.to_string()
    return trials


def test_sweep_with_address_runs_trials_on_both_nodes(cluster):
    out = cluster.root / "sweep"
    out.mkdir()
    # No RAY_AUTH_MODE here: kdtune's init_ray turns token mode on because a token is at hand.
    run = subprocess.run([sys.executable, "-m", "kdtune.sweep", str(SPEC), "--address", cluster.gcs,
                          "--storage", str(out / "storage"), *sweep_args(out, *SPREAD)],
                         cwd=out, env=cluster.env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    trials = check_results(out)
    assert set(trials["node_id"]) == cluster.node_ids, trials[["trial_id", "node_id"]].to_string()
    assert (out / "storage" / "mnist-kd").is_dir()


def test_ray_job_submit_runs_the_sweep(cluster):
    out = cluster.root / "job"
    out.mkdir()
    # The installed package, no working-dir upload (the repo carries 11 MB of MNIST): absolute paths.
    env = {**cluster.env, "RAY_DASHBOARD": cluster.dashboard, "KDTUNE_WORKING_DIR": ""}
    run = subprocess.run(["bash", str(REPO / "sweeps" / "ray-job.sh"), str(SPEC), *sweep_args(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, f"{run.stdout[-5000:]}\n{run.stderr[-3000:]}"
    assert "succeeded" in run.stdout + run.stderr
    trials = check_results(out)
    assert set(trials["node_id"]) <= cluster.node_ids


USER_MODULE = '''
import torch
from torch import nn

class Net(nn.Module):
    """A user's student family that only the driver's PYTHONPATH holds."""
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)
    def forward(self, x):
        return self.fc(self.body(x))
'''


def test_import_path_model_reaches_the_worker_node(cluster):
    """The student's module is on the driver's PYTHONPATH only; kdtune ships it with Ray's
    runtime_env, so trials on both nodes build it."""
    out = cluster.root / "byo"
    code = out / "usercode"
    code.mkdir(parents=True)
    (code / "kdtc_students.py").write_text(USER_MODULE)
    env = {**cluster.env, "PYTHONPATH": str(code)}
    run = subprocess.run([sys.executable, "-m", "kdtune.sweep", str(SPEC), "--address", cluster.gcs,
                          "--storage", str(out / "storage"),
                          *sweep_args(out, *SPREAD, "student.arch=kdtc_students:Net", "search.space={width: {choice: [8, 16]}, loss: {none: {}, kd: {}}}")],
                         cwd=out, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    trials = check_results(out)
    assert set(trials["student.arch"]) == {"kdtc_students:Net"}
    assert set(trials["node_id"]) == cluster.node_ids, trials[["trial_id", "node_id"]].to_string()
