"""Before Ray starts: build every student size the space can sample, run one batch through it
and each method, so a wrong model, feature node or method pairing is a SpecError at its key;
score the first student with the evaluation, so a function that fails or returns no named
numbers, or an objective naming a metric it does not return, is one too; and find the
teacher's classifier head for the methods that reuse it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdtune.distill import INPUTS, METHODS, TEACHER_TARGETS
from kdtune.errors import SpecError
from kdtune.models.features import classifier_head, module_names, unwrapped
from kdtune.models.resolve import build_model
from kdtune.space import SearchSpace, resolve
from kdtune.spec import TeacherSpec, named_teachers
from kdtune.trial import scores

PROBE = 2  # images in the probe batch
EVALUATION_PROBE = 256  # validation samples the evaluation scores the untrained student on
OWN_NAMES = ("acc", "loss")  # what kdtune measures without an `evaluate` function: val_acc, val_loss


def _needs(method) -> set[str]:
    """The features a method reads of the student and teacher alike."""
    keys = set(method.teacher_keys)
    return {"embedding"} & keys | ({"maps"} if any(k.startswith("attention") for k in keys) else set())


def _missing(features, need: set[str]) -> list[str]:
    return [n for n in sorted(need) if (n == "embedding" and features.embedding is None)
            or (n == "maps" and len(features.maps) < 2)]


def _feature_hint(who: str, what: str, model: nn.Module) -> str:
    key = f"{who}.features.embedding: <module>" if what == "embedding" else f"{who}.features.maps: [<module>, <module>]"
    return f"add {key} (its last modules: {', '.join(module_names(unwrapped(model))[-12:])})"


def _output_check(features, num_classes: int, where: str, arch: str) -> None:
    logits = features.logits
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (PROBE, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SpecError(where, f"{arch} returned output {shape} for a batch of {PROBE}; expected "
                               f"[batch, num_classes] = [{PROBE}, {num_classes}]")


def _run(model: nn.Module, x: torch.Tensor, where: str, arch: str):
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    except Exception as exc:
        raise SpecError(where, f"{arch} failed on a batch of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}") from None


def _teacher_head(space: SearchSpace, teacher: nn.Module, teacher_out) -> Optional[nn.Module]:
    """The teacher's frozen classifier if a method of the space reuses it; else None."""
    needing = [name for name in space.methods if METHODS[name].needs_teacher_head]
    if not needing:
        return None
    head = classifier_head(teacher, teacher_out)
    if head is None:
        dim = teacher_out.embedding.shape[1]
        raise SpecError(f"search.space.loss.{needing[0]}",
                        f"method {needing[0]!r} needs the teacher's classifier: the layer that maps its embedding "
                        f"({dim} features) to its logits. None of a `classifier`, `fc` or `head` module or the last "
                        "Linear gives the teacher's logits from that embedding; name the classifier's input node as "
                        "teacher.features.embedding, or drop the method")
    return head


def arch_of(spec, where: str) -> str:
    """The arch of the teacher at `where` (`teacher` or `teachers.<name>`), or what an ensemble is."""
    entry = named_teachers(spec)[where.removeprefix("teachers.")]
    return entry.arch if isinstance(entry, TeacherSpec) else f"ensemble of {', '.join(entry.ensemble)}"


def check_objectives(spec, names, evaluated: bool) -> None:
    """Every objective on a validation metric names one the sweep measures (`names`, without val_)."""
    for i, objective in enumerate(spec.search.objectives):
        name = objective.metric.removeprefix("val_")
        if not objective.metric.startswith("val_") or name in names:
            continue
        if evaluated:
            measured = ", ".join(f"val_{n}" for n in sorted(names))
            raise SpecError(f"search.objectives.{i}.metric", f"{objective.metric!r} is not measured: scoring the "
                                                             f"untrained student, evaluate {spec.evaluate} returned "
                                                             f"no {name!r} (the sweep measures {measured})")
        raise SpecError(f"search.objectives.{i}.metric", f"{objective.metric!r} needs the top-level `evaluate` function "
                                                         f"(package.module:function returning {{{name!r}: ...}}); "
                                                         "without one kdtune measures val_acc and val_loss")


def check_evaluation(spec, evaluate, student: nn.Module, splits) -> None:
    """The evaluation on the untrained student over a slice of the validation set: it must run and
    return named numbers, among them every metric an objective names."""
    n = EVALUATION_PROBE
    check_objectives(spec, set(scores(student, splits.val_x[:n], splits.val_y[:n], evaluate)), evaluated=True)


def check_teacher(space: SearchSpace, splits, teacher: nn.Module, where: str, arch: str) -> tuple:
    """The teacher (`arch` at spec key `where`) on one batch: its output, and what every method
    reads of it. Returns (its targets, its frozen classifier head if a method reuses it, else None)."""
    x = splits.train_x[:PROBE]
    teacher_out = _run(teacher, x, f"{where}.arch", arch)
    _output_check(teacher_out, splits.num_classes, f"{where}.arch", arch)
    for name in space.methods:
        lacking = _missing(teacher_out, _needs(METHODS[name]))
        if lacking:
            raise SpecError(f"search.space.loss.{name}", f"method {name!r} needs the teacher's {lacking[0]}; "
                                                         + _feature_hint(where, lacking[0], teacher))
    head = _teacher_head(space, teacher, teacher_out)
    return {k: TEACHER_TARGETS[k](teacher_out) for k in {k for m in space.methods for k in METHODS[m].teacher_keys}}, head


def check_models(spec, space: SearchSpace, splits, teacher: Optional[nn.Module], student_factory=None,
                 evaluate=None, where: str = "teacher") -> Optional[nn.Module]:
    """Every student size and every method, on one batch of training images, and the evaluation
    function (if any) on the first student; the teacher is the spec's, or the named one at `where`.
    Returns the teacher's frozen classifier head when a method reuses it (None otherwise, and
    without a teacher: a space of teacher-free methods)."""
    x = splits.train_x[:PROBE]
    idx = torch.arange(PROBE)
    targets, head = ({}, None) if teacher is None else check_teacher(space, splits, teacher, where, arch_of(spec, where))
    for i, point in enumerate(space.baseline_points() or [{}]):
        plan = resolve(spec, point)
        s = plan.spec.student
        student = build_model(s, splits.in_shape, splits.num_classes, "student", s.width, student_factory)
        out = _run(student, x, "student.arch", plan.student)
        _output_check(out, splits.num_classes, "student.arch", plan.student)
        if i == 0 and evaluate is not None:  # one student tells whether the function works
            check_evaluation(spec, evaluate, student, splits)
        for name in space.methods:
            method = METHODS[name]
            lacking = _missing(out, _needs(method))
            if lacking:
                raise SpecError(f"search.space.loss.{name}", f"method {name!r} needs the student's {lacking[0]} "
                                                             f"({plan.student}); " + _feature_hint("student", lacking[0], student))
            try:
                distiller = method(out, targets, len(splits.train_y), spec.train.ce_weight, teacher_head=head,
                                   student_model=student)
                distiller.train()
                distiller(out, {**targets, INPUTS: x}, splits.train_y[:PROBE], idx, 0.0)
            except Exception as exc:
                raise SpecError(f"search.space.loss.{name}", f"method {name!r} failed on {plan.student}'s features: "
                                                             f"{type(exc).__name__}: {exc}") from None
    return head
