"""Stage 3, select: every evaluation method is a registered Selector (base.py, registry.py), one file per family.

Importing this package imports each of its modules, so a new file with a ``@register``-decorated Selector subclass
is all a new method needs (README: "Adding a selector").
"""
import importlib
import pkgutil

from .base import EvalContext, Run, Selector
from .registry import SELECTORS, check_methods, get_selector, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EvalContext", "Run", "Selector", "SELECTORS", "check_methods", "get_selector", "register"]
