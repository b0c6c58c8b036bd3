"""The device kit: the torch-free scripts in the top-level `export/` folder.

They travel with every export (copied into `<export>/kit/`) to the edge device, where torch is
usually absent. The package imports the same files (`load_kit_module`) so that timing, the
results schema and engine building exist in one place only.
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from edgedistill.errors import UserError


def kit_dir() -> Path:
    """`export/` of a source checkout / editable install, else the copy a wheel installs."""
    candidates = [
        Path(__file__).resolve().parents[1] / "export",
        Path(sysconfig.get_path("data")) / "share" / "edgedistill" / "export",
    ]
    for path in candidates:
        if (path / "edgekit.py").is_file():
            return path
    raise UserError(f"device kit not found (looked in {', '.join(map(str, candidates))}): reinstall edgedistill")


def load_kit_module(name: str) -> ModuleType:
    """Import `export/<name>.py` as module `edgedistill_kit_<name>`."""
    mod_name = f"edgedistill_kit_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = kit_dir() / f"{name}.py"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module
