"""The search space: validated from the spec, sampled define-by-run by Optuna.

The method is a categorical parameter `loss`; a method's own parameters are named
`<method>.<param>` and sampled only when that method is chosen, so the sampler never
learns from parameters that did not apply. `student.arch` may branch the same way, each
architecture with its own student keys (`cnn.width`), since sizes that suit an MLP do not
suit a CNN.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import ValidationError

from kdtune.distill import METHODS
from kdtune.errors import SpecError
from kdtune.models import MODELS
from kdtune.models.resolve import arch_problem
from kdtune.spec import EnsembleSpec, Spec, check_teachers, default_teacher, field_at, named_teachers

FORMS = ("choice", "uniform", "loguniform", "int")
SEARCHABLE_SECTIONS = ("student", "train")
KWARGS = "student.kwargs."


def dotted_key(key: str) -> str:
    """A search key as a spec path: `width` and an arch branch's `kwargs.x` are short for student's."""
    if key == "width" or key.startswith("kwargs."):
        return f"student.{key}"
    return key


def is_student_key(key: str) -> bool:
    """Keys that set the student's size, so baselines run at each of their choices."""
    dotted = dotted_key(key)
    return dotted in ("student.width", "student.arch") or dotted.startswith(KWARGS)


def is_searchable(dotted: str) -> bool:
    if dotted.startswith(KWARGS):
        return len(dotted) > len(KWARGS) and "." not in dotted[len(KWARGS):]
    return dotted.split(".")[0] in SEARCHABLE_SECTIONS and field_at(dotted) is not None


