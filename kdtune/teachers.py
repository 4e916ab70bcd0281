"""The sweep's teachers by name (`teacher:` and `teachers:`): each one the space can choose is
trained or loaded once and its train-set outputs computed once, for all trials.

An assistant is trained once by KD from its named teacher, then cached like any teacher (a
resumed sweep loads it). An ensemble keeps its members' logits, mixed in each trial at its
method's temperature (kdtune.trial.ensemble_logits). A space of teacher-free methods (none,
dml, byot) needs no teacher and trains none unless the spec gives one (for the students' gap to
it). Forward passes are counted per teacher.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.data import Splits
from kdtune.data.stream import Stream
from kdtune.distill import METHODS
from kdtune.errors import SpecError
from kdtune.models import Features
from kdtune.space import SearchSpace
from kdtune.spec import EnsembleSpec, TeacherSpec, named_teachers
from kdtune.teacher import FORWARD_PASSES, Distil, get_teacher, streamed_targets, teacher_config, teacher_targets
from kdtune.trial import SweepData, TeacherData, accuracy


class Ensemble(nn.Module):
    """Members' weighted mean probability as a model (its logits: the log of that mean): for the
    ensemble's test accuracy and the pre-flight check of the methods that read it."""

    def __init__(self, members: list[nn.Module], weights: tuple[float, ...]):
        super().__init__()
        self.members, self.weights = nn.ModuleList(members), weights

    def forward(self, x) -> Features:
        mean = sum(w * F.softmax(m(x).logits.float(), dim=1) for m, w in zip(self.members, self.weights))
        return Features(mean.clamp_min(1e-12).log())


def teacher_keys(space: SearchSpace) -> list[str]:
    """Every teacher target some trial of this space may read."""
    return sorted({key for method in space.methods for key in METHODS[method].teacher_keys})


def teacher_view(spec, name: str):
    """The spec with the named teacher block as its one `teacher:`, as kdtune.teacher reads it."""
    block = named_teachers(spec)[name]
    plain = TeacherSpec(**{key: getattr(block, key) for key in TeacherSpec.model_fields})
    return spec.model_copy(update={"teacher": plain, "teachers": {}})


def weights_of(entry: EnsembleSpec) -> tuple[float, ...]:
    raw = entry.weights or [1.0] * len(entry.ensemble)
    return tuple(w / sum(raw) for w in raw)


@dataclass
class Loaded:
    """A teacher once loaded: its model, facts, and the config an assistant's cache key takes."""

    model: nn.Module
    facts: dict
    config: dict = field(default_factory=dict)


