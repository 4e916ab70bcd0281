"""The sweep spec's strict schema (kdtune.loading reads YAML into it).

Every mistake becomes a `SpecError` that names the key path and what is allowed, so
the CLI can exit 2 before Ray or MLflow start.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdtune.data.base import DATASETS
from kdtune.models.resolve import IMPORT_PATH, IN_MEMORY, arch_problem

METRICS = ("val_acc", "val_loss", "params", "extra_params", "flops", "latency_ms", "model_mb")
ARCH_METRICS = ("params", "flops", "latency_ms", "model_mb")  # kdtune.measure: fixed by the architecture
EVALUATED = re.compile(r"^val_[A-Za-z0-9_]+$")  # val_<name> of a metric the `evaluate` function returns


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def check_arch(value: str) -> str:
    problem = arch_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def check_metric(value: str) -> str:
    if value in METRICS or EVALUATED.match(value):
        return value
    listed = ", ".join(repr(m) for m in METRICS[:-1]) + f" or {METRICS[-1]!r}"
    raise ValueError(f"unknown objective metric {value!r}; one of {listed}, or val_<name> of a metric the top-level "
                     "`evaluate` function returns (never a test metric: choosing on it would leak the test set)")


def check_evaluate(value: Optional[str]) -> Optional[str]:
    if value is None or value.startswith(IN_MEMORY) or IMPORT_PATH.match(value):
        return value
    raise ValueError(f"{value!r} is not an import path of the form package.module:function")


def check_dataset(value: str) -> str:
    if value in DATASETS or value.startswith(IN_MEMORY) or IMPORT_PATH.match(value):
        return value
    raise ValueError(f"unknown dataset {value!r}; built-in: {', '.join(sorted(DATASETS))}; "
                     "or an import path package.module:factory returning (train, test) datasets")


class Augment(Strict):
    """Random crop with zero padding `crop` and horizontal flips, drawn on the trial's device."""

    crop: int = Field(0, ge=0)
    flip: bool = False


class DataSpec(Strict):
    dataset: str = "mnist"  # a built-in name or an import path `package.module:factory`
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to an import path's factory
    root: str = "data"
    download: bool = False
    val_size: int = Field(5000, ge=1)
    train_limit: Optional[int] = Field(None, ge=2)
    test_limit: Optional[int] = Field(None, ge=1)
    num_classes: Optional[int] = Field(None, ge=2)
    augment: Augment = Field(default_factory=Augment)
    # auto: resident tensors when the training set fits resident_mb and reads the same twice, else streamed
    resident: Union[Literal["auto"], bool] = "auto"
    resident_mb: Optional[float] = Field(None, gt=0)  # default: a quarter of the machine's memory
    workers: int = Field(0, ge=0)  # DataLoader worker processes of a streamed trial
    prefetch: int = Field(2, ge=1)  # batches each worker loads ahead

    _dataset = field_validator("dataset")(check_dataset)

    @field_validator("resident", mode="before")
    @classmethod
    def _resident(cls, value):
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"must be auto, true or false (got {value!r})")


class Schedule(Strict):
    type: Literal["constant", "cosine", "step", "onecycle"] = "constant"
    warmup_epochs: float = Field(0, ge=0)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)


class FeatureNodes(Strict):
    """Graph nodes (torchvision.models.feature_extraction names) of a model that is not built in."""

    embedding: Optional[str] = None
    maps: list[str] = Field(default_factory=list)


class ModelSpec(Strict):
    arch: str  # a built-in name, `torchvision:<name>` or an import path `package.module:factory`
    kwargs: dict[str, Any] = Field(default_factory=dict)
    features: Optional[FeatureNodes] = None

    _arch = field_validator("arch")(check_arch)


class TeacherSpec(ModelSpec):
    """The teacher, and the recipe kdtune trains it with when no checkpoint is given."""

    arch: str = "mnist_cnn"
    checkpoint: Optional[str] = None
    epochs: int = Field(3, ge=1)
    lr: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "adamw", "sgd", "adadelta"] = "adadelta"
    momentum: float = Field(0.9, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Field(default_factory=lambda: Schedule(type="step", gamma=0.7, milestones=[1, 2, 3, 4, 5]))
    augment: Augment = Field(default_factory=Augment)
    cache_dir: Optional[str] = None
    feature_cache_mb: float = Field(1024, ge=0)
    cache: Literal["auto", "outputs", "augmentations", "live"] = "auto"
    cache_mb: float = Field(4096, ge=0)
    topk: Optional[int] = Field(None, ge=1)  # streamed data: keep each image's k largest logits on disk


class StudentSpec(ModelSpec):
    arch: str = "mlp"
    width: Optional[int] = Field(None, ge=1)  # each family has its own default


class TrainSpec(Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adam", "adamw", "sgd", "adadelta"] = "adam"
    lr: float = Field(0.001, gt=0)
    momentum: float = Field(0.9, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Field(default_factory=Schedule)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ce_weight: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(2, ge=1)
    mixed_precision: bool = True  # bf16 autocast of forward and losses on CUDA; CPUs train in fp32
    accumulate: int = Field(1, ge=1)  # micro-batches of batch_size per optimizer step (gradient accumulation)


class Objective(Strict):
    metric: str
    mode: Literal["max", "min"]

    _metric = field_validator("metric")(check_metric)


class Constraint(Strict):
    """A bound on a figure the architecture fixes (kdtune.measure), given to Optuna's sampler."""

    metric: str
    max: Optional[float] = None
    min: Optional[float] = None

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in ARCH_METRICS:
            raise ValueError(f"unknown constraint metric {value!r}; one of {', '.join(map(repr, ARCH_METRICS))}")
        return value

    @model_validator(mode="after")
    def _bounds(self):
        if self.max is None and self.min is None:
            raise ValueError("a constraint needs max, min or both")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


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
    optuna_storage: Optional[str] = None  # the study's RDB URL; default sqlite:///<results>/<name>/optuna.db
    constraints: list[Constraint] = Field(default_factory=list)  # Optuna's constraints_func; tpe, nsga2, gp

    @field_validator("constraints")
    @classmethod
    def _constrained_sampler(cls, value, info):
        if value and info.data.get("sampler") == "random":
            raise ValueError("the random sampler takes no constraints; use tpe, nsga2 or gp")
        return value


class DeploySpec(Strict):
    """Where latency_ms is measured (kdtune.measure): batch size, device and intra-op threads."""

    batch_size: int = Field(1, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1)


class Resources(Strict):
    """Per worker; a trial is `workers` data-parallel workers (Ray Train), 1: a single process."""

    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)
    workers: int = Field(1, ge=1)


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
    deploy: DeploySpec = Field(default_factory=DeploySpec)
    evaluate: Optional[str] = None  # `package.module:function(model, data_loader) -> {name: number}`

    _evaluate = field_validator("evaluate")(check_evaluate)
    # what --smoke sets besides kdtune's own shrinking, in this layout (e.g. {train: {epochs: 3}})
    smoke: Optional[dict[str, Any]] = None


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
