"""The torchvision path: PIL decoding + torchvision.transforms.v2 in DataLoader workers.

Augmentation randomness is seeded per (run seed, epoch, sample index), so an epoch is the same
whatever the worker count, and `--resume` can skip already-seen batches without decoding them.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from edgedistill.config import DataConfig
from edgedistill.data.folder import ImageFolder


class ForkSafeDataLoader(DataLoader):
    """A DataLoader that collects this process's cyclic garbage before it forks its workers. An ONNX
    Runtime session left in such garbage (a run's fp32-ort teacher after training, say) would
    otherwise be destroyed by a forked worker's garbage collector, where its thread pool's condition
    variables still count the parent's threads as waiters: the worker never returns, and neither
    does the loader (`edgedistill demo` hung so in evaluation, on an AVX2 CPU where `auto` ran the
    teacher on ONNX Runtime). Every loader with worker processes here is one of these."""

    def __iter__(self):
        if self.num_workers > 0:
            gc.collect()
        return super().__iter__()


def blur_kernel_size(img_size: int) -> int:
    """Odd kernel of about 10% of the crop (SimCLR/MoCo convention), at least 3."""
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


# The training augmentation a method asks its loader for (`Method.augmentation`).
Augmentation = Literal["mocov2", "simclr"]

# SimCLR blurs only images of at least this size (its CIFAR runs skip the blur).
SIMCLR_MIN_BLUR_SIZE = 96


@dataclass(frozen=True)
class AugmentationRecipe:
    """The numbers of a view augmentation, shared by the torchvision and DALI loaders."""

    min_scale: float
    jitter: float  # brightness = contrast = saturation strength
    hue: float  # fraction of the hue circle
    p_jitter: float
    p_gray: float
    p_blur: float


def augmentation_recipe(kind: Augmentation, cfg: DataConfig) -> AugmentationRecipe:
    """MoCo v2 "aug-plus": crop scale data.min_scale..1, jitter 0.4/0.4/0.4/0.1 (p 0.8), grayscale
    0.2, blur p 0.5. SimCLR (DoGo, simclr): crop scale 0.08..1 whatever data.min_scale says, jitter
    0.8/0.8/0.8/0.2 (p 0.8), grayscale 0.2, blur p 0.5 only when img_size >= 96."""
    if kind == "mocov2":
        return AugmentationRecipe(cfg.min_scale, 0.4, 0.1, 0.8, 0.2, 0.5)
    if kind == "simclr":
        return AugmentationRecipe(0.08, 0.8, 0.2, 0.8, 0.2, 0.5 if cfg.img_size >= SIMCLR_MIN_BLUR_SIZE else 0.0)
    raise ValueError(f"unknown augmentation {kind!r}")


def view_transform(cfg: DataConfig, kind: Augmentation = "mocov2") -> T.Compose:
    """One training view with the `kind` recipe (see `augmentation_recipe`); the DALI pipeline
    implements the same recipes."""
    recipe = augmentation_recipe(kind, cfg)
    steps = [
        T.ToImage(),
        T.RandomResizedCrop(cfg.img_size, scale=(recipe.min_scale, 1.0), antialias=True),
        T.RandomApply([T.ColorJitter(recipe.jitter, recipe.jitter, recipe.jitter, recipe.hue)], p=recipe.p_jitter),
        T.RandomGrayscale(p=recipe.p_gray),
    ]
    if recipe.p_blur > 0:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(cfg.img_size), sigma=(0.1, 2.0))], p=recipe.p_blur))
    steps += [T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


def mocov2_transform(cfg: DataConfig) -> T.Compose:
    """MoCo v2 "aug-plus" (see README, Data loaders)."""
    return view_transform(cfg, "mocov2")


def eval_transform(cfg: DataConfig) -> T.Compose:
    """Resize the shorter side to img_size / crop_pct, centre-crop img_size, normalise."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(int(round(cfg.img_size / cfg.crop_pct)), antialias=True),
            T.CenterCrop(cfg.img_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ViewsDataset(Dataset):
    """Yields (views [V, 3, H, W] float, label) for one epoch's seed."""

    def __init__(self, folder: ImageFolder, transform, num_views: int, seed: int, epoch: int):
        self.samples = folder.samples
        self.transform = transform
        self.num_views = num_views
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = _load_rgb(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            views = [self.transform(img) for _ in range(self.num_views)]
        return torch.stack(views), label


class EvalDataset(Dataset):
    def __init__(self, folder: ImageFolder, transform):
        self.samples = folder.samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(_load_rgb(path)), label


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's sample indices for an epoch: a seeded permutation, cut to whole global
    batches, sharded round-robin by rank (every image at most once per epoch across ranks)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    usable = (n // (batch_size * world)) * batch_size * world
    return perm[:usable][rank::world]


class TorchvisionTrainLoader:
    name = "torchvision"

    def __init__(self, folder: ImageFolder, cfg: DataConfig, num_views: int, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world: int = 1, augmentation: Augmentation = "mocov2"):
        self.folder, self.cfg, self.num_views = folder, cfg, num_views
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world = rank, world
        self.augmentation = augmentation
        self.transform = view_transform(cfg, augmentation)
        self.steps_per_epoch = len(folder) // (batch_size * world)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        order = epoch_order(len(self.folder), self.batch_size, self.seed, epoch, self.rank, self.world)
        order = order[skip * self.batch_size :]
        dataset = ViewsDataset(self.folder, self.transform, self.num_views, self.seed, epoch)
        loader = ForkSafeDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=order.tolist(),
            drop_last=True,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for views, labels in loader:
            views = views.to(self.device, non_blocking=True)
            yield list(views.unbind(1)), labels.to(self.device, non_blocking=True)


def eval_loader(folder: ImageFolder, cfg: DataConfig, batch_size: int, indices=None) -> DataLoader:
    dataset = EvalDataset(folder, eval_transform(cfg))
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    return ForkSafeDataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=cfg.workers)