def set_at(data: dict, dotted: str, value) -> None:
    """data['student']['kwargs']['x'] = value for 'student.kwargs.x'."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def reads_teacher(method: str) -> bool:
    """Whether a method distils from a teacher (none, dml and byot do not)."""
    cls = METHODS[method]
    return bool(cls.teacher_keys) or cls.needs_teacher_head


def has_maps(arch: str) -> bool | None:
    """Whether a built-in architecture has conv feature maps; None for models named otherwise
    (their features are checked on one batch before the sweep starts)."""
    return getattr(MODELS[arch], "has_maps", False) if arch in MODELS else None


@dataclass(frozen=True)
class Dim:
    """One searched (or fixed) parameter: form 'fixed' or one of FORMS."""

    form: str
    args: tuple

    def sample(self, trial, name: str):
        if self.form == "choice":
            return trial.suggest_categorical(name, list(self.args))
        if self.form == "int":
            return trial.suggest_int(name, *self.args)
        return trial.suggest_float(name, *self.args, log=self.form == "loguniform")


def _sample(trial, constants: dict, name: str, dim: Dim) -> None:
    if dim.form == "fixed":
        constants[name] = dim.args[0]
    else:
        dim.sample(trial, name)


def _branch(trial, constants: dict, key: str, branches: dict[str, dict[str, Dim]]) -> None:
    """Choose one branch as categorical `key`, then sample only its own parameters."""
    if len(branches) > 1:
        chosen = trial.suggest_categorical(key, list(branches))
    else:
        chosen = constants[key] = next(iter(branches))
    for param, dim in branches[chosen].items():
        _sample(trial, constants, f"{chosen}.{param}", dim)


def _choice_points(dims: dict[str, Dim], prefix: str = "") -> list[dict]:
    """Every combination of the choice values of the student's size keys among `dims`."""
    keys = [k for k in dims if is_student_key(k) and dims[k].form == "choice"]
    return [{f"{prefix}{k}": v for k, v in zip(keys, values)}
            for values in itertools.product(*(dims[k].args for k in keys))]


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Dim]
    methods: dict[str, dict[str, Dim]]
    archs: dict[str, dict[str, Dim]] = field(default_factory=dict)  # student.arch as branches
    teacher: Dim | None = None  # `teacher: {choice: [names]}`, sampled only for methods that read a teacher
    default_teacher: str | None = None
    named_teachers: bool = False  # the spec names its teachers (`teachers:`): trials.csv gets a teacher column
    teacher_given: bool = False  # the spec has `teacher:` or `teachers:`: loaded even for a baseline-only space

    @property
    def columns(self) -> list[str]:
        """Every parameter a trial may carry, in a stable order (for trials.csv)."""
        names = list(self.params)
        if self.archs:
            names += ["student.arch"] + [f"{a}.{p}" for a, dims in self.archs.items() for p in dims]
        return (names + ["loss"] + [f"{m}.{p}" for m, dims in self.methods.items() for p in dims]
                + (["teacher"] if self.teacher is not None or self.named_teachers else []))

    @property
    def teachers(self) -> list[str]:
        """The named teachers some trial of this space distils from. A space whose methods read no
        teacher loads none, unless the spec gives one: its test accuracy and gap to each student
        are still part of the answer (a baseline-only sweep with `teacher:`)."""
        if not any(reads_teacher(m) for m in self.methods):
            return [self.default_teacher] if self.teacher_given and self.default_teacher else []
        return list(self.teacher.args) if self.teacher is not None else [self.default_teacher]

    def __call__(self, trial) -> dict[str, Any]:
        """Optuna define-by-run (a picklable callable, as Tune checkpoints the searcher);
        returns the constants Ray merges into the config."""
        constants = {}
        for name, dim in self.params.items():
            _sample(trial, constants, name, dim)
        if self.archs:
            _branch(trial, constants, "student.arch", self.archs)
        _branch(trial, constants, "loss", self.methods)
        if self.teacher is not None and reads_teacher(constants.get("loss") or trial.params["loss"]):
            _sample(trial, constants, "teacher", self.teacher)
        return constants

    def baseline_points(self) -> list[dict]:
        """loss=none at every combination of the student's choice values, for the KD-gain table."""
        shared = _choice_points(self.params)
        if self.archs:
            sizes = [{"student.arch": arch, **size} for arch, dims in self.archs.items()
                     for size in _choice_points(dims, f"{arch}.")]
            shared = [{**point, **size} for point in shared for size in sizes]
        loss = {"loss": "none"} if len(self.methods) > 1 else {}
        return [{**point, **loss} for point in shared]

    def student_values(self, key: str, spec_value) -> tuple:
        if key == "student.arch" and self.archs:
            return tuple(self.archs)
        dim = self.params.get(key)
        return (spec_value,) if dim is None else dim.args if dim.form in ("fixed", "choice") else ()


def _spec_value_check(spec_dict: dict, dotted: str) -> Callable[[Any], str | None]:
    """Checks a candidate value by validating the whole spec with it in place."""

    def check(value):
        trial = copy.deepcopy(spec_dict)
        set_at(trial, dotted, value)
        try:
            Spec.model_validate(trial)
        except ValidationError as exc:
            return exc.errors()[0]["msg"].removeprefix("Value error, ")
        return None
    return check


def _parse_dim(path: str, raw: Any, check: Callable[[Any], str | None]):
    def checked(value, where):
        problem = check(value)
        if problem:
            raise SpecError(where, f"{problem} (got {value!r})")
        return value

    if not isinstance(raw, dict):
        return Dim("fixed", (checked(raw, path),))
    if len(raw) != 1 or next(iter(raw)) not in FORMS:
        raise SpecError(path, f"a search form must be one of {{{' | '.join(FORMS)}: ...}} or a plain value; got keys {sorted(raw)}")
    form, args = next(iter(raw.items()))
    where = f"{path}.{form}"
    if form == "choice":
        if not isinstance(args, list) or not args:
            raise SpecError(where, "choice needs a non-empty list of values")
        if any(isinstance(v, (dict, list)) for v in args):
            raise SpecError(where, "choice values must be plain values (numbers, strings, booleans)")
        return Dim(form, tuple(checked(v, f"{where}[{i}]") for i, v in enumerate(args)))
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)):
        raise SpecError(where, f"{form} needs a list [lo, hi] of two numbers (got {args!r})")
    lo, hi = args
    if not lo < hi:
        raise SpecError(where, f"empty or inverted range: lo must be below hi (got [{lo}, {hi}])")
    if form == "loguniform" and lo <= 0:
        raise SpecError(where, f"loguniform needs lo > 0 (got {lo})")
    if form == "int" and not all(isinstance(v, int) for v in args):
        raise SpecError(where, f"int needs integer bounds (got {args!r})")
    if not all(math.isfinite(v) for v in args):
        raise SpecError(where, "bounds must be finite")
    return Dim(form, (checked(lo, f"{where}[0]"), checked(hi, f"{where}[1]")))


