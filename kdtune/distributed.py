"""A trial larger than one process: `resources.workers` data-parallel workers started by Ray
Train's TorchTrainer from inside the Tune trial (gloo on CPUs, NCCL on GPUs).

The Tune trial stays the one that reports: rank 0 sends each epoch's metrics (and, on checkpoint
epochs, the state) to it through a Ray queue and waits for its answer, so Tune's checkpoints,
scheduler stops, `--resume` and the trial's MLflow run work as for a one-process trial. The
sweep's data reach the workers through Ray's object store (mapped, not copied, on each node).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty
from typing import Callable, Optional

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from kdtune import tracking
from kdtune.errors import SpecError
from kdtune.parallel import Ranks
from kdtune.trial import run_trial

POLL_S = 1.0  # how often the trial looks whether the workers failed while it waits for an epoch


@dataclass
class TrialWorkers:
    """How a trial's workers are started: the shared data's object-store reference and the
    per-worker resources of the spec."""

    data: ray.ObjectRef
    workers: int
    cpu: float
    gpu: float

    def train(self, plan, report: Callable, state: Optional[dict], storage: str,
              node_metrics: Optional[Callable] = None) -> None:
        """Run the trial on the workers; `report(metrics, get_state)` here, once per epoch.
        `node_metrics(node_id=...)` starts MLflow's system metrics of a node for the trial's run: the
        first worker on each node calls it."""
        results, answers = (Queue(actor_options={"num_cpus": 0}) for _ in range(2))
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"plan": plan, "data": self.data, "state": state, "cpu": self.cpu,
                               "results": results, "answers": answers, "node_metrics": node_metrics},
            scaling_config=ray.train.ScalingConfig(num_workers=self.workers, use_gpu=self.gpu > 0,
                                                   resources_per_worker={"CPU": self.cpu, "GPU": self.gpu}),
            run_config=ray.train.RunConfig(name="workers", storage_path=storage))
        try:
            with ThreadPoolExecutor(1) as pool:
                relay(pool.submit(trainer.fit), results, answers, report)
        finally:
            for queue in (results, answers):
                queue.shutdown()


def relay(fit, results: Queue, answers: Queue, report: Callable) -> None:
    """Pass rank 0's epochs to `report` until the workers end; answer each (False: stop them,
    when `report` raises because Tune stops the trial). Re-raises the workers' error."""
    while True:
        try:
            metrics, state = results.get(timeout=POLL_S)
        except Empty:
            if fit.done():
                fit.result()
                return
            continue
        go_on = False
        try:
            report(metrics, (lambda: state) if state is not None else None)
            go_on = True
        finally:
            answers.put(go_on)


def worker_loop(config: dict) -> None:
    """One worker: its rank, device and shard; rank 0 reports through the queues; the first worker
    of each node logs the node's system metrics."""
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    ranks = Ranks(context.get_world_rank(), context.get_world_size(), str(device))
    torch.set_num_threads(max(1, int(config["cpu"])))
    data = ray.get(config["data"])
    results, answers = config["results"], config["answers"]

    def report(metrics: dict, get_state) -> bool:
        results.put((metrics, get_state() if get_state else None))
        return answers.get()

    monitor = None
    if config["node_metrics"] and context.get_local_rank() == 0:
        monitor = config["node_metrics"](node_id=ray.get_runtime_context().get_node_id())
    try:
        run_trial(config["plan"], data.to(device) if device.type != "cpu" else data, report, config["state"], device,
                  ranks=ranks)
    finally:
        if monitor is not None:
            tracking.guarded("system metrics", monitor.finish)


def trial_resources() -> "ray.tune.PlacementGroupFactory":
    """What Tune reserves for a multi-worker trial's own process: no CPU, so that 2 workers of 1 CPU
    fit a 2-CPU machine (Tune wants some resource in a request: one byte of memory). Ray Train
    V2 reserves the workers' group as a placement group of its own, which a Tune trial cannot hold
    for it (ray-project/ray#54305); `trials_at_once` keeps Tune from starting more trials than
    the cluster holds the workers of."""
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": 0, "memory": 1}])


def room(resources, nodes: list[dict]) -> int:
    """How many workers of `resources.cpu` CPUs and `resources.gpu` GPUs the alive nodes hold."""
    def fits(node: dict) -> int:
        total = node.get("Resources", {})
        counts = [math.floor(total.get("CPU", 0) / resources.cpu + 1e-9)]
        if resources.gpu > 0:
            counts.append(math.floor(total.get("GPU", 0) / resources.gpu + 1e-9))
        return min(counts)
    return sum(fits(node) for node in nodes if node.get("Alive"))


def check_placeable(spec, nodes: list[dict]) -> None:
    """SpecError at resources.workers when one trial's workers cannot all be placed at once."""
    workers = spec.resources.workers
    fits = room(spec.resources, nodes)
    if workers > fits:
        alive = [node for node in nodes if node.get("Alive")]
        cpu = sum(node["Resources"].get("CPU", 0) for node in alive)
        gpu = sum(node["Resources"].get("GPU", 0) for node in alive)
        raise SpecError("resources.workers",
                        f"{workers} workers of {spec.resources.cpu:g} CPU and {spec.resources.gpu:g} GPU each do not "
                        f"fit the Ray cluster: {len(alive)} node(s) with {cpu:g} CPU and {gpu:g} GPU in all, room for "
                        f"{fits} such worker(s); lower resources.workers or resources.cpu/gpu, or add nodes")


def trials_at_once(spec, nodes: list[dict]) -> int:
    """search.max_concurrent, or fewer: as many trials as the cluster holds all the workers of."""
    return max(1, min(spec.search.max_concurrent, room(spec.resources, nodes) // spec.resources.workers))
