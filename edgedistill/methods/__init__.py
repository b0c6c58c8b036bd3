"""Training methods, one module each, behind the `Method` interface (see `base.py`), registered
by name in `registry.py`. Importing this package registers them all."""

from __future__ import annotations

from edgedistill.methods import disco, dogo, mocov2, seed, simclr, supervised  # noqa: F401  (@register)
from edgedistill.methods.base import Method, MethodConfig, OptimizerGroup
from edgedistill.methods.registry import REGISTRY, method_class, register


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).Config


def method_names() -> list[str]:
    return sorted(REGISTRY)


def create_method(cfg, num_classes: int) -> Method:
    return method_class(cfg.method.name)(cfg, num_classes)


__all__ = ["Method", "MethodConfig", "OptimizerGroup", "create_method", "method_class", "method_config_class",
           "method_names", "register"]
