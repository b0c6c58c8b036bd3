"""Building blocks shared by methods: the frozen teacher and the embedding queue."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgedistill.runfolder import TEACHER_CENTER_FILE
from edgedistill.config import ModelConfig
from edgedistill.distributed import all_gather_cat
from edgedistill.errors import UserError
from edgedistill.models import load_encoder


# Images of the training set (a seeded subset) whose mean teacher feature is the centre.
CENTER_IMAGES = 10_000
# Images whose pairwise cosines are summarised in the log (before / after centring).
COSINE_IMAGES = 2_000


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows (1 = every row points the same way)."""
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    if n < 2:
        return float("nan")
    total = z.sum(dim=0).pow(2).sum() - z.pow(2).sum()  # sum over i != j of z_i . z_j
    return float(total / (n * (n - 1)))


class FrozenTeacher(nn.Module):
    """A teacher loaded from a local checkpoint, never trained; `forward` returns its final
    embedding, L2-normalised, without gradient.

    bn_mode "eval" (default) keeps its BN statistics frozen; "train" uses batch statistics under
    no_grad, as the DisCo reference code does. Methods list "teacher." in `frozen_prefixes` so
    checkpoints do not carry it (it is rebuilt from its source).

    center: for a teacher without a projection head (a supervised checkpoint), subtract the
    per-channel mean of its pooled features over the training set before normalising. Pooled
    post-ReLU features are non-negative, so without it every target sits in one orthant (mean
    pairwise cosine 0.57 for the CIFAR ResNet-56) and a distance loss pulls the student's
    embedding there too. The mean is computed once by `prepare` and kept in the run folder
    (teacher_center.json), which a resumed run reuses. Teachers with a projection head (MoCo
    checkpoints) already give centred, spread embeddings and are left as they are.
    """

    def __init__(self, cfg: ModelConfig, bn_mode: str = "eval", center: bool = False):
        super().__init__()
        if bn_mode not in ("eval", "train"):
            raise UserError(f"method.teacher_bn must be 'eval' or 'train', got {bn_mode!r}")
        self.encoder = load_encoder(cfg)
        self.encoder.requires_grad_(False)
        self.bn_mode = bn_mode
        self.out_dim = self.encoder.out_dim
        self.has_head = isinstance(self.encoder.head, nn.Sequential)
        self.center_wanted = center and not self.has_head
        self.register_buffer("center", torch.zeros(self.out_dim))
        self.centered = False
        self._warned = False
        self.train(True)

    @torch.no_grad()
    def prepare(self, run_dir, folder, data_cfg, seed: int, device: torch.device) -> dict | None:
        """Load or compute the centre (see the class doc); returns its statistics, or None when off."""
        import json
        from pathlib import Path

        from edgedistill.data.torch_loader import eval_loader
        from edgedistill.fileio import write_json

        if not self.center_wanted:
            return None
        log = logging.getLogger(__name__)
        path = Path(run_dir) / TEACHER_CENTER_FILE
        if path.is_file():
            stats = json.loads(path.read_text())
            if len(stats["mean"]) != self.out_dim:
                raise UserError(f"{path} holds a {len(stats['mean'])}-d centre but the teacher embedding is "
                                f"{self.out_dim}-d: delete the file (or the run folder) and start again")
            log.info("teacher centre reused from %s", path)
        else:
            count = min(len(folder), CENTER_IMAGES)
            # A seeded random subset, in random order (so the first COSINE_IMAGES mix every class).
            indices = np.random.default_rng([seed, 0xCE]).permutation(len(folder))[:count].tolist()
            was_training = self.encoder.training
            self.encoder.eval()
            feats = torch.cat([self.encoder(images.to(device)).float().cpu()
                               for images, _ in eval_loader(folder, data_cfg, 256, indices)])
            self.encoder.train(was_training)
            mean = feats.mean(dim=0)
            sample = feats[:COSINE_IMAGES]
            stats = {"mean": [round(float(v), 7) for v in mean], "images": count,
                     "mean_pairwise_cosine_before": round(mean_pairwise_cosine(sample), 4),
                     "mean_pairwise_cosine_after": round(mean_pairwise_cosine(sample - mean), 4)}
            write_json(path, stats)
        self.center.copy_(torch.tensor(stats["mean"], dtype=torch.float32))
        self.centered = True
        log.info("teacher target centred with the per-channel mean of %d training images: mean pairwise cosine "
                 "%.3f before, %.3f after", stats["images"], stats["mean_pairwise_cosine_before"],
                 stats["mean_pairwise_cosine_after"])
        return stats

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.train(mode and self.bn_mode == "train")
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center_wanted and not self.centered and not self._warned:
            # The trainer always prepares; a bare forward (e.g. a speed benchmark) gets the raw target.
            logging.getLogger(__name__).warning("teacher centring is on but prepare() has not run: uncentred target")
            self._warned = True
        features = self.encoder(x).float()
        if self.centered:
            features = features - self.center
        return F.normalize(features, dim=1)


