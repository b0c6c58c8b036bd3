"""The method registry: `@register("name")` on a `Method` subclass makes it a recipe's
`method.name`. Not a leaf: it imports `base` (and through it `config` and `data`), but never a
method module, so method modules import it and the package `edgedistill.methods` imports them,
without an import cycle."""

from __future__ import annotations

import difflib

from edgedistill.errors import UserError
from edgedistill.methods.base import Method

REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        REGISTRY[name] = cls
        return cls

    return deco


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=2)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
