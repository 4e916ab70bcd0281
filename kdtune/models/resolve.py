"""Where a model comes from: a built-in name, `torchvision:<name>`, `timm:<name>`, an import
path `package.module:factory`, or an object given to `kdtune.run` (recorded as `python:<name>`).

Every form ends as one call, `factory(num_classes=N, **kwargs)` (plus `in_shape` and
`width` for factories that take them, `in_chans` for timm's), and every failure as a
`SpecError` at the key.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
from functools import lru_cache
from typing import Any, Callable, Optional

from torch import nn

from kdtune.errors import SpecError
from kdtune.models.base import MODELS
from kdtune.models.features import module_names, node_names, with_features
from kdtune.models.timm_models import TIMM, TimmFeatures, is_timm, timm_factory, timm_problem

TORCHVISION = "torchvision:"
IN_MEMORY = "python:"
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    from torchvision.models import list_models

    return tuple(list_models())


def arch_problem(arch: str) -> Optional[str]:
    """Why `arch` cannot name a model, judged from its form alone (no user module is imported)."""
    if arch.startswith(TORCHVISION):
        name = arch[len(TORCHVISION):]
        if name in torchvision_names():
            return None
        close = difflib.get_close_matches(name, torchvision_names(), n=5)
        return (f"unknown torchvision model {name!r}; "
                + (f"close names: {', '.join(close)}" if close else "see torchvision.models.list_models()"))
    if arch.startswith(TIMM):
        return timm_problem(arch[len(TIMM):])
    if arch.startswith(IN_MEMORY) or arch in MODELS:
        return None
    if ":" in arch:
        return None if IMPORT_PATH.match(arch) else f"{arch!r} is not an import path of the form package.module:factory"
    return (f"unknown arch {arch!r}; built-in: {', '.join(sorted(MODELS))}; "
            "or torchvision:<name>, timm:<name>, or an import path package.module:factory")


def import_object(path: str, where: str) -> Any:
    """The object at `package.module:attr`, imported from sys.path; a SpecError says why not."""
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise SpecError(where, f"cannot import module {module_name!r} ({type(exc).__name__}: {exc}); it must be "
                               "importable from sys.path (PYTHONPATH or the working directory)") from None
    found = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise SpecError(where, f"module {module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    return found


def accepts(fn: Callable, name: str, by_name_only: bool = False) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or not by_name_only and any(p.kind is p.VAR_KEYWORD for p in params.values())


def _factory(arch: str, where: str, given: Optional[Callable]) -> Callable[..., nn.Module]:
    problem = arch_problem(arch)
    if problem:
        raise SpecError(where, problem)
    if arch.startswith(TORCHVISION):
        from torchvision.models import get_model

        name = arch[len(TORCHVISION):]
        return lambda **kwargs: get_model(name, weights=None, **kwargs)
    if arch.startswith(TIMM):
        return timm_factory(arch[len(TIMM):])
    if arch.startswith(IN_MEMORY):
        if given is None:
            raise SpecError(where, f"{arch!r} names an object given to kdtune.run, and none was given")
        return given
    if arch in MODELS:
        return MODELS[arch]
    found = import_object(arch, where)
    if not callable(found):
        raise SpecError(where, f"{arch!r} is a {type(found).__name__}, not a model class or factory")
    return found


def build_model(spec, in_shape: tuple[int, ...], num_classes: int, where: str,
                width: Optional[int] = None, given: Optional[Callable] = None) -> nn.Module:
    """The model a teacher or student spec names (`given` for `python:`), returning `Features`."""
    factory = _factory(spec.arch, f"{where}.arch", given)
    kwargs = {"num_classes": num_classes, **spec.kwargs}
    if spec.arch in MODELS or accepts(factory, "in_shape", by_name_only=True):
        kwargs["in_shape"] = tuple(in_shape)
    if spec.arch.startswith(TIMM):
        kwargs.setdefault("in_chans", in_shape[0])
    if width is not None:
        if spec.arch.startswith((TORCHVISION, TIMM)) or not accepts(factory, "width"):
            raise SpecError(f"{where}.width", f"{spec.arch} takes no width argument; search one of its own "
                                              f"arguments instead, as {where}.kwargs.<name>")
        kwargs["width"] = width
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise SpecError(f"{where}.arch", f"{spec.arch}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                                         f"raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"{where}.arch", f"{spec.arch} returned a {type(model).__name__}, not a torch.nn.Module")
    return attach_features(model, spec.features, where)


def _listed(names: list[str], most: int = 40) -> str:
    return ", ".join(names[:most]) + (f" ... ({len(names)} in all)" if len(names) > most else "")


def attach_features(model: nn.Module, features, where: str) -> nn.Module:
    """`model` returning `Features`, with its embedding and maps at the spec's names: modules are
    read by hooks, other names as torch.fx graph nodes (a module's output there is its last
    node's, as `create_feature_extractor` reads it). A timm model that names none reads timm's
    own API. A name neither a module nor a node, or a model torch.fx cannot trace, is a SpecError
    at the key that says which modules to name instead."""
    if features is None:
        return TimmFeatures(model) if is_timm(model) else with_features(model)
    modules = module_names(model)
    named = [("embedding", features.embedding)] + [(f"maps[{i}]", m) for i, m in enumerate(features.maps)]
    others = [(key, name) for key, name in named if name is not None and name not in modules]
    if others:
        key, name = others[0]
        try:
            nodes = node_names(model)
        except Exception as exc:  # torch.fx raises whatever the model's forward does when traced
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            close = [m for m in modules if name.startswith(f"{m}.")][-1:]  # the module holding a parameter
            close += [m for m in difflib.get_close_matches(name, modules, n=5) if m not in close]
            raise SpecError(f"{where}.features.{key}",
                            f"{name!r} is not a module of {type(model).__name__}, and torch.fx cannot trace it to "
                            f"find a graph node of that name ({type(exc).__name__}: {reason}); name a module "
                            "instead, read by a forward hook: " + (f"close: {', '.join(close)}; " if close else "")
                            + f"its modules are {_listed(modules)}") from None
        for key, name in others:
            if name not in nodes and not any(n.startswith(f"{name}.") for n in nodes):
                close = difflib.get_close_matches(name, modules + nodes, n=5)
                raise SpecError(f"{where}.features.{key}",
                                f"no node {name!r} in {type(model).__name__}: neither a module nor a graph node; "
                                + (f"close: {', '.join(close)}; " if close else "")
                                + f"its modules: {_listed(modules)}; its nodes: {_listed(nodes)}")
    return with_features(model, features.embedding, features.maps)


def create_model(arch: str, in_shape: tuple[int, ...], num_classes: int, width: Optional[int] = None,
                 **kwargs) -> nn.Module:
    """A model by any arch form, returning `Features` (as timm's `create_model`, for scripts and tests)."""
    from types import SimpleNamespace

    return build_model(SimpleNamespace(arch=arch, kwargs=kwargs, features=None), in_shape, num_classes, "arch", width)