class EmbeddingQueue(nn.Module):
    """A FIFO of L2-normalised embeddings (MoCo's negatives, SEED's teacher bank).

    Under DDP every rank enqueues the embeddings gathered from all ranks, so the queues stay
    identical without broadcasting.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise UserError(f"method.queue_size must be positive, got {size}")
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> torch.Tensor:
        """The current contents, detached from later in-place updates (safe inside a loss)."""
        return self.embeddings.clone().detach()

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        batch = all_gather_cat(batch.float())
        n, size = batch.shape[0], self.embeddings.shape[0]
        if size % n:
            raise UserError(f"method.queue_size {size} must be a multiple of the global batch {n}")
        ptr = int(self.ptr)
        # Out of place: under torch.compile the loss's backward may read the queue tensor itself
        # (the snapshot's clone is recomputed, not saved), which an in-place write would corrupt.
        self.embeddings = torch.cat([self.embeddings[:ptr], batch.to(self.embeddings.dtype),
                                     self.embeddings[ptr + n :]])
        self.ptr.fill_((ptr + n) % size)


# Shuffle-BN: a split smaller than this gives noisy BN statistics; the automatic choice keeps
# every split at least this large (MoCo's CIFAR notebook: batch 512 in 8 groups of 64). Measured:
# groups of 32 at the demo's batch of 64 cost its DisCo student 3 points (78.9 vs 82.0 linear).
MIN_SPLIT_SIZE = 64
MAX_AUTO_SPLITS = 8


def auto_shuffle_bn_splits(local_batch: int) -> int:
    """The default number of key-encoder BN groups: the largest count up to 8 that divides the
    per-process batch and keeps every group at >= 64 samples (1 = plain BN, below 128)."""
    for splits in range(MAX_AUTO_SPLITS, 1, -1):
        if local_batch % splits == 0 and local_batch // splits >= MIN_SPLIT_SIZE:
            return splits
    return 1


def resolve_shuffle_bn_splits(requested: int | None, local_batch: int) -> int:
    """`method.shuffle_bn_splits` checked against the per-process batch; None = automatic."""
    if requested is None:
        return auto_shuffle_bn_splits(local_batch)
    if requested < 1 or local_batch % requested:
        raise UserError(
            f"method.shuffle_bn_splits={requested} must be a positive divisor of the per-process batch "
            f"{local_batch}: use 1 (off), a divisor such as {auto_shuffle_bn_splits(local_batch)}, or leave it unset"
        )
    return requested


class ShuffleBN:
    """MoCo's shuffle-BN for a key encoder, so BN statistics cannot tell which key matches which query.

    `forward(encoder, x)` permutes the batch, runs `encoder` on `splits` equal groups (each with
    its own BN batch statistics), and returns the outputs in the input order. Under DDP the batch
    is first gathered from every rank, permuted with a permutation every rank draws from the same
    seed, and each rank encodes its slice of the shuffled global batch; the outputs are gathered
    and unshuffled (facebookresearch/moco `_batch_shuffle_ddp`, with a shared seed in place of a
    broadcast). The permutation depends only on (run seed, call count), and the call count is a
    buffer of the owning method, so a resumed run draws the same permutations.
    """

    def __init__(self, splits: int, seed: int):
        self.splits = splits
        self.seed = seed

    def permutation(self, n: int, call: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, call, 0x5B]).generate_state(1, np.uint64)[0] >> 1)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, x: torch.Tensor, call: int) -> torch.Tensor:
        from edgedistill import distributed as dist_utils

        world = dist_utils.world_size()
        if self.splits == 1 and world == 1:
            return encoder(x)
        local = x.shape[0]
        x_all = all_gather_cat(x)
        order = self.permutation(x_all.shape[0], call).to(x.device)
        rank = dist_utils.rank()
        mine = x_all[order[rank * local : (rank + 1) * local]]
        out = torch.cat([encoder(group) for group in mine.chunk(self.splits)], dim=0)
        out_all = all_gather_cat(out)
        restored = torch.empty_like(out_all)
        restored[order] = out_all
        return restored[rank * local : (rank + 1) * local]
