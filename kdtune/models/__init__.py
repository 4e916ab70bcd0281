"""Built-in model families, one module each, registered on import.

Adding a family is adding a module here whose classes are `@register_model`ed; a model
that is not built in is named by `torchvision:<name>`, `timm:<name>` or `package.module:factory`
(kdtune.models.resolve). `python -m kdtune.models` lists every built-in with its size.
"""
import importlib
import pkgutil

from kdtune.models.base import MODELS, Features, count_params, register_model, structure
from kdtune.models.resolve import create_model

NOT_FAMILIES = {"base", "resolve", "features", "timm_models", "__main__"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in NOT_FAMILIES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MODELS", "Features", "count_params", "create_model", "register_model", "structure"]
