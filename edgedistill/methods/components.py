"""Building blocks shared by methods: the frozen teacher and the embedding queue."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgedistill.config import ModelConfig
from edgedistill.distributed import all_gather_cat
from edgedistill.errors import UserError
from edgedistill.models import load_encoder


class FrozenTeacher(nn.Module):
    """A teacher loaded from a local checkpoint, never trained; `forward` returns its final
    embedding, L2-normalised, without gradient.

    bn_mode "eval" (default) keeps its BN statistics frozen; "train" uses batch statistics under
    no_grad, as the DisCo reference code does. Methods list "teacher." in `frozen_prefixes` so
    checkpoints do not carry it (it is rebuilt from its source).
    """

    def __init__(self, cfg: ModelConfig, bn_mode: str = "eval"):
        super().__init__()
        if bn_mode not in ("eval", "train"):
            raise UserError(f"method.teacher_bn must be 'eval' or 'train', got {bn_mode!r}")
        self.encoder = load_encoder(cfg)
        self.encoder.requires_grad_(False)
        self.bn_mode = bn_mode
        self.out_dim = self.encoder.out_dim
        self.train(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.train(mode and self.bn_mode == "train")
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x).float(), dim=1)


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
        self.embeddings[ptr : ptr + n] = batch
        self.ptr.fill_((ptr + n) % size)
