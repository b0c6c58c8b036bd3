"""Recipes: a YAML file (or the defaults) + `--set` overrides -> a validated RunConfig.

Apart from `edgedistill.config` (the dataclasses, which know nothing of the methods) because the
method section is validated against the method registry (`edgedistill.methods`), whose modules
import the config dataclasses: the import graph stays acyclic.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from edgedistill.config import RunConfig, apply_overrides, from_dict
from edgedistill.errors import UserError
from edgedistill.methods import method_class, method_config_class, method_names


def build_config(data: dict, source: str = "<recipe>") -> RunConfig:
    """Validate a recipe dict (after overrides) into a RunConfig; errors name `source`."""
    data = dict(data)
    method = data.pop("method", None) or {"name": "mocov2"}
    if isinstance(method, str):
        method = {"name": method}
    try:
        cfg = from_dict(RunConfig, data)
        method = dict(method)
        name = method.pop("name", None)
        if name is None:
            raise UserError(f"method.name is missing (one of {', '.join(method_names())})")
        cfg.method = from_dict(method_config_class(name), method, "method")
        cfg.method.name = name
        if method_class(name).needs_teacher and (cfg.teacher is None or not cfg.teacher.checkpoint):
            raise UserError(f"method {name} needs a teacher: add `teacher: {{arch: ..., checkpoint: <local file>}}`")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe file (or the defaults when path is None) and apply `--set` overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe {path} does not exist: pass a YAML file, e.g. recipes/cifar10_disco_r56_mnv3.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a recipe is a mapping of sections (name, student, data, ...)")
        source = str(path)
    data = apply_overrides(data, overrides or [])
    return build_config(data, source)
