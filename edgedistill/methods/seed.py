"""SEED (Fang et al., ICLR 2021): the student mimics the teacher's similarity distribution.

A frozen teacher embeds each image; a queue holds the teacher embeddings of earlier batches.
With t the teacher's and s the student's L2-normalised embedding of the *same* augmented view:

    target     = softmax([t.t, t.Q] / teacher_temperature)     (1e-4: almost one-hot)
    prediction = log_softmax([s.t, s.Q] / student_temperature) (0.2)
    loss       = cross-entropy(target, prediction), averaged over the batch

(see `losses.seed_loss`). One view per image, shared by teacher and student; the batch's teacher
embeddings enter the queue after the loss, as in the reference code (jacobswan1/SEED,
`seed/builder.py`). The student projection MLP is Linear(feat, feat) - ReLU - Linear(feat, D)
with D the teacher's embedding width (the reference's `--student_mlp`); it is dropped at export.

Queue size: the reference uses 65,536 on ImageNet; the default here (4,096) suits CIFAR-sized
data. The teacher is frozen, so, unlike MoCo's keys, queued embeddings never go stale: the queue
may be as large as memory allows, but must be a multiple of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgedistill.distributed import all_gather_cat
from edgedistill.errors import UserError
from edgedistill.losses import seed_loss
from edgedistill.methods import register
from edgedistill.methods.base import Method, MethodConfig, OptimizerGroup
from edgedistill.models import Encoder, create_backbone, feature_dim, load_encoder, projection_head


@dataclass
class SeedConfig(MethodConfig):
    # Teacher embeddings in the queue (reference: 65,536 on ImageNet); a multiple of the global batch.
    queue_size: int = 4096
    student_temperature: float = 0.2
    teacher_temperature: float = 1e-4
    # Student projection MLP hidden width; None = the student's feature width (the reference).
    proj_hidden: int | None = None
    # eval: frozen BN statistics (default, deterministic). train: batch statistics under no_grad.
    teacher_bn: str = "eval"


@register("seed")
class SEED(Method):
    Config = SeedConfig
    num_views = 1
    needs_teacher = True

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        if cfg.teacher is None:
            raise UserError("method seed needs a teacher: add a `teacher:` section with arch and checkpoint")
        if self.hp.teacher_bn not in ("eval", "train"):
            raise UserError(f"method.teacher_bn must be 'eval' or 'train', got {self.hp.teacher_bn!r}")
        if self.hp.queue_size < 1:
            raise UserError(f"method.queue_size must be positive, got {self.hp.queue_size}")
        self.teacher = load_encoder(cfg.teacher)
        self.teacher.requires_grad_(False)
        dim = self.teacher.out_dim
        backbone = create_backbone(cfg.student)
        width = feature_dim(backbone)
        self.student = Encoder(backbone, projection_head(width, self.hp.proj_hidden or width, dim))
        self.register_buffer("queue", F.normalize(torch.randn(self.hp.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.train(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.train(mode and self.hp.teacher_bn == "train")
        return self

    @torch.no_grad()
    def teacher_embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.teacher(x).float(), dim=1)

    @torch.no_grad()
    def _enqueue(self, emb: torch.Tensor) -> None:
        emb = all_gather_cat(emb.float())
        n, size = emb.shape[0], self.queue.shape[0]
        if size % n:
            raise UserError(f"method.queue_size {size} must be a multiple of the global batch {n}")
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + n] = emb
        self.queue_ptr.fill_((ptr + n) % size)

    def forward(self, views, labels):
        x = views[0]
        t = self.teacher_embed(x)
        s = F.normalize(self.student(x), dim=1)
        loss = seed_loss(s, t, self.queue.clone(), self.hp.teacher_temperature, self.hp.student_temperature)
        self._enqueue(t)
        return {"loss": loss, "seed_ce": loss.detach()}

    def optimizer_groups(self):
        return [OptimizerGroup(list(self.student.parameters()))]

    def deployable(self) -> dict[str, nn.Module]:
        return {"student": self.student.backbone, "head": self.student.head}

    def frozen_prefixes(self):
        return ("teacher.",)
