"""DoGo, "Distill on the Go" (Bhat et al., CVPR-W 2021): two peers learn from scratch together.

No pretrained teacher. The student (`student:` in the recipe) and a peer (`method.peer`) each
train with SimCLR's NT-Xent (T = 0.5) on the same pair of augmented views, each through its own
projection head Linear(feat, 512, no bias) - BN - ReLU - Linear(512, 128) and its own optimizer
(Adam, lr 3e-4, weight decay 1e-6 by default). Mutual distillation: for each model, P = the
row-softmax of the N x N cosine-similarity matrix between its two views' embeddings / 0.1, and

    loss_student = NT-Xent(student) + student_kl_weight * KL(P_peer.detach() || P_student)
    loss_peer    = NT-Xent(peer)    + peer_kl_weight    * KL(P_student.detach() || P_peer)

with the KL averaged over the N^2 entries (`losses.mutual_kl`), hence the large weight. The
trainer minimises their sum: the detached targets keep the two graphs apart, so each optimizer
sees exactly its own model's loss.

Weights: the reference code (NeurAI-Lab/DoGo, `util/train_util.py`, `criterion_weight: [1, 1,
100, 1]`) multiplies the KL of the *first* model by 100 and that of the second by 1. Here the
student (the deployed, usually smaller model) takes the 100 and the peer the 1: with the
mean-over-N^2 reduction a weight of 1 is a faint signal (1/N of the per-row KL), so the model
that receives the 100 is the one that is effectively distilled into, and the point of the method
is to improve the small model. Swap the two weights to reproduce a run where the peer is the
first model.

Views: the reference draws a separate pair of augmentations for each model (its MultiTransform);
here both peers see the same two views, which keeps the loader at two views
and makes the two similarity matrices compare identical image pairs.

Both backbones are saved: student.safetensors (what `eval` and `export` use), head.safetensors
(the student's projection head) and peer.safetensors (the peer backbone). Under DDP the NT-Xent
and the similarity matrices use the local batch only (the reference is single-process).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
import torch.nn.functional as F

from edgedistill.config import ModelConfig
from edgedistill.errors import UserError
from edgedistill.losses import mutual_kl, nt_xent, view_similarity_log_probs
from edgedistill.methods import register
from edgedistill.methods.base import Method, MethodConfig, OptimizerGroup
from edgedistill.models import Encoder, create_backbone, feature_dim, simclr_head


@dataclass
class DoGoConfig(MethodConfig):
    # The second model, trained from scratch beside the student (no checkpoint).
    peer: ModelConfig = field(default_factory=lambda: ModelConfig(arch="resnet18"))
    # NT-Xent temperature (SimCLR, both models).
    temperature: float = 0.5
    # Temperature of the view-to-view similarity softmax that the peers match.
    kl_temperature: float = 0.1
    # KL weights (mean over N^2 entries); the reference's [100, 1] with the student first.
    student_kl_weight: float = 100.0
    peer_kl_weight: float = 1.0
    proj_hidden: int = 512
    proj_dim: int = 128
    # Each model's optimizer; None falls back to the recipe's `train:` section. lr is for a
    # batch of 256 and scales linearly with train.batch_size, like every lr in edgedistill.
    optimizer: str | None = "adam"
    lr: float | None = 3e-4
    weight_decay: float | None = 1e-6


def _encoder(model_cfg: ModelConfig, hp: DoGoConfig) -> Encoder:
    backbone = create_backbone(model_cfg)
    return Encoder(backbone, simclr_head(feature_dim(backbone), hp.proj_hidden, hp.proj_dim))


@register("dogo")
class DoGo(Method):
    Config = DoGoConfig
    num_views = 2

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        hp = self.hp
        if hp.peer.checkpoint:
            raise UserError("method.peer.checkpoint: DoGo trains the peer from scratch; remove the checkpoint")
        if hp.optimizer is not None and hp.optimizer not in ("sgd", "adam", "adamw"):
            raise UserError(f"method.optimizer: {hp.optimizer!r} is not one of sgd, adam, adamw")
        self.student = _encoder(cfg.student, hp)
        self.peer = _encoder(hp.peer, hp)

    def _embed(self, encoder: Encoder, x1, x2):
        return F.normalize(encoder(x1), dim=1), F.normalize(encoder(x2), dim=1)

    def forward(self, views, labels):
        x1, x2 = views
        hp = self.hp
        s1, s2 = self._embed(self.student, x1, x2)
        p1, p2 = self._embed(self.peer, x1, x2)
        ntx_s = nt_xent(s1, s2, hp.temperature)
        ntx_p = nt_xent(p1, p2, hp.temperature)
        logp_s = view_similarity_log_probs(s1, s2, hp.kl_temperature)
        logp_p = view_similarity_log_probs(p1, p2, hp.kl_temperature)
        kl_s = mutual_kl(logp_s, logp_p)  # the student learns from the (detached) peer
        kl_p = mutual_kl(logp_p, logp_s)  # and the peer from the (detached) student
        loss_s = ntx_s + hp.student_kl_weight * kl_s
        loss_p = ntx_p + hp.peer_kl_weight * kl_p
        return {
            "loss": loss_s + loss_p,
            "student_loss": loss_s.detach(),
            "peer_loss": loss_p.detach(),
            "ntxent_student": ntx_s.detach(),
            "ntxent_peer": ntx_p.detach(),
            "kl_student": kl_s.detach(),
            "kl_peer": kl_p.detach(),
        }

    def optimizer_groups(self):
        hp = self.hp
        return [
            OptimizerGroup(list(self.student.parameters()), hp.optimizer, hp.lr, hp.weight_decay, name="student"),
            OptimizerGroup(list(self.peer.parameters()), hp.optimizer, hp.lr, hp.weight_decay, name="peer"),
        ]

    def deployable(self) -> dict[str, nn.Module]:
        return {"student": self.student.backbone, "head": self.student.head, "peer": self.peer.backbone}