def _parse_branches(raw: dict, path: str, problem: Callable[[str], str | None], kind: str, example: str,
                    parse: Callable[[str, str, str, Any], Dim]) -> dict[str, dict[str, Dim]]:
    """Each branch (a method, or an arch) with its own parameters, each read by
    `parse(branch, key, key path, value)`; `problem(name)` says why a branch name is wrong."""
    branches = {}
    for name, params in raw.items():
        where = f"{path}.{name}"
        if problem(name):
            raise SpecError(where, problem(name))
        params = params or {}
        if not isinstance(params, dict):
            raise SpecError(where, f"expected a mapping of this {kind}'s parameters, e.g. {example}, or {{}}")
        branches[name] = {key: parse(name, key, f"{where}.{key}", value) for key, value in params.items()}
    return branches


def _unknown_method(name: str) -> str | None:
    return None if name in METHODS else f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}"


def _parse_methods(raw: Any) -> dict[str, dict[str, Dim]]:
    if isinstance(raw, str):
        raw = {raw: {}}
    if not isinstance(raw, dict) or not raw:
        raise SpecError("search.space.loss", "expected a mapping of method name to its parameters, e.g. {none: {}, kd: {temperature: 4}}")

    def parse(method, param, where, value):
        allowed = METHODS[method].params
        if param not in allowed:
            listed = ", ".join(sorted(allowed)) or "none"
            raise SpecError(where, f"method {method!r} has no parameter {param!r}; its parameters: {listed}")
        return _parse_dim(where, value, allowed[param].check)

    return _parse_branches(raw, "search.space.loss", _unknown_method, "method", "{temperature: 4}", parse)


def _is_branches(raw: Any) -> bool:
    """`student.arch: {mlp: {...}, cnn: {...}}`, as opposed to a search form or a plain value."""
    return isinstance(raw, dict) and not (len(raw) == 1 and next(iter(raw)) in FORMS)


def _parse_archs(raw: dict, spec_dict: dict, shared: dict) -> dict[str, dict[str, Dim]]:
    """Each architecture's own student keys (cnn.width), validated with that arch in place."""

    def parse(arch, key, where, value):
        dotted = dotted_key(key)
        if not dotted.startswith("student.") or dotted == "student.arch" or not is_searchable(dotted):
            raise SpecError(where, "not a student key; use width, kwargs.<name> or a dotted path under student")
        if key in shared or dotted in shared:
            raise SpecError(where, f"also given at search.space.{key}; give it in one place")
        with_arch = {**spec_dict, "student": {**spec_dict["student"], "arch": arch}}
        return _parse_dim(where, value, _spec_value_check(with_arch, dotted))

    return _parse_branches(raw, "search.space.student.arch", arch_problem, "arch", "{width: {choice: [4, 8]}}", parse)


def _parse_teacher(raw: Any, names: list[str]) -> Dim:
    """`teacher: name` or `teacher: {choice: [names]}`, each a named teacher."""
    def known(value):
        return None if value in names else f"unknown teacher; named teachers: {', '.join(names)}"
    dim = _parse_dim("search.space.teacher", raw, known)
    if dim.form not in ("fixed", "choice"):
        raise SpecError(f"search.space.teacher.{dim.form}", "the teacher is a name or {choice: [names]}")
    return dim


