"""Atomic file writes: a temporary file in the same folder, then a rename (no half files).

Torch-free, so import-light commands (report, gate) and the data scan can use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Text written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data) -> None:
    """JSON (indented, non-JSON values as str) written atomically: readers never see half a file."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_npy(path: Path, array) -> None:
    """A numpy array written atomically (`np.save` to a temporary file, then a rename)."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare name
            np.save(f, array)

    atomic_write(path, write)
