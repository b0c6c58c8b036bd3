"""Training methods, one module each, behind the `Method` interface (see `base.py`)."""

from __future__ import annotations

import difflib

from edgedistill.errors import UserError
from edgedistill.methods.base import Method, MethodConfig, OptimizerGroup

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    # Import for their @register side effect; kept lazy so `config` can import this module.
    from edgedistill.methods import disco, dogo, mocov2, seed, simclr, supervised  # noqa: F401


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=2)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).Config


def create_method(cfg, num_classes: int) -> Method:
    return method_class(cfg.method.name)(cfg, num_classes)


__all__ = ["Method", "MethodConfig", "OptimizerGroup", "available", "create_method", "method_class", "register"]
