"""Real images for export checks and INT8 calibration, prepared exactly as the eval transform does.

- Validation: the run's labelled val folder (capped at `val_count` images, a seeded subset) as one
  float32 NCHW array; every artifact is scored on the same array.
- Calibration: images from the run's training folder, or from `--calib-data DIR` (any folder of
  images, class sub-folders optional), `count` of them chosen with a fixed seed. Read lazily in
  batches by `ImageReader` (an ONNX Runtime `CalibrationDataReader`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from edgedistill.config import RunConfig
from edgedistill.errors import UserError

log = logging.getLogger(__name__)

from edgedistill.data.folder import IMAGE_EXTENSIONS, walk_images


def _transform(cfg: RunConfig):
    from edgedistill.data.torch_loader import eval_transform

    return eval_transform(cfg.data)


def load_images(paths: list[str], cfg: RunConfig) -> np.ndarray:
    """Decode and preprocess `paths` into float32 [N, 3, H, W]; unreadable files are an error."""
    from PIL import Image

    tf = _transform(cfg)
    out = np.empty((len(paths), 3, cfg.data.img_size, cfg.data.img_size), dtype=np.float32)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many types
            raise UserError(f"cannot read image {p} ({type(e).__name__}: {e}): remove it or fix the folder") from None
        out[i] = tf(img).numpy()
    return out


def validation_set(cfg: RunConfig, val_count: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(images, labels, classes, total in the folder) of the run's validation folder."""
    from edgedistill.data import val_folder

    folder = val_folder(cfg.data)
    total = len(folder)
    samples = folder.samples
    if val_count and val_count < total:
        idx = np.sort(np.random.default_rng(seed).permutation(total)[:val_count])
        samples = [samples[i] for i in idx]
    images = load_images([p for p, _ in samples], cfg)
    labels = np.array([lab for _, lab in samples], dtype=np.int64)
    return images, labels, folder.classes, total


def list_images(root: Path) -> list[str]:
    return sorted(walk_images(root, skip_hidden=True))


def calibration_files(cfg: RunConfig, calib_data: Path | None, count: int, explicit_count: bool, seed: int = 0) -> tuple[list[str], str]:
    """`count` calibration image paths and a description of where they came from.

    An explicitly asked count larger than what the folder holds is an error; the default count
    is capped by what exists (with a log line).
    """
    if count < 1:
        raise UserError(f"--calib-count must be at least 1, got {count}")
    if calib_data is not None:
        root = Path(calib_data)
        if not root.is_dir():
            raise UserError(f"calibration folder {root} does not exist: pass --calib-data DIR with images (class sub-folders optional)")
        files = list_images(root)
        source = str(root)
    else:
        from edgedistill.data import train_folder

        folder = train_folder(cfg.data, cfg.seed)
        root = folder.root
        files = [p for p, _ in folder.samples]
        source = f"{root} (the run's training data)"
    if not files:
        raise UserError(f"calibration folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}): pass --calib-data DIR with images")
    if len(files) < count:
        if explicit_count:
            raise UserError(
                f"calibration folder {root} holds {len(files)} images, fewer than --calib-count {count}: "
                f"lower --calib-count to at most {len(files)} or add images")
        log.warning("calibration: %s holds only %d images (default count %d): using all of them", root, len(files), count)
        count = len(files)
    idx = np.sort(np.random.default_rng(seed).permutation(len(files))[:count])
    return [files[i] for i in idx], source


def file_list_fingerprint(paths: list[str]) -> list[list]:
    """(path, size, mtime) of each file: what the calibration cache key is made of."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, int(st.st_mtime_ns)])
    return out


def calibration_batching(count: int, batch_size: int) -> tuple[int, int]:
    """(batch, padding) for `count` calibration images in equal batches of at most `batch_size`:
    the fewest batches, as even as possible; `padding` images are repeated to fill the last."""
    if count < 1:
        return 1, 0
    batches = -(-count // max(1, batch_size))
    batch = -(-count // batches)
    return batch, batches * batch - count


def make_reader(paths: list[str], cfg: RunConfig, input_name: str, batch_size: int = 32):
    """An ONNX Runtime CalibrationDataReader that decodes `paths` batch by batch.

    Every batch has the same size, since ONNX Runtime's histogram calibrators (Entropy,
    Percentile) fail on a shorter last batch: `calibration_batching` splits the files into the
    fewest batches of at most `batch_size` and, when the count does not divide, fills the last
    batch with the first files again (fewer repeats than batches), never a batch of 1 for a
    prime count."""
    from onnxruntime.quantization import CalibrationDataReader

    batch_size, pad = calibration_batching(len(paths), batch_size)
    if pad:
        log.info("calibration: %d images in batches of %d (%d image(s) of the first batch read twice to fill "
                 "the last)", len(paths), batch_size, pad)
        paths = list(paths) + list(paths[:pad])

    class ImageReader(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(paths):
                return None
            batch = paths[self.start : self.start + batch_size]
            self.start += batch_size
            return {input_name: load_images(batch, cfg)}

        def rewind(self):
            self.start = 0

        def __len__(self):
            return (len(paths) + batch_size - 1) // batch_size

    return ImageReader()


@torch.no_grad()
def torch_outputs(model: torch.nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    model = model.eval()
    outs = [model(torch.from_numpy(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(outs).astype(np.float32)
