"""The selector registry: method name -> Selector class. ``evaluate.methods`` names entries of it.

Every module of shadowsparse/selectors/ is imported by the package (``__init__``), so a new selector is one file
there with a ``@register``-decorated class; nothing else has to list it.
"""
from __future__ import annotations

from ..errors import ConfigError
from .base import Selector

SELECTORS: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: adds a Selector subclass under its ``name``; a name taken twice is a programming error."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name: set the class attribute `name`")
    if cls.name in SELECTORS and SELECTORS[cls.name] is not cls:
        raise TypeError(f"selector name {cls.name!r} is registered twice ({SELECTORS[cls.name].__name__}, "
                        f"{cls.__name__})")
    SELECTORS[cls.name] = cls
    return cls


def check_methods(methods) -> None:
    unknown = sorted(set(methods) - set(SELECTORS))
    if unknown:
        raise ConfigError(f"unknown evaluation method(s) {unknown}; registered: {', '.join(sorted(SELECTORS))} "
                          "(evaluate.methods=[...])")


def get_selector(name: str) -> Selector:
    check_methods([name])
    return SELECTORS[name]()
