"""Loading a spec: a YAML file (read with `yaml.safe_load`), a mapping or a Spec, with
`--set`-style overrides, validated by the schema and then by the search space."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from kdtune.errors import SpecError
from kdtune.space import parse_space
from kdtune.spec import TEACHER_ENTRIES, Spec, spec_to_dict, trained_teachers

# `--smoke`: the same sweep (its families, methods, search and confirmation) shrunk for a short
# run on a few CPU cores, one per trial (streamed data read in the trial's own process), so a
# GPU-cluster spec is checked on a laptop. The shrunk recipes still train: a teacher clearly
# ahead, students far above chance (docs/getting-started.md).
SMOKE_FIXED = {"data.val_size": 1000, "data.test_limit": 1000, "search.scheduler": None,
               "resources.cpu": 1, "resources.gpu": 0, "data.workers": 0}
SMOKE_TRAIN_LIMIT, SMOKE_BATCH_SIZE, SMOKE_SAMPLES, SMOKE_SEEDS = 12000, 128, 4, 2
SMOKE_TIMING_S = 1.0  # latency sampled for 1 s: a first run's figures, not a benchmark's
SMOKE_EPOCHS = {"teacher": 3, "train": 2}  # the teacher gets more: it must end ahead of the students


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the key at `loc`, to list its allowed keys (a `teachers:`
    entry's form tag names its class)."""
    model, tags = Spec, [i for i, part in enumerate(loc) if part in TEACHER_ENTRIES]
    if tags:
        model, loc = TEACHER_ENTRIES[loc[tags[-1]]], loc[tags[-1] + 1:]
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
    path = ".".join(str(p) for p in loc if p not in TEACHER_ENTRIES)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = ", ".join(owner.model_fields) if owner else "none"
        return SpecError(path, f"unknown key; allowed keys here: {allowed}")
    if error["type"] == "missing":
        return SpecError(path, "required key is missing")
    if error["msg"].startswith("Value error, "):  # our own validators (check_arch, ...) already quote the value
        return SpecError(path, error["msg"].removeprefix("Value error, "))
    return SpecError(path, f"{error['msg']} (got {error.get('input')!r})")


def validate(raw: Any) -> Spec:
    """Validate a spec mapping (schema, then the search space) or raise SpecError."""
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


def _read(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError("", f"cannot read the spec file ({exc.strerror})", path) from None
    except UnicodeDecodeError as exc:
        raise SpecError("", f"the spec file is not UTF-8 text (byte {exc.start})", path) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError("", _yaml_problem(exc), path) from None


def smoke_overrides(spec: Spec) -> dict[str, Any]:
    """What `--smoke` sets, from the spec's own values: a data slice, at most SMOKE_EPOCHS epochs
    of batches of at most SMOKE_BATCH_SIZE (warm-up and milestones scaled with the epochs), 4
    samples and 2 confirmation seeds, on one CPU, latency sampled for at most SMOKE_TIMING_S."""
    out = {**SMOKE_FIXED, "data.train_limit": min(spec.data.train_limit or SMOKE_TRAIN_LIMIT, SMOKE_TRAIN_LIMIT),
           "search.num_samples": min(spec.search.num_samples, SMOKE_SAMPLES),
           "search.confirm_seeds": min(spec.search.confirm_seeds, SMOKE_SEEDS),
           "deploy.timing_seconds": min(spec.deploy.timing_seconds, SMOKE_TIMING_S)}
    recipes = {"train": (spec.train, SMOKE_EPOCHS["train"]),
               **{section: (block, SMOKE_EPOCHS["teacher"]) for section, block in trained_teachers(spec).items()
                  if section != "teacher" or spec.teacher_given}}  # the default teacher stays a default
    for section, (recipe, most) in recipes.items():
        epochs = min(recipe.epochs, most)
        scale = epochs / recipe.epochs
        schedule = recipe.schedule.model_dump()
        schedule.update(warmup_epochs=schedule["warmup_epochs"] * scale,
                        milestones=sorted({max(1, round(m * scale)) for m in schedule["milestones"]}))
        out.update({f"{section}.epochs": epochs, f"{section}.batch_size": min(recipe.batch_size, SMOKE_BATCH_SIZE),
                    f"{section}.schedule": schedule})
    return out


def _as_sets(overrides: Mapping[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def _merged(raw: dict, block: dict) -> dict:
    """`raw` with the nested mapping `block` written over it, key by key."""
    out = copy.deepcopy(raw)
    for key, value in block.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _within(path: str, block: dict) -> bool:
    """Whether the key path `path` (a.b.c) leads into `block`."""
    node = block
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_smoke_block(raw: dict, spec: Spec) -> None:
    """The spec's `smoke:` block (what --smoke sets besides kdtune's own shrinking, in the spec's
    own layout) must make a valid spec too: its mistakes name `smoke.<key path>`."""
    if not spec.smoke:
        return
    if "smoke" in spec.smoke:
        raise SpecError("smoke.smoke", "a smoke block cannot hold another one")
    try:
        validate(_merged({k: v for k, v in raw.items() if k != "smoke"}, spec.smoke))
    except SpecError as exc:
        if _within(exc.path, spec.smoke):
            exc.path = f"smoke.{exc.path}"
        raise


def load_spec(source: str | Path | dict | Spec, overrides: Iterable[str] | Mapping[str, Any] = (),
              smoke: bool = False) -> Spec:
    """A validated Spec from a YAML file, a mapping or a Spec, with overrides applied.

    `overrides` are `key.path=value` strings (as `--set` takes them) or a mapping of key paths
    to values; they win over `smoke`, which shrinks the sweep for a short CPU run
    (smoke_overrides, then the spec's own `smoke:` block). Every failure is a SpecError naming
    the key (and the file).
    """
    overrides = _as_sets(overrides) if isinstance(overrides, Mapping) else list(overrides)
    path = str(source) if isinstance(source, (str, Path)) else None
    raw = _read(path) if path else spec_to_dict(source) if isinstance(source, Spec) else source
    try:
        if isinstance(raw, dict):
            raw = apply_overrides(raw, overrides)
        spec = validate(raw)
        check_smoke_block(raw, spec)
        if smoke:
            shrunk = _merged(apply_overrides(raw, _as_sets(smoke_overrides(spec))), spec.smoke or {})
            spec = validate(apply_overrides(shrunk, overrides))
    except SpecError as exc:
        exc.file = path
        raise
    return spec
