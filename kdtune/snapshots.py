"""Experiment snapshots when something a resume needs has changed, not on Tune's timer.

Tune writes its experiment snapshot (trial states, the pickled searcher) on a timer,
`TUNE_GLOBAL_CHECKPOINT_S`. kdtune sets 0 so that a killed driver loses no trial, but Tune's
controller steps ten times a second while it only waits for results, and a snapshot at every step
took 13% of a core from the trials on a 2-core machine. A longer period loses the trials that start
and end between two snapshots. Tune has no "snapshot on event" option, so `EventSnapshots` finds
the controller that calls its hooks, stops the timer, and at the end of any step in which a trial
was added, started, checkpointed, recovered or ended calls the controller's own
`checkpoint(force=True, wait=True)`. A result without a checkpoint changes nothing a resume uses.
A snapshot written while the previous one's upload still copies the staged files makes that copy
fail (a temporary file is renamed under it) with an error in the log; so each snapshot waits for
its upload, and the timer stops before its first one. On a Ray whose controller does not look as
expected, nothing changes: the snapshots stay at every step.
"""
from __future__ import annotations

import logging
import math
import sys
import time

from ray import tune

log = logging.getLogger(__name__)


def _calling_controller():
    """The Tune controller up the call stack of a callback hook, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if callable(getattr(owner, "checkpoint", None)) and hasattr(getattr(owner, "_checkpoint_manager", None), "_checkpoint_period"):
            return owner
        frame = frame.f_back
    return None


class EventSnapshots(tune.Callback):
    """Snapshot the experiment at the end of each controller step that changed what a resume needs."""

    def __init__(self):
        self._controller = None  # found on the first step; False where there is none
        self._trials_seen = 0
        self._changed = False

    def __reduce__(self):  # Tune pickles callbacks into the snapshot: the controller is not part of it
        return EventSnapshots, ()

    def _found(self):
        if self._controller is None:
            self._controller = _calling_controller() or False
            if not self._controller:
                log.warning("kdtune: no Tune controller found; experiment snapshots stay at every step")
        return self._controller

    def on_step_begin(self, iteration, trials, **info):
        controller = self._found()
        manager = controller._checkpoint_manager if controller else None  # a resumed controller builds a new one
        if manager is not None and manager._checkpoint_period == 0:  # kdtune's default: the events take over
            manager._checkpoint_period, manager._last_save_time = math.inf, time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        if self._controller and (self._changed or len(trials) != self._trials_seen):  # len grows as trials are added
            self._changed, self._trials_seen = False, len(trials)
            self._controller.checkpoint(force=True, wait=True)

    def _change(self, *args, **info):
        self._changed = True

    on_trial_start = on_checkpoint = on_trial_recover = on_trial_complete = on_trial_error = _change
