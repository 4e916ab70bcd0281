"""EventSnapshots: Tune's experiment snapshot follows the trials' events, not the controller's idle steps."""
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator

from kdtune.cluster import init_ray
from kdtune.snapshots import EventSnapshots

IDLE_S = 2.0


def watch_the_snapshot(config):
    """Wait until the experiment snapshot on storage names this trial, then count its rewrites while
    the trial only sleeps: the controller keeps stepping ten times a second meanwhile."""
    context = tune.get_context()
    folder, me = Path(config["experiment_dir"]), context.get_trial_id()
    started = time.monotonic()

    def snapshot():
        found = sorted(folder.glob("experiment_state-*.json"))
        return found[-1] if found else None

    while not ((path := snapshot()) and me in path.read_text()) and time.monotonic() - started < 30:
        time.sleep(0.02)
    named_after = time.monotonic() - started
    time.sleep(0.5)  # the step that started this trial may end, with its snapshot, after the trial began
    writes, last, idle_from = 0, path.stat().st_mtime_ns, time.monotonic()
    while time.monotonic() - idle_from < IDLE_S:
        time.sleep(0.02)
        if (mtime := path.stat().st_mtime_ns) != last:
            writes, last = writes + 1, mtime
    tune.report({"named_after_s": named_after, "idle_writes": writes})


@pytest.fixture(scope="module")
def local_ray():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)  # workers import this file
        temp_dir = init_ray(None)  # kdtune's own setup: TUNE_GLOBAL_CHECKPOINT_S=0, a snapshot every step
        yield
        ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def run(tmp_path, name, callbacks) -> list[dict]:
    """Two trials one after the other, the second asked for when the first ends (as Optuna's are)."""
    searcher = BasicVariantGenerator(max_concurrent=1)
    tuner = tune.Tuner(watch_the_snapshot, param_space={"experiment_dir": str(tmp_path / name)}, tune_config=tune.TuneConfig(num_samples=2, search_alg=searcher, reuse_actors=True),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), callbacks=callbacks, verbose=0))
    return [result.metrics for result in tuner.fit()]


def test_a_started_trial_is_in_the_snapshot_at_once_and_idle_steps_write_none(tmp_path, local_ray, caplog):
    every_step = run(tmp_path, "every-step", [])
    tune_log = logging.getLogger("ray.tune.execution.experiment_state")  # under "ray", which does not propagate
    tune_log.addHandler(caplog.handler)
    try:
        on_events = run(tmp_path, "on-events", [EventSnapshots()])
    finally:
        tune_log.removeHandler(caplog.handler)
    # the control: without the callback, kdtune's period 0 rewrites the snapshot many times a second
    assert all(trial["idle_writes"] >= 5 for trial in every_step), [trial["idle_writes"] for trial in every_step]
    # with it, each trial's start is in the snapshot at once, as with a snapshot every step (with
    # Tune's default 10 s timer instead, one run named the second trial 3.4 s after its start) ...
    assert all(trial["named_after_s"] < 1 for trial in on_events), [trial["named_after_s"] for trial in on_events]
    # ... and while nothing happens, nothing is written
    assert all(trial["idle_writes"] == 0 for trial in on_events), [trial["idle_writes"] for trial in on_events]
    # no snapshot overwrote the staged files while an upload still copied them ("Saving experiment
    # state to storage ... failed", which Tune logs and then goes on)
    assert [r.getMessage() for r in caplog.records if r.name == tune_log.name and r.levelno >= logging.WARNING] == []
