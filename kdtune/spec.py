"""The sweep spec's strict schema (kdtune.loading reads YAML into it).

Every mistake becomes a `SpecError` that names the key path and what is allowed, so
the CLI can exit 2 before Ray or MLflow start.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationInfo, field_validator,
                      model_validator)

from kdtune.data.base import DATASETS
from kdtune.errors import SpecError
from kdtune.models.resolve import IMPORT_PATH, IN_MEMORY, arch_problem

METRICS = ("val_acc", "val_loss", "params", "extra_params", "flops", "latency_ms", "model_mb")
ARCH_METRICS = ("params", "flops", "latency_ms", "model_mb")  # kdtune.measure: fixed by the architecture
EVALUATED = re.compile(r"^val_[A-Za-z0-9_]+$")  # val_<name> of a metric the `evaluate` function returns


class Strict(BaseModel):
    # each field's docstring is its description in the JSON Schema (kdtune/spec.schema.json) and the docs
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


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
    """Zero padding in pixels around each image before a random crop back to its size; 0: no crop."""
    flip: bool = False
    """Random horizontal flips."""


class DataSpec(Strict):
    dataset: str = "mnist"
    """A built-in dataset, or an import path `package.module:factory` returning `(train, test)` or DataLoaders."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to an import path's dataset factory."""
    root: str = "data"
    """Folder that holds (or receives) the dataset's files."""
    download: bool = False
    """Download a built-in dataset that is missing under `data.root`."""
    val_size: int = Field(5000, ge=1)
    """Images split off the training set for validation with the spec's seed (when no validation set is given)."""
    train_limit: Optional[int] = Field(None, ge=2)
    """Use only the first N training images (validation included)."""
    test_limit: Optional[int] = Field(None, ge=1)
    """Use only the first N test images."""
    num_classes: Optional[int] = Field(None, ge=2)
    """Number of classes, where the dataset does not say (streamed data without `classes` or `targets`)."""
    augment: Augment = Field(default_factory=Augment)
    """Random crops and flips of the students' training batches."""
    resident: Union[Literal["auto"], bool] = "auto"
    """auto: in memory when the training set fits `resident_mb` and reads the same twice, else streamed."""
    resident_mb: Optional[float] = Field(None, gt=0)
    """Largest float32 training set `resident: auto` holds, in MB; default a quarter of the machine's memory."""
    workers: int = Field(0, ge=0)
    """DataLoader worker processes of a streamed trial; 0 loads in the trial's process."""
    prefetch: int = Field(2, ge=1)
    """Batches each DataLoader worker loads ahead."""

    _dataset = field_validator("dataset")(check_dataset)

    @field_validator("resident", mode="before")
    @classmethod
    def _resident(cls, value):
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"must be auto, true or false (got {value!r})")


class Schedule(Strict):
    type: Literal["constant", "cosine", "step", "onecycle"] = "constant"
    """Learning-rate schedule over the epochs."""
    warmup_epochs: float = Field(0, ge=0)
    """Epochs of linear warm-up (onecycle: epochs to the peak)."""
    milestones: list[int] = Field(default_factory=list)
    """`step`: epochs at which the learning rate is multiplied by `gamma`."""
    gamma: float = Field(0.1, gt=0)
    """`step`: the factor applied at each milestone."""


class FeatureNodes(Strict):
    """Where a model that is not built in gives its features: module paths (read by forward hooks)
    or torch.fx graph nodes (torchvision.models.feature_extraction names)."""

    embedding: Optional[str] = None
    """Node whose output is the penultimate embedding (FitNet, RKD, CRD and SRRL read it)."""
    maps: list[str] = Field(default_factory=list)
    """Nodes whose outputs are the stage feature maps (AT reads the last two)."""


class ModelSpec(Strict):
    arch: str
    """A built-in name, `torchvision:<name>` or an import path `package.module:factory`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the model's factory; `student.kwargs.<name>` can be searched."""
    features: Optional[FeatureNodes] = None
    """Modules (forward hooks) or graph nodes (torch.fx) to read features from, for models neither built in nor timm."""

    _arch = field_validator("arch")(check_arch)


