"""Any `nn.Module` as a model that returns `Features`.

Built-in models return `Features` themselves. Other models (torchvision's, a user's) return
logits; their embedding and stage maps are read where the spec names them: at a module by a
forward hook on the normal forward (no tracing, so any model works), at a graph node that is
not a module (`flatten`, an `add`) through torchvision's `create_feature_extractor`. timm
models name nothing: their features come from timm's own API (kdtune.models.timm_models).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from kdtune.models.base import Features, count_params


class LogitsModel(nn.Module):
    """A model whose output is its logits (or already `Features`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x) -> Features:
        out = self.model(x)
        return out if isinstance(out, Features) else Features(out)

    def own_parameters(self) -> int:
        return count_params(self.model)


@contextmanager
def module_outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of `model`'s modules `names` (their last call) on the forwards run inside the
    block, by hooks that live only as long as the block: a copied, compiled, DDP-wrapped or
    traced model never carries one."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            seen[name] = output
        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in dict.fromkeys(names)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _tensor(seen: dict, name: str) -> torch.Tensor:
    if name not in seen:
        raise RuntimeError(f"module {name!r} did not run in forward; name a module that does")
    if not isinstance(seen[name], torch.Tensor):
        raise RuntimeError(f"module {name!r} returned a {type(seen[name]).__name__}, not a tensor; "
                           "name a module that returns one")
    return seen[name]


class HookFeatures(nn.Module):
    """Logits from the model's own forward; embedding and maps from the named modules' outputs."""

    def __init__(self, model: nn.Module, embedding: str | None, maps: list[str]):
        super().__init__()
        self.model, self.embedding, self.maps = model, embedding, list(maps)

    def forward(self, x) -> Features:
        with module_outputs(self.model, ([self.embedding] if self.embedding else []) + self.maps) as seen:
            out = self.model(x)
        logits = out.logits if isinstance(out, Features) else out
        embedding = _tensor(seen, self.embedding).flatten(1) if self.embedding else None
        return Features(logits, embedding, [_tensor(seen, name) for name in self.maps])

    def own_parameters(self) -> int:
        return count_params(self.model)


class NodeFeatures(nn.Module):
    """Logits from the model's output node; embedding and maps from named nodes."""

    def __init__(self, model: nn.Module, embedding: str | None, maps: list[str]):
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        super().__init__()
        train_nodes, eval_nodes = get_graph_node_names(model)
        wanted = ([embedding] if embedding else []) + list(maps)
        nodes = {name: name for name in wanted}
        self.embedding, self.maps = embedding, list(maps)
        self.graph = create_feature_extractor(
            model, train_return_nodes={**nodes, train_nodes[-1]: "logits"},
            eval_return_nodes={**nodes, eval_nodes[-1]: "logits"})
        object.__setattr__(self, "original", model)  # shares its parameters; not a second submodule

    def forward(self, x) -> Features:
        out = self.graph(x)
        embedding = out[self.embedding].flatten(1) if self.embedding else None
        return Features(out["logits"], embedding, [out[name] for name in self.maps])

    def own_parameters(self) -> int:
        return count_params(self.original)


def node_names(model: nn.Module) -> list[str]:
    """The model's graph node names (eval mode), as `features` may name them; torch.fx's error
    for a model it cannot trace."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model)[1]


def module_names(model: nn.Module) -> list[str]:
    """The model's module paths (`layer3`, `net.2`), as `features` may name them."""
    return [name for name, _ in model.named_modules() if name]


def student_params(model: nn.Module) -> int:
    """The deployable model's own parameters: what the Pareto front counts."""
    own = getattr(model, "own_parameters", None)
    return own() if own else count_params(model)


def is_builtin(model: nn.Module) -> bool:
    """A model of one of kdtune's own families, which returns `Features` itself."""
    return type(model).__module__.startswith("kdtune.models.")


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's own module inside a wrapper (the deployable student, the teacher's head)."""
    return getattr(model, "original", None) or getattr(model, "model", None) or model


def with_features(model: nn.Module, embedding: str | None = None, maps: list[str] = ()) -> nn.Module:
    """`model` returning `Features`: as is for built-ins; else wrapped, reading the named features
    by hooks when all are modules, else by torch.fx (which reads module names too)."""
    named = ([embedding] if embedding else []) + list(maps)
    if named:
        modules = set(module_names(model))
        wrapper = HookFeatures if all(name in modules for name in named) else NodeFeatures
        return wrapper(model, embedding, list(maps))
    if is_builtin(model):
        return model
    return LogitsModel(model)


HEAD_NAMES = ("classifier", "fc", "head")  # built-ins' `classifier` property; torchvision's names


@torch.no_grad()
def classifier_head(model: nn.Module, features: Features) -> Optional[nn.Module]:
    """A frozen copy of the module that maps `model`'s embedding to its logits, or None.

    `features` is the model's output on a probe batch, in eval mode. Candidates are a module named
    `classifier`, `fc` or `head`, then the last Linear; the first that gives back the logits from
    the embedding is the head. Checking the output, rather than trusting a name, rejects a head
    that reads another node (a VGG's classifier takes the flattened map, not a pooled embedding).
    """
    if features.embedding is None:
        return None
    inner = unwrapped(model)
    linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
    for candidate in [getattr(inner, name, None) for name in HEAD_NAMES] + linears[-1:]:
        if not isinstance(candidate, nn.Module):
            continue
        try:
            out = candidate(features.embedding)
        except Exception:  # another input width: not this model's head
            continue
        if isinstance(out, torch.Tensor) and out.shape == features.logits.shape \
                and torch.allclose(out, features.logits, rtol=1e-4, atol=1e-5):
            return copy.deepcopy(candidate).eval().requires_grad_(False)
    return None
