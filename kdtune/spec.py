"""The sweep spec: YAML loaded safely into a strict schema.

Every mistake becomes a `SpecError` that names the file, the key path and what is
allowed, so the CLI can exit 2 before Ray or MLflow start.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdtune.datasets import DATASETS
from kdtune.models import MODELS

METRICS = ("val_acc", "val_loss", "params", "extra_params")


class SpecError(Exception):
    """A spec problem at a key path; str() is the user-facing message."""

    def __init__(self, path: str, message: str, file: str | None = None):
        super().__init__(path, message)
        self.path, self.message, self.file = path, message, file

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.path or '<top>'}: {self.message}"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _one_of(registry, kind):
    def check(value):
        if value not in registry:
            raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(sorted(registry))}")
        return value
    return check


class DataSpec(Strict):
    dataset: str = "mnist"
    root: str = "data"
    val_size: int = Field(5000, ge=1)
    train_limit: Optional[int] = Field(None, ge=2)
    test_limit: Optional[int] = Field(None, ge=1)

    _dataset = field_validator("dataset")(_one_of(DATASETS, "dataset"))


class TeacherSpec(Strict):
    arch: str = "mnist_cnn"
    checkpoint: Optional[str] = None
    epochs: int = Field(3, ge=1)
    lr: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)
    cache_dir: Optional[str] = None
    feature_cache_mb: float = Field(1024, ge=0)

    _arch = field_validator("arch")(_one_of(MODELS, "arch"))


class StudentSpec(Strict):
    arch: str = "mlp"
    width: int = Field(128, ge=1)

    _arch = field_validator("arch")(_one_of(MODELS, "arch"))


class TrainSpec(Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adam", "sgd", "adadelta"] = "adam"
    lr: float = Field(0.001, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(2, ge=1)
    mixed_precision: bool = True  # bf16 autocast of forward and losses on CUDA; CPUs train in fp32


class Objective(Strict):
    metric: Literal[METRICS]
    mode: Literal["max", "min"]


class SchedulerSpec(Strict):
    type: Literal["asha"]
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3, gt=1)


class SearchSpec(Strict):
    space: dict[str, Any] = Field(default_factory=dict)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="val_acc", mode="max"), Objective(metric="params", mode="min")],
        min_length=1)
    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    num_samples: int = Field(24, ge=1)
    max_concurrent: int = Field(2, ge=1)
    baselines: bool = True
    scheduler: Optional[SchedulerSpec] = None
    max_failures: int = Field(0, ge=0)
    confirm_seeds: int = Field(3, ge=0)


class Resources(Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


class RaySpec(Strict):
    address: Optional[str] = None
    storage_path: Optional[str] = None


class MlflowSpec(Strict):
    tracking_uri: Optional[str] = None


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: Resources = Field(default_factory=Resources)
    ray: RaySpec = Field(default_factory=RaySpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the key at `loc`, to list its allowed keys."""
    model = Spec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        inner = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if isinstance(a, type)]
        model = next((a for a in inner if issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _explain(error: dict) -> SpecError:
    loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
    path = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = ", ".join(owner.model_fields) if owner else "none"
        return SpecError(path, f"unknown key; allowed keys here: {allowed}")
    if error["type"] == "missing":
        return SpecError(path, "required key is missing")
    if error["msg"].startswith("Value error, "):  # our own validators (_one_of) already quote the value
        return SpecError(path, error["msg"].removeprefix("Value error, "))
    return SpecError(path, f"{error['msg']} (got {error.get('input')!r})")


def validate(raw: Any) -> Spec:
    """Validate a spec mapping (schema, then the search space) or raise SpecError."""
    from kdtune.space import parse_space  # space validation needs a validated spec to try values on

    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else type(raw).__name__
        raise SpecError("", f"the spec must be a YAML mapping of keys, not {got}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc.errors()[0]) from None
    parse_space(spec)
    return spec


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise SpecError(item, "--set takes key.path=value")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise SpecError(key, f"value is not valid YAML: {_yaml_problem(exc)}") from None
    parts = key.split(".")
    if parts[:2] == ["search", "space"] and len(parts) > 2:  # space keys are dotted paths themselves
        rest = parts[2:]
        parts = parts[:2] + (rest if rest[0] == "loss" else [".".join(rest)])
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        parts, value = _parse_override(item)
        node = raw
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent or null (e.g. `scheduler: null`): start a mapping
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise SpecError(".".join(parts[: i + 1]), "is not a mapping, so --set cannot go inside it")
        node[parts[-1]] = value
    return raw


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what kind, where, and the problem (safe_load refuses tags like !!python/...)."""
    kind = "YAML tag not allowed" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{kind}{where}: {problem}"


def load_spec(path: str | Path, overrides: list[str] = ()) -> Spec:
    """Read, override and validate a spec file; every failure is a SpecError naming the file."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError("", f"cannot read the spec file ({exc.strerror})", path) from None
    except UnicodeDecodeError as exc:
        raise SpecError("", f"the spec file is not UTF-8 text (byte {exc.start})", path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError("", _yaml_problem(exc), path) from None
    try:
        if isinstance(raw, dict):
            raw = apply_overrides(raw, list(overrides))
        return validate(raw)
    except SpecError as exc:
        exc.file = path
        raise


def spec_to_dict(spec: Spec) -> dict:
    return spec.model_dump(mode="json")


_DOTTED = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")


def field_at(dotted: str):
    """The pydantic field for a dotted spec path like 'train.lr', or None."""
    if not _DOTTED.match(dotted):
        return None
    model = Spec
    *parents, leaf = dotted.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model.model_fields.get(leaf)
