"""MoCo v2 (Chen et al. 2020): the SSL baseline, and the way to pretrain a teacher.

Query encoder + momentum key encoder, a queue of negatives, InfoNCE. The key encoder runs under
shuffle-BN (`components.ShuffleBN`), as in both the MoCo and the DisCo reference code: in one
process the shuffled key batch is encoded in `method.shuffle_bn_splits` groups with their own BN
statistics (how MoCo's single-GPU CIFAR notebook simulates several GPUs); under DDP the keys are
also shuffled across ranks. Unset, the split count is the largest up to 8 that keeps every group
at >= 64 samples (1 = off, which is what batches below 128 get). The query encoder's BN is
unchanged. Under DDP the keys are gathered from every rank before they enter the queue.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgedistill.losses import info_nce
from edgedistill.methods.registry import register
from edgedistill.methods.base import Method, MethodConfig, OptimizerGroup
from edgedistill.methods.components import EmbeddingQueue, ShuffleBN, resolve_shuffle_bn_splits
from edgedistill.models import Encoder, create_backbone, feature_dim, projection_head


@dataclass
class MoCoConfig(MethodConfig):
    temperature: float = 0.2
    momentum: float = 0.999
    # Negatives in the queue (65,536 on ImageNet); must be a multiple of the global batch.
    queue_size: int = 4096
    proj_dim: int | None = 128
    # Projection MLP hidden width; None = the backbone's feature width (MoCo v2's choice).
    proj_hidden: int | None = None
    # Key-encoder BN groups (shuffle-BN); None = the largest count <= 8 keeping >= 64 samples per
    # group (8 at a per-process batch of 512, 4 at 256, 2 at 128, off below 128); 1 turns it off.
    shuffle_bn_splits: int | None = None


@register("mocov2")
class MoCoV2(Method):
    Config = MoCoConfig
    num_views = 2

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        backbone = create_backbone(cfg.student)
        width = feature_dim(backbone)
        out_dim = self._embedding_dim()
        self.encoder_q = Encoder(backbone, projection_head(width, self.hp.proj_hidden or width, out_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.queue = EmbeddingQueue(self.hp.queue_size, out_dim)
        self.shuffle_bn = ShuffleBN(resolve_shuffle_bn_splits(self.hp.shuffle_bn_splits, cfg.train.batch_size),
                                    cfg.seed)
        # Counts key-encoder calls: the shuffle permutation's seed, saved with the checkpoint.
        self.register_buffer("shuffle_calls", torch.zeros((), dtype=torch.long))

    def _embedding_dim(self) -> int:
        return self.hp.proj_dim or 128

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.hp.momentum
        for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        for bk, bq in zip(self.encoder_k.buffers(), self.encoder_q.buffers()):
            bk.copy_(bq)

    def contrastive(self, x_q: torch.Tensor, x_k: torch.Tensor):
        """Returns (q, k, InfoNCE); q keeps its graph, k comes from the momentum encoder."""
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)
        with torch.no_grad():
            self._momentum_update()
            k = F.normalize(self.shuffle_bn(self.encoder_k, x_k, int(self.shuffle_calls)).float(), dim=1)
            self.shuffle_calls += 1
        loss = info_nce(q, k, self.queue.snapshot(), self.hp.temperature)
        return q, k, loss

    def forward(self, views, labels):
        _, k, loss = self.contrastive(views[0], views[1])
        self.queue.push(k)
        return {"loss": loss, "info_nce": loss.detach()}

    def optimizer_groups(self):
        return [OptimizerGroup(list(self.encoder_q.parameters()))]

    def deployable(self) -> dict[str, nn.Module]:
        return {"student": self.encoder_q.backbone, "head": self.encoder_q.head}
