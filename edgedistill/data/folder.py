"""Image folders: scanning, verification of every image, and the embedded default dataset.

Layout: `<root>/<class>/<image>` (torchvision ImageFolder). Every image is decoded once before
training; unreadable or truncated files are skipped and counted (or, with `strict`, an error
naming the file). The verdicts are cached per file (path, size, mtime) under the user cache, so a
large dataset pays for the check once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgedistill.errors import UserError
from edgedistill.fileio import write_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EMBEDDED_PREFIX = "embedded:"


def walk_images(root: str | Path, skip_hidden: bool = False) -> list[str]:
    """Every image file under `root`, symlinks followed, folder by folder in sorted order (the
    names in each sorted).

    A symlinked folder is entered once: a link back to a folder already walked (a cycle, or two
    links to one folder) is skipped, where `os.walk(followlinks=True)` alone never ends."""
    folders: list[tuple[str, list[str]]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if skip_hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        dirnames.sort()
        folders.append((dirpath, sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))))
    return [os.path.join(d, n) for d, names in sorted(folders) for n in names]


def cache_dir() -> Path:
    root = os.environ.get("EDGEDISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgedistill"
    )
    return Path(root)


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples], dtype=np.int64)

    def subset(self, count: int, seed: int) -> ImageFolder:
        if count >= len(self.samples):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self.samples))[:count])
        return ImageFolder(self.root, self.classes, [self.samples[i] for i in idx], self.skipped)


def _check_image(path: str) -> str | None:
    """None when the image decodes completely, else the reason."""
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def _verify(files: list[tuple[str, int, float]], workers: int) -> dict[str, str]:
    """Decode every file not verified before; returns {path: reason} for the bad ones."""
    key = hashlib.sha1(json.dumps(files).encode()).hexdigest()[:20]
    cache = cache_dir() / "verified" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    paths = [f for f, _, _ in files]
    if workers > 1 and len(paths) > 2000:
        with ProcessPoolExecutor(workers) as pool:
            reasons = list(pool.map(_check_image, paths, chunksize=256))
    else:
        reasons = [_check_image(p) for p in paths]
    bad = {p: r for p, r in zip(paths, reasons) if r is not None}
    try:
        write_json(cache, bad)
    except OSError:
        pass  # a read-only cache only costs time
    return bad


def scan_folder(root: str | Path, strict: bool = False, workers: int = 2, what: str = "dataset") -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} folder {root} does not exist: pass a folder laid out as <root>/<class>/<image>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{what} folder {root} has no class sub-folders: expected <root>/<class>/<image>")
    files: list[tuple[str, int, float]] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for p in walk_images(root / cls):
            st = os.stat(p)
            files.append((p, st.st_size, st.st_mtime))
            labels.append(label)
    if not files:
        raise UserError(f"{what} folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) under its class folders")
    bad = _verify(files, workers)
    if bad:
        first = next(iter(bad.items()))
        if strict:
            raise UserError(f"unreadable image {first[0]} ({first[1]}); remove it, or set data.strict=false to skip bad images")
        log.warning("%s: skipped %d unreadable image(s), e.g. %s (%s)", root, len(bad), first[0], first[1])
    samples = [(p, lab) for (p, _, _), lab in zip(files, labels) if p not in bad]
    if not samples:
        raise UserError(f"{what} folder {root}: none of its {len(files)} images could be decoded")
    return ImageFolder(root, classes, samples, sorted(bad))


def embedded_digits(size: int = 32) -> tuple[Path, Path]:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes) as RGB PNG folders, upscaled.

    Written once under the user cache; split 80/20, stratified, with a fixed seed.
    """
    root = cache_dir() / "datasets" / f"digits-{size}"
    done = root / ".complete"
    if not done.is_file():
        from sklearn.datasets import load_digits  # ~4 s to import: only when building

        digits = load_digits()
        rng = np.random.default_rng(0)
        for cls in range(10):
            idx = rng.permutation(np.flatnonzero(digits.target == cls))
            n_val = len(idx) // 5
            for split, chosen in (("val", idx[:n_val]), ("train", idx[n_val:])):
                out = root / split / str(cls)
                out.mkdir(parents=True, exist_ok=True)
                for i in chosen:
                    gray = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                    img = Image.fromarray(gray, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
                    img.save(out / f"{i:04d}.png")
        done.write_text("ok\n")
    return root / "train", root / "val"


def resolve(spec: str, split: str, img_size: int) -> Path:
    """A dataset path, with "embedded:digits" materialised into the cache."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        if name != "digits":
            raise UserError(f"unknown embedded dataset {spec!r}: the embedded default is 'embedded:digits'")
        train, val = embedded_digits(max(img_size, 8))
        return train if split == "train" else val
    return Path(spec)
