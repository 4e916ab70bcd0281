"""Distillation methods: one file each, registered on import.

Adding a method is adding a module here that defines a `@register`ed `Distiller`.
"""
import importlib
import pkgutil

from kdtune.distill.base import INPUTS, METHODS, TEACHER_TARGETS, Distiller, Param, attention, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["INPUTS", "METHODS", "TEACHER_TARGETS", "Distiller", "Param", "attention", "register"]