class TeacherSpec(ModelSpec):
    """The teacher, and the recipe kdtune trains it with when no checkpoint is given."""

    arch: str = "mnist_cnn"
    """A built-in name, `torchvision:<name>` or an import path `package.module:factory`."""
    checkpoint: Optional[str] = None
    """A state_dict (or saved module) to load; without it kdtune trains the teacher once and caches it."""
    epochs: int = Field(3, ge=1)
    """Epochs of the teacher's training."""
    lr: float = Field(1.0, gt=0)
    """The teacher's learning rate."""
    batch_size: int = Field(64, ge=1)
    """The teacher's batch size."""
    optimizer: Literal["adam", "adamw", "sgd", "adadelta"] = "adadelta"
    """The teacher's optimizer."""
    momentum: float = Field(0.9, ge=0, le=1)
    """SGD momentum of the teacher's optimizer."""
    weight_decay: float = Field(0.0, ge=0)
    """The teacher's weight decay."""
    schedule: Schedule = Field(default_factory=lambda: Schedule(type="step", gamma=0.7, milestones=[1, 2, 3, 4, 5]))
    """The teacher's learning-rate schedule (default: step, gamma 0.7 at epochs 1 to 5)."""
    augment: Augment = Field(default_factory=Augment)
    """Random crops and flips of the teacher's training batches."""
    cache_dir: Optional[str] = None
    """Where trained teachers are cached; default `KDTUNE_CACHE` or `~/.cache/kdtune`."""
    feature_cache_mb: float = Field(1024, ge=0)
    """Memory for the teacher's cached feature maps, in MB; maps that do not fit are computed live."""
    cache: Literal["auto", "outputs", "augmentations", "live"] = "auto"
    """How trials get the teacher's targets: once per image, once per augmented view, live on every batch, or auto."""
    cache_mb: float = Field(4096, ge=0)
    """Budget for cached teacher targets, in MB; targets that do not fit run live."""
    topk: Optional[int] = Field(None, ge=1)
    """Streamed data: keep each image's k largest logits on disk (and the mean of the rest)."""


class AssistantSpec(TeacherSpec):
    """A named teacher block; with `distil_from`, an assistant (TAKD): trained once per sweep by KD
    from that named teacher at `temperature` and `alpha`, then cached like any teacher."""

    distil_from: Optional[str] = None
    """The named teacher this assistant is distilled from (once per sweep, then cached)."""
    temperature: float = Field(4.0, gt=0)
    """The assistant's KD temperature."""
    alpha: float = Field(0.9, ge=0, le=1)
    """The weight of the assistant's KD term against its cross-entropy."""


class EnsembleSpec(Strict):
    """A teacher whose targets are the weighted mean of its members' probabilities at the
    method's temperature (weights equal by default)."""

    ensemble: list[str]
    """The member teachers' names."""
    weights: Optional[list[float]] = None
    """One weight per member (equal by default)."""

    @field_validator("ensemble")
    @classmethod
    def _members(cls, value):
        if not value:
            raise ValueError("an ensemble needs at least one member (names of teachers in `teachers`)")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value, info: ValidationInfo):
        if value is None:
            return value
        members = info.data.get("ensemble") or []
        if len(value) != len(members):
            raise ValueError(f"needs one weight per member: {len(members)} (got {len(value)})")
        if any(w <= 0 for w in value):
            raise ValueError(f"weights must be positive (got {value})")
        return value


# The tags of a `teachers:` entry's two forms; kdtune.loading drops them from error key paths.
TEACHER_ENTRIES = {"<ensemble>": EnsembleSpec, "<teacher>": AssistantSpec}


def _entry_form(value) -> str:
    ensemble = "ensemble" in value if isinstance(value, dict) else isinstance(value, EnsembleSpec)
    return "<ensemble>" if ensemble else "<teacher>"


TeacherEntry = Annotated[Union[Annotated[EnsembleSpec, Tag("<ensemble>")], Annotated[AssistantSpec, Tag("<teacher>")]],
                         Discriminator(_entry_form)]


class StudentSpec(ModelSpec):
    arch: str = "mlp"
    """A built-in name, `torchvision:<name>` or an import path `package.module:factory`."""
    width: Optional[int] = Field(None, ge=1)
    """The family's base width; each family has its own default."""


