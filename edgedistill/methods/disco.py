"""DisCo (Gao et al., ECCV 2022): MoCo v2 student + the frozen teacher's final embedding.

loss = InfoNCE(q, k, queue) + w * (||s(x_q) - t(x_q)||^2 + ||s(x_k) - t(x_k)||^2)

on L2-normalised embeddings, where s is the student's *query* encoder applied to both views (with
gradient) and t the teacher's final embedding (after its projection head when it has one). The
distance is averaged over the batch (see `losses.embedding_distance`): the reference's
`MSELoss(reduction="sum")` over a per-GPU batch of 32 equals `distill_weight: 32` here.

The student projection MLP's hidden width defaults to 2048 (the paper's fix of the "distilling
bottleneck"); its output width follows the teacher's embedding. The head is dropped at export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from edgedistill.errors import UserError
from edgedistill.losses import embedding_distance
from edgedistill.methods.registry import register
from edgedistill.methods.mocov2 import MoCoConfig, MoCoV2
from edgedistill.methods.components import FrozenTeacher


@dataclass
class DiscoConfig(MoCoConfig):
    proj_hidden: int | None = 2048
    # None = the teacher's embedding width (DisCo matches student and teacher embeddings).
    proj_dim: int | None = None
    distill_weight: float = 32.0
    # eval: frozen BN statistics (default, deterministic). train: batch statistics under no_grad,
    # as the reference code does.
    teacher_bn: str = "eval"
    # Supervised teachers without a projection head: centre their pooled features with the
    # training-set mean before normalising (see components.FrozenTeacher). Ignored for teachers
    # with a head.
    teacher_center: bool = True


@register("disco")
class DisCo(MoCoV2):
    Config = DiscoConfig
    needs_teacher = True

    def __init__(self, cfg, num_classes):
        teacher = FrozenTeacher(cfg.teacher, cfg.method.teacher_bn, cfg.method.teacher_center)
        self._teacher_dim = teacher.out_dim
        if cfg.method.proj_dim not in (None, self._teacher_dim):
            raise UserError(
                f"method.proj_dim={cfg.method.proj_dim} but the teacher embedding is {self._teacher_dim}-d: "
                "leave proj_dim unset (it follows the teacher)"
            )
        super().__init__(cfg, num_classes)
        self.teacher = teacher

    def _embedding_dim(self) -> int:
        return self._teacher_dim

    def forward(self, views, labels):
        x_q, x_k = views
        q, k, contrastive = self.contrastive(x_q, x_k)
        s_k = F.normalize(self.encoder_q(x_k).float(), dim=1)
        distill = embedding_distance(q, self.teacher(x_q)) + embedding_distance(s_k, self.teacher(x_k))
        self.queue.push(k)
        loss = contrastive + self.hp.distill_weight * distill
        return {"loss": loss, "info_nce": contrastive.detach(), "distill": distill.detach()}

    def prepare(self, run_dir, folder, device, channels_last: bool = False, steps: int | None = None):
        batch = self.cfg.train.batch_size
        self.teacher.prepare(run_dir, folder, self.cfg.data, self.cfg.seed, device, batch_size=batch,
                             channels_last=channels_last, train_images=steps and steps * batch)

    def frozen_prefixes(self):
        return ("teacher.",)
