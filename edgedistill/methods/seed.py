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

import torch.nn as nn
import torch.nn.functional as F

from edgedistill.losses import seed_loss
from edgedistill.methods.registry import register
from edgedistill.methods.base import Method, MethodConfig, OptimizerGroup
from edgedistill.methods.components import EmbeddingQueue, FrozenTeacher
from edgedistill.models import Encoder, create_backbone, feature_dim, projection_head


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
    # Supervised teachers without a projection head: centre their pooled features with the
    # training-set mean before normalising (see components.FrozenTeacher). Ignored for teachers
    # with a head.
    teacher_center: bool = True


@register("seed")
class SEED(Method):
    Config = SeedConfig
    num_views = 1
    needs_teacher = True

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.teacher = FrozenTeacher(cfg.teacher, self.hp.teacher_bn, self.hp.teacher_center)
        backbone = create_backbone(cfg.student)
        width = feature_dim(backbone)
        self.student = Encoder(backbone, projection_head(width, self.hp.proj_hidden or width, self.teacher.out_dim))
        self.queue = EmbeddingQueue(self.hp.queue_size, self.teacher.out_dim)

    def forward(self, views, labels):
        x = views[0]
        t = self.teacher(x)
        s = F.normalize(self.student(x).float(), dim=1)
        loss = seed_loss(s, t, self.queue.snapshot(), self.hp.teacher_temperature, self.hp.student_temperature)
        self.queue.push(t)
        return {"loss": loss, "seed_ce": loss.detach()}

    def optimizer_groups(self):
        return [OptimizerGroup(list(self.student.parameters()))]

    def deployable(self) -> dict[str, nn.Module]:
        return {"student": self.student.backbone, "head": self.student.head}

    def prepare(self, run_dir, folder, device, channels_last: bool = False, steps: int | None = None):
        batch = self.cfg.train.batch_size
        self.teacher.prepare(run_dir, folder, self.cfg.data, self.cfg.seed, device, batch_size=batch,
                             channels_last=channels_last, train_images=steps and steps * batch)

    def frozen_prefixes(self):
        return ("teacher.",)