class TrainSpec(Strict):
    epochs: int = Field(5, ge=1)
    """Epochs of each trial."""
    batch_size: int = Field(128, ge=1)
    """Batch size of each trial (per worker and micro-batch)."""
    optimizer: Literal["adam", "adamw", "sgd", "adadelta"] = "adam"
    """The students' optimizer."""
    lr: float = Field(0.001, gt=0)
    """The students' learning rate."""
    momentum: float = Field(0.9, ge=0, le=1)
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay."""
    schedule: Schedule = Field(default_factory=Schedule)
    """Learning-rate schedule of each trial."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy term."""
    ce_weight: float = Field(1.0, ge=0)
    """Weight of the cross-entropy term beside the method's terms."""
    checkpoint_every: int = Field(2, ge=1)
    """Epochs between a trial's checkpoints."""
    mixed_precision: bool = True
    """bf16 autocast of forward passes and losses on CUDA; CPUs train in fp32."""
    accumulate: int = Field(1, ge=1)
    """Micro-batches of `batch_size` per optimizer step (gradient accumulation)."""


class Objective(Strict):
    metric: str
    """`val_acc`, `val_loss`, `params`, `extra_params`, or `val_<name>` of a metric the `evaluate` function returns."""
    mode: Literal["max", "min"]
    """Whether to maximise or minimise the metric."""

    _metric = field_validator("metric")(check_metric)


class Constraint(Strict):
    """A bound on a figure the architecture fixes (kdtune.measure), given to Optuna's sampler."""

    metric: str
    """A figure the architecture fixes: params, flops, latency_ms or model_mb."""
    max: Optional[float] = None
    """The largest allowed value."""
    min: Optional[float] = None
    """The smallest allowed value."""

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
    """The early-stopping scheduler."""
    grace_period: int = Field(1, ge=1)
    """Epochs a trial runs before it can be stopped."""
    reduction_factor: float = Field(3, gt=1)
    """ASHA's reduction factor: 1/factor of the trials go on at each rung."""


class SearchSpec(Strict):
    space: dict[str, Any] = Field(default_factory=dict)
    """Dotted keys (`train.lr`, `width`, `loss`, ...) to a value or `{choice|uniform|loguniform|int: ...}`."""
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="val_acc", mode="max"), Objective(metric="params", mode="min")],
        min_length=1)
    """`{metric, mode}` pairs; the first validation metric chooses the trials that confirmation reruns."""
    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    """Optuna's sampler."""
    num_samples: int = Field(24, ge=1)
    """Trials the sampler proposes (baselines come on top)."""
    max_concurrent: int = Field(2, ge=1)
    """Most trials run at once."""
    baselines: bool = True
    """Run `loss: none` at every width (and arch) choice first, for the KD-gain table."""
    scheduler: Optional[SchedulerSpec] = None
    """Stop weak trials early (`{type: asha}`)."""
    max_failures: int = Field(0, ge=0)
    """Retries of a trial that raises."""
    confirm_seeds: int = Field(3, ge=0)
    """Fresh seeds to retrain each front size's best distilled and baseline configuration with; 0: none."""
    optuna_storage: Optional[str] = None
    """The Optuna study's RDB URL; default sqlite in `results/<name>/optuna.db`."""
    constraints: list[Constraint] = Field(default_factory=list)
    """Bounds on measured figures (params, flops, latency_ms, model_mb), given to the sampler's `constraints_func`."""

    @field_validator("constraints")
    @classmethod
    def _constrained_sampler(cls, value, info):
        if value and info.data.get("sampler") == "random":
            raise ValueError("the random sampler takes no constraints; use tpe, nsga2 or gp")
        return value


class DeploySpec(Strict):
    """Where and how latency_ms is measured (kdtune.measure): batch size, device, intra-op threads, time."""

    batch_size: int = Field(1, ge=1)
    """Images in the timed forward."""
    device: Literal["cpu", "cuda"] = "cpu"
    """The device the students are timed on."""
    threads: int = Field(1, ge=1)
    """Intra-op threads of the timed forward (torch.set_num_threads)."""
    timing_seconds: float = Field(10, gt=0)
    """How long latency is sampled, round-robin over the architectures measured together; the
    quietest block counts (kdtune.measure). Long enough to outlast a shared CPU's slow episodes."""


class Resources(Strict):
    """Per worker; a trial is `workers` data-parallel workers (Ray Train), 1: a single process."""

    cpu: float = Field(1, gt=0)
    """CPUs per worker."""
    gpu: float = Field(0, ge=0)
    """GPUs per worker; a fraction shares a GPU between trials."""
    workers: int = Field(1, ge=1)
    """Data-parallel workers per trial (Ray Train); 1: a single process."""


class RaySpec(Strict):
    address: Optional[str] = None
    """Ray cluster to join (`HOST:PORT` or `auto`, as `--address`); default a private local Ray."""
    storage_path: Optional[str] = None
    """Where Ray keeps trial state and checkpoints: a shared path or an `s3://` or `gs://` URI (as `--storage`)."""


