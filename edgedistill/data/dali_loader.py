"""The DALI path: `fn.readers.file` -> `fn.decoders.image` -> the method's augmentation, per view.

Two flavours behind one class:

- `dali-gpu`: JPEG decoding on the GPU (`device="mixed"`, nvJPEG) and every augmentation on the
  GPU; the batch is copied device-to-device into torch tensors (`feed_ndarray` on torch's current
  stream), never through the host.
- `dali-cpu`: the same graph with CPU operators and `Pipeline(device_id=None)`, which runs
  without any GPU (DALI's CPU-only mode); the batch arrives as host memory and is moved to the
  training device.

Order and sharding. The reader does not shuffle or shard by itself: each epoch it gets this
rank's slice of `torch_loader.epoch_order()` (a seeded permutation, cut to whole global batches,
sharded round-robin by global rank) as an explicit file list, so both loaders visit exactly the
same images in the same order and every image is seen once per epoch across ranks. Because the
list is a whole number of batches there is no padded or wrapped last batch.

Augmentation (the same recipes as `torch_loader.view_transform`: MoCo v2 aug-plus shown here,
SimCLR's for DoGo/simclr differs only in its numbers, and skips the blur below 96 px), per view:
`random_resized_crop` (area min_scale..1, aspect 3/4..4/3, 10 attempts then a centre crop, as
torchvision), colour jitter with p=0.8, grayscale p=0.2, Gaussian blur p=0.5 (sigma 0.1..2,
window `blur_kernel_size(img_size)`), horizontal flip p=0.5, then `crop_mirror_normalize` to float
CHW with mean/std scaled to 0..255 input. How the random choices are made (measured choice):

- jitter and grayscale are folded into ONE `color_twist` whose per-sample factors are blended
  arithmetically with `fn.random.coin_flip` draws: a sample that skips jitter gets the identity
  factors (brightness = contrast = saturation = 1, hue = 0), grayscale multiplies the saturation
  by 0 (YIQ luma, the same ITU-R 601 weights torchvision's grayscale uses). One pass over the
  pixels, no batch split.
- the blur is a DALI conditional (`enable_conditionals=True`, `if blur:`), so only the ~half of
  the samples that are blurred pay for the convolution (arithmetic blending would blur every
  sample and then blend, i.e. always the full cost).
- the flip is `crop_mirror_normalize(mirror=coin)`, free.

Known differences from torchvision (same recipe, not bit-identical pixels): torchvision applies
brightness/contrast/saturation/hue in a random order with clamping after each, DALI's
`color_twist` applies them as one linear colour transform in a fixed order; torchvision's
contrast pivots on the image's mean grey, DALI's on mid-grey; resampling filters differ
slightly (both antialias).

Determinism and `--resume`. The pipeline seed is derived from (run seed, epoch), so an epoch is
reproducible. DALI's random operators draw from per-sample-slot generators that advance once
per batch, so a batch's augmentation depends on how many batches the pipeline has produced
before it. `skip` therefore RUNS AND DISCARDS the first `skip` batches of the epoch (it does not
drop files from the list: that would shift every later batch onto other random draws). The
cost is decoding up to one epoch's worth of batches once at resume; the benefit is that
`--resume` with `dali-cpu` sees exactly the batches an uninterrupted run sees (tested). With
`dali-gpu` the same holds as far as DALI's GPU kernels are deterministic (not verified here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from edgedistill.config import DataConfig
from edgedistill.data.folder import ImageFolder
from edgedistill.data.torch_loader import Augmentation, augmentation_recipe, blur_kernel_size, epoch_order
from edgedistill.errors import UserError

log = logging.getLogger(__name__)

# The recipe numbers come from `torch_loader.augmentation_recipe`: e.g. ColorJitter(0.4, 0.4, 0.4,
# 0.1) = factors uniform in [0.6, 1.4], hue shift in [-0.1, 0.1] of the hue circle = [-36, 36]
# degrees (DALI's color_twist takes degrees).
P_FLIP = 0.5
SIGMA = (0.1, 2.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def pipeline_seed(seed: int, epoch: int) -> int:
    """A deterministic, non-negative 31-bit pipeline seed for (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch, 0xDA11]).generate_state(1)[0] % (2**31 - 1))