class Teachers:
    """Loads each named teacher a sweep needs once, counting its forward passes."""

    def __init__(self, spec, splits: Splits, log: Callable[[str], None], given=None, stream: Optional[Stream] = None):
        self.spec, self.splits, self.log, self.given, self.stream = spec, splits, log, given, stream
        self.named = named_teachers(spec)
        self.loaded: dict[str, Loaded] = {}
        self.passes: dict[str, Counter] = defaultdict(Counter)
        self.counted: Counter = Counter()  # every pass counted so far, whoever's
        self.computed: dict[str, tuple[TeacherData, dict]] = {}

    @contextmanager
    def counting(self, name: str):
        """The forward passes made in the block count as `name`'s, less those a nested block
        counted as another teacher's (an assistant's training reads its teacher's outputs)."""
        before, others = Counter(FORWARD_PASSES), Counter(self.counted)
        try:
            yield
        finally:
            own = Counter(FORWARD_PASSES) - before - (self.counted - others)
            self.passes[name].update(own)
            self.counted.update(own)

    def get(self, name: str) -> Loaded:
        if name not in self.loaded:
            entry = self.named[name]
            self.loaded[name] = self._ensemble(name, entry) if isinstance(entry, EnsembleSpec) else self._block(name, entry)
        return self.loaded[name]

    def _resident_only(self, name: str, what: str) -> None:
        if self.stream is not None:
            raise SpecError(f"teachers.{name}", f"{what} needs resident data (data.resident); this sweep streams it")

    def _block(self, name: str, entry) -> Loaded:
        view = teacher_view(self.spec, name)
        source = getattr(entry, "distil_from", None)
        distil = self._distil(name, entry) if source else None
        with self.counting(name):
            model, facts = get_teacher(view, self.splits, self.log, self.given if name == "teacher" else None,
                                       self.stream, distil)
        if source:
            facts.update(source=f"assistant of {source} ({facts['source']})", distil_from=source)
        config = {**teacher_config(view), "checkpoint": view.teacher.checkpoint, **(distil.config if distil else {})}
        return Loaded(model, facts, config)

    def _distil(self, name: str, entry) -> Distil:
        self._resident_only(name, "an assistant")
        source = self.get(entry.distil_from)

        def data() -> SweepData:  # only when the assistant trains, not when it is cached
            view = teacher_view(self.spec, entry.distil_from)  # its outputs on the assistant's augmented images
            view = view.model_copy(update={"data": view.data.model_copy(update={"augment": entry.augment})})
            with self.counting(entry.distil_from):
                targets, live, per_view, _ = teacher_targets(view, source.model, self.splits, ["logits"])
            return SweepData(self.splits, targets, source.model if live else None, per_view=per_view)
        self.log(f"teacher {name}: an assistant of {entry.distil_from} (KD at T={entry.temperature:g}, "
                 f"alpha={entry.alpha:g})")
        return Distil(source.config, entry.temperature, entry.alpha, data)

    def _ensemble(self, name: str, entry: EnsembleSpec) -> Loaded:
        self._resident_only(name, "an ensemble")
        members = [self.get(m) for m in entry.ensemble]
        model = Ensemble([m.model for m in members], weights_of(entry)).eval()
        test_acc, _ = accuracy(model, self.splits.test_x, self.splits.test_y)
        self.passes[name]["test"] += 1  # one pass of each member over the test set
        facts = {"arch": "ensemble", "params": sum(m.facts["params"] for m in members), "test_acc": test_acc,
                 "source": f"ensemble of {', '.join(entry.ensemble)}", "weights": list(model.weights)}
        self.log(f"teacher {name}: ensemble of {', '.join(entry.ensemble)}, test_acc {test_acc:.4f}")
        return Loaded(model, facts, {"ensemble": [m.config for m in members], "weights": list(model.weights)})

    def wanted(self, names: list[str], keys: list[str]) -> dict[str, list[str]]:
        """The targets to compute of each teacher: `keys` of each one in `names`, and the logits of
        the members of an ensemble among them, so that each teacher makes its targets in one go
        (ensembles last: they read their members')."""
        out: dict[str, set] = defaultdict(set)
        for name in names:
            entry = self.named[name]
            out[name] |= {"logits"} if isinstance(entry, EnsembleSpec) else set(keys)
            for member in entry.ensemble if isinstance(entry, EnsembleSpec) else []:
                out[member].add("logits")
        ensembles_last = sorted(out, key=lambda n: isinstance(self.named[n], EnsembleSpec))
        return {name: sorted(out[name]) for name in ensembles_last}

    def targets(self, name: str, keys: list[str], outputs_dir: Path) -> tuple[TeacherData, dict]:
        """The named teacher's train-set targets `keys`, computed once: (its data, cache facts)."""
        if name not in self.computed:
            self.computed[name] = self._targets(name, keys, outputs_dir)
        return self.computed[name]

    def _targets(self, name: str, keys: list[str], outputs_dir: Path) -> tuple[TeacherData, dict]:
        loaded, entry = self.get(name), self.named[name]
        if isinstance(entry, EnsembleSpec):
            members = [self.targets(m, ["logits"], outputs_dir)[0] for m in entry.ensemble]
            if any("logits" not in m.targets for m in members) or len({m.per_view for m in members}) > 1:
                raise SpecError(f"teachers.{name}", "an ensemble needs its members' logits cached alike (their "
                                                    "teacher.cache: outputs or augmentations, not live)")
            logits = torch.stack([m.targets["logits"] for m in members], dim=-2)
            return TeacherData({"logits": logits}, per_view=members[0].per_view, weights=loaded.model.weights), \
                {"cache": "members' logits", "cached_targets": ["logits"], "live_targets": []}
        view = teacher_view(self.spec, name)
        with self.counting(name):
            if self.stream is None:
                targets, live, per_view, mode = teacher_targets(view, loaded.model, self.splits, keys)
                outputs, why = None, None
            else:
                outputs, live, mode, why = streamed_targets(view, loaded.model, self.splits, self.stream, keys,
                                                            outputs_dir / name if self.spec.teachers else outputs_dir)
                targets, per_view = {}, False
        facts = {"cache": mode, "cached_targets": sorted(targets) or sorted(outputs.keys if outputs else []),
                 "live_targets": live, **({"cache_reason": why} if why else {}),
                 **({"outputs": {"folder": outputs.folder, "topk": outputs.topk}} if outputs else {})}
        return TeacherData(targets, loaded.model if live else None, per_view, outputs=outputs), facts


def no_teacher() -> dict:
    """summary.json's teacher of a sweep whose methods read none."""
    return {"source": "none: no method of the space reads a teacher", "test_acc": math.nan, "params": None}