class MlflowSpec(Strict):
    tracking_uri: Optional[str] = None
    """MLflow tracking URI (as `--tracking-uri`); default `sqlite:///mlflow.db`."""


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The sweep's name: its MLflow experiment and its folder under the results directory."""
    seed: int = 0
    """Fixes the validation split, data order, initialisation and the sampler."""
    data: DataSpec = Field(default_factory=DataSpec)
    """The dataset and how it is read."""
    teacher: Optional[TeacherSpec] = None
    """The one teacher, and its training recipe when no checkpoint is given; with `teachers` it may be left out."""
    teachers: dict[str, TeacherEntry] = Field(default_factory=dict)
    """Named teachers: teacher blocks, assistants (`distil_from`) and ensembles; `search.space.teacher` picks one."""
    student: StudentSpec = Field(default_factory=StudentSpec)
    """The student family."""
    train: TrainSpec = Field(default_factory=TrainSpec)
    """Each trial's training recipe."""
    search: SearchSpec = Field(default_factory=SearchSpec)
    """The search space, objectives and sampler."""
    resources: Resources = Field(default_factory=Resources)
    """Resources of each trial, per worker."""
    ray: RaySpec = Field(default_factory=RaySpec)
    """Where Ray runs."""
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    """Where MLflow is."""
    deploy: DeploySpec = Field(default_factory=DeploySpec)
    """How students are measured for deployment: latency's batch size, device and threads."""
    evaluate: Optional[str] = None
    """The project's own evaluation: `package.module:function(model, data_loader) -> {name: number}`."""

    _evaluate = field_validator("evaluate")(check_evaluate)
    smoke: Optional[dict[str, Any]] = None
    """What `--smoke` sets besides kdtune's own shrinking, in the spec's layout (e.g. `{train: {epochs: 3}}`)."""

    # whether the spec itself gives a teacher (`teacher:` or `teachers:`), before the default fills one in
    _teacher_given: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _one_teacher_by_default(self):
        self._teacher_given = self.teacher is not None or bool(self.teachers)
        if not self._teacher_given:
            self.teacher = TeacherSpec()
        return self

    @property
    def teacher_given(self) -> bool:
        return self._teacher_given


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


def named_teachers(spec: Spec) -> dict[str, Union[TeacherSpec, EnsembleSpec]]:
    """Every teacher a trial may distil from, by name: `teacher:` as `teacher`, then `teachers:`."""
    return {**({"teacher": spec.teacher} if spec.teacher is not None else {}), **spec.teachers}


def trained_teachers(spec: Spec) -> dict[str, TeacherSpec]:
    """The teacher blocks with a recipe, by their spec path (`teacher`, `teachers.<name>`)."""
    blocks = {"teacher": spec.teacher} if spec.teacher is not None else {}
    return {**blocks, **{f"teachers.{n}": t for n, t in spec.teachers.items() if not isinstance(t, EnsembleSpec)}}


def default_teacher(spec: Spec) -> str:
    """The teacher of a trial whose space chooses none: `teacher:`, else the first named one."""
    return next(iter(named_teachers(spec)))


def check_teachers(spec: Spec) -> None:
    """The names `teachers:` entries refer to exist, and assistants' chains end (SpecError)."""
    named = named_teachers(spec)
    if spec.teacher is not None and "teacher" in spec.teachers:
        raise SpecError("teachers.teacher", "the name `teacher` is the top-level teacher block's; rename this one")
    plain = [n for n, t in named.items() if not isinstance(t, EnsembleSpec)]
    for name, entry in spec.teachers.items():
        if isinstance(entry, EnsembleSpec):
            for i, member in enumerate(entry.ensemble):
                if member not in plain:
                    raise SpecError(f"teachers.{name}.ensemble.{i}", f"unknown member {member!r}; an ensemble's "
                                                                      f"members are teachers or assistants: {', '.join(plain)}")
        elif entry.distil_from is not None:
            if entry.distil_from not in plain:
                raise SpecError(f"teachers.{name}.distil_from",
                                f"unknown teacher {entry.distil_from!r}; one of {', '.join(n for n in plain if n != name)}")
            chain, at = [name], entry.distil_from
            while at is not None:
                if at in chain:
                    raise SpecError(f"teachers.{name}.distil_from", f"cyclic: {' -> '.join(chain + [at])}")
                chain.append(at)
                at = getattr(named[at], "distil_from", None)