def _check_method_teachers(methods: dict, space: "SearchSpace", spec) -> None:
    """An ensemble has only logits: a method reading a teacher's features or classifier cannot use it."""
    ensembles = [n for n in space.teachers if isinstance(named_teachers(spec)[n], EnsembleSpec)]
    for name in methods:
        cls = METHODS[name]
        wants = [k for k in cls.teacher_keys if k != "logits"] + (["classifier"] if cls.needs_teacher_head else [])
        if ensembles and wants:
            raise SpecError(f"search.space.loss.{name}",
                            f"method {name!r} reads the teacher's {wants[0]}, but teacher {ensembles[0]!r} is an "
                            "ensemble, which gives only logits; drop the method or that teacher")


def parse_space(spec) -> SearchSpace:
    """Validate `spec.search.space` against the spec schema, the method registry and the named teachers."""
    check_teachers(spec)
    raw = dict(spec.search.space)
    teacher = _parse_teacher(raw.pop("teacher"), list(named_teachers(spec))) if "teacher" in raw else None
    methods = _parse_methods(raw.pop("loss", {"kd": {}}))
    if spec.search.baselines and "none" not in methods:
        methods = {"none": {}, **methods}
    spec_dict = spec.model_dump(mode="python")
    archs = _parse_archs(raw.pop("student.arch"), spec_dict, raw) if _is_branches(raw.get("student.arch")) else {}
    params = {}
    for key, value in raw.items():
        dotted = dotted_key(key)
        path = f"search.space.{key}"
        if not is_searchable(dotted):
            raise SpecError(path, "not a searchable key; use width, loss, student.kwargs.<name>, or a dotted "
                                  f"path under {' or '.join(SEARCHABLE_SECTIONS)} (e.g. train.lr, student.arch)")
        params[key] = _parse_dim(path, value, _spec_value_check(spec_dict, dotted))
    space = SearchSpace(params, methods, archs, teacher, default_teacher(spec), bool(spec.teachers),
                        spec.teacher_given)
    _check_method_teachers(methods, space, spec)
    archs = space.student_values("student.arch", spec.student.arch)
    for name in methods:
        if METHODS[name].needs_conv_student:
            flat = [a for a in archs if has_maps(a) is False]
            if flat:
                raise SpecError(f"search.space.loss.{name}",
                                f"method {name!r} needs a conv student, but student.arch can be {flat[0]!r}; "
                                "use student.arch: cnn or drop this method")
    return space


@dataclass
class TrialPlan:
    """What one trial trains: the spec with the trial's values applied, the method and its parameters."""

    spec: Any
    method: str
    method_params: dict
    seed: int
    teacher: str | None = None  # the named teacher it distils from; None for a teacher-free method

    @property
    def student(self) -> str:
        """The student's size as one label (arch, width, constructor kwargs): the unit of the KD-gain table."""
        s = self.spec.student
        return " ".join([s.arch] + ([str(s.width)] if s.width is not None else [])
                        + [f"{k}={v}" for k, v in sorted(s.kwargs.items())])


def resolve(spec, config: dict) -> TrialPlan:
    """Apply a trial's flat config (as sampled, or a confirmation rerun's) to the spec."""
    method = config.get("loss", "none")
    prefix = f"{method}."
    method_params = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    data = spec.model_dump(mode="python")
    arch_prefix = f"{config.get('student.arch', spec.student.arch)}."
    for key, value in config.items():
        dotted = dotted_key(key)
        if key.startswith(arch_prefix):  # the chosen arch's own keys, e.g. cnn.width
            dotted = dotted_key(key[len(arch_prefix):])
        if dotted.split(".")[0] in SEARCHABLE_SECTIONS:
            set_at(data, dotted, value)
    teacher = config.get("teacher") or (default_teacher(spec) if reads_teacher(method) else None)
    return TrialPlan(Spec.model_validate(data), method, method_params, int(config.get("seed", spec.seed)), teacher)