def _build_pipeline(files: list[str], labels: list[int], cfg: DataConfig, num_views: int, batch_size: int,
                    seed: int, gpu: bool, device_id: int | None, num_threads: int, augmentation: Augmentation = "mocov2"):
    from nvidia.dali import fn, pipeline_def, types

    recipe = augmentation_recipe(augmentation, cfg)
    jitter_lo, jitter_hi, hue_degrees = 1 - recipe.jitter, 1 + recipe.jitter, recipe.hue * 360.0
    size = cfg.img_size
    mean = [255.0 * m for m in cfg.mean]
    std = [255.0 * s for s in cfg.std]
    window = blur_kernel_size(size)

    @pipeline_def(enable_conditionals=True)
    def views_pipeline():
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader")
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        outputs = []
        for _ in range(num_views):
            view = fn.random_resized_crop(images, size=[size, size], random_area=[recipe.min_scale, 1.0],
                                          random_aspect_ratio=list(RATIO), num_attempts=10, antialias=True)
            jitter = fn.random.coin_flip(probability=recipe.p_jitter)  # int32 0/1; promoted to float below
            keep_colour = 1.0 - fn.random.coin_flip(probability=recipe.p_gray)
            # Jitter factors are floored at 0 (torchvision's ColorJitter(0.8) draws from [0.2, 1.8]).
            brightness = fn.random.uniform(range=[max(0.0, jitter_lo), jitter_hi])
            contrast = fn.random.uniform(range=[max(0.0, jitter_lo), jitter_hi])
            saturation = fn.random.uniform(range=[max(0.0, jitter_lo), jitter_hi])
            hue = fn.random.uniform(range=[-hue_degrees, hue_degrees])
            view = fn.color_twist(
                view,
                brightness=1.0 + jitter * (brightness - 1.0),
                contrast=1.0 + jitter * (contrast - 1.0),
                saturation=(1.0 + jitter * (saturation - 1.0)) * keep_colour,
                hue=jitter * hue,
            )
            if recipe.p_blur > 0:
                blur = fn.random.coin_flip(probability=recipe.p_blur, dtype=types.BOOL)
                sigma = fn.random.uniform(range=list(SIGMA))
                if blur:
                    view = fn.gaussian_blur(view, window_size=window, sigma=sigma)
            flip = fn.random.coin_flip(probability=P_FLIP)
            view = fn.crop_mirror_normalize(view, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                                            mirror=flip)
            outputs.append(view)
        return (*outputs, label)

    pipe = views_pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                          seed=seed, prefetch_queue_depth=2)
    pipe.build()
    return pipe


class DaliTrainLoader:
    """Yields `(views, labels)` like `TorchvisionTrainLoader`, from a DALI pipeline."""

    def __init__(self, folder: ImageFolder, cfg: DataConfig, num_views: int, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world: int = 1, gpu: bool = False,
                 augmentation: Augmentation = "mocov2"):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise UserError(f"data.loader=dali-{'gpu' if gpu else 'cpu'} but NVIDIA DALI cannot be imported ({e}): "
                            "pip install nvidia-dali-cuda130, or use data.loader=torchvision") from None
        if gpu and (device.type != "cuda" or not torch.cuda.is_available()):
            raise UserError("data.loader=dali-gpu needs a CUDA device: use data.loader=dali-cpu or auto on this machine")
        self.folder, self.cfg, self.num_views = folder, cfg, num_views
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world, self.gpu = rank, world, gpu
        self.augmentation = augmentation
        self.name = "dali-gpu" if gpu else "dali-cpu"
        self.steps_per_epoch = len(folder) // (batch_size * world)
        # DALI GPU pipelines run on this rank's GPU (torchrun: LOCAL_RANK -> cuda:LOCAL_RANK);
        # device_id=None is DALI's CPU-only mode, which needs no GPU at all.
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        self._pipes: dict[int, object] = {}
        # Build epoch 0 now so that a pipeline that cannot run here fails at construction, with
        # a clear message, rather than at the first training step.
        if self.steps_per_epoch:
            self._pipes[0] = self._pipeline(0)

    def _files(self, epoch: int) -> tuple[list[str], list[int]]:
        order = epoch_order(len(self.folder), self.batch_size, self.seed, epoch, self.rank, self.world)
        samples = self.folder.samples
        return [samples[i][0] for i in order], [int(samples[i][1]) for i in order]

    def _pipeline(self, epoch: int):
        files, labels = self._files(epoch)
        try:
            return _build_pipeline(files, labels, self.cfg, self.num_views, self.batch_size,
                                   pipeline_seed(self.seed, epoch), self.gpu, self.device_id, self.cfg.workers,
                                   self.augmentation)
        except RuntimeError as e:
            where = f"GPU {self.device_id}" if self.gpu else "the CPU"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"the {self.name} pipeline could not be built on {where} ({first}); "
                            f"use data.loader={'dali-cpu' if self.gpu else 'torchvision'}") from None

    def _to_torch(self, out) -> torch.Tensor:
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = out.as_tensor()
            arr = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, arr, cuda_stream=torch.cuda.current_stream(self.device))
            return arr
        arr = torch.from_numpy(out.as_array())  # a fresh host array, not DALI's reused buffer
        return arr.to(self.device, non_blocking=True) if self.device.type != "cpu" else arr

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        pipe = self._pipes.pop(epoch, None)
        self._pipes.clear()
        if pipe is None:
            pipe = self._pipeline(epoch)
        try:
            # GPU: outputs are made ready on torch's current stream, and the copies are queued there.
            stream = torch.cuda.current_stream(self.device) if self.gpu else None
            for step in range(self.steps_per_epoch):
                outs = pipe.run(stream) if self.gpu else pipe.run()
                if step < skip:
                    continue  # run and discard: keeps later batches' random draws identical
                views = [self._to_torch(o) for o in outs[: self.num_views]]
                labels = torch.from_numpy(outs[self.num_views].as_array().reshape(-1).astype(np.int64))
                yield views, labels.to(self.device, non_blocking=True)
        finally:
            del pipe
