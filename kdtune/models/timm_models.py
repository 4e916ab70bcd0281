"""timm's models by name: `arch: timm:<name>`, built with `timm.create_model(name,
pretrained=False, num_classes=N, in_chans=C, **kwargs)`.

A timm model already says where its features are, so a spec names none: the embedding is
`forward_head(pre_logits=True)`, the stage maps are the outputs of the last two modules its
`feature_info` lists (read by hooks on the normal forward). timm is an optional extra; without
it a `timm:` arch is a SpecError that says how to install it.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Optional

from torch import nn

from kdtune.models.base import Features, count_params
from kdtune.models.features import module_outputs

TIMM = "timm:"
INSTALL = 'timm is not installed; install the extra: pip install -e ".[timm]" (or pip install timm)'
MAP_STAGES = 2  # stage maps, as the built-ins give for attention transfer


def installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_problem(name: str) -> Optional[str]:
    """Why `timm:<name>` names no model (timm missing, or no such name), else None."""
    if not installed():
        return INSTALL
    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=5)
    return (f"unknown timm model {name!r}; "
            + (f"close names: {', '.join(close)}" if close else "see python -m kdtune.models '<pattern>'"))


def timm_factory(name: str) -> Callable[..., nn.Module]:
    """timm's model `name`, randomly initialised (a trained teacher comes from teacher.checkpoint)."""
    import timm

    return lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs)


def names(pattern: str = "*") -> list[str]:
    """timm's model names matching the shell-style `pattern` (as `timm.list_models`); none without timm."""
    if not installed():
        return []
    import timm

    return [name for name in timm.list_models() if fnmatch.fnmatch(name, pattern)]


def is_timm(model: nn.Module) -> bool:
    """A timm model with the API kdtune reads its features through."""
    return type(model).__module__.startswith("timm.") and all(
        hasattr(model, attr) for attr in ("forward_features", "forward_head"))


def stage_modules(model: nn.Module) -> list[str]:
    """The modules whose outputs are the model's last MAP_STAGES stages, by its `feature_info`."""
    info = getattr(model, "feature_info", None) or []
    return [stage["module"] for stage in info[-MAP_STAGES:]] if len(info) >= MAP_STAGES else []


class TimmFeatures(nn.Module):
    """Logits, embedding and stage maps of a timm model, through timm's own API."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.maps = model, stage_modules(model)

    def forward(self, x) -> Features:
        with module_outputs(self.model, self.maps) as seen:
            body = self.model.forward_features(x)
        embedding = self.model.forward_head(body, pre_logits=True)
        return Features(self.model.forward_head(body), embedding.flatten(1), [seen[name] for name in self.maps])

    def own_parameters(self) -> int:
        return count_params(self.model)
