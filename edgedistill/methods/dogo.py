"""DoGo, "Distill on the Go" (Bhat et al., CVPR-W 2021): two peers learn from scratch together.

No pretrained teacher. The student (`student:` in the recipe) and a peer (`method.peer`) each
train with SimCLR's NT-Xent (T = 0.5), each through its own projection head Linear(feat, 512, no
bias) - BN - ReLU - Linear(512, 128) and its own optimizer (Adam, lr 3e-4, weight decay 1e-6 by
default; the reference keeps the lr constant: `train.schedule: constant`). Mutual distillation:
for each model, P = the row-softmax of the N x N cosine-similarity matrix between its two views'
embeddings / 0.1, and

    loss_student = NT-Xent(student) + student_kl_weight * KL(P_peer.detach() || P_student)
    loss_peer    = NT-Xent(peer)    + peer_kl_weight    * KL(P_student.detach() || P_peer)

with the KL averaged over the N^2 entries (`losses.mutual_kl`), hence the large weight. The
trainer minimises their sum: the detached targets keep the two graphs apart, so each optimizer
sees exactly its own model's loss.

Views, as the paper and the reference code (NeurAI-Lab/DoGo, its MultiTransform) run it: SimCLR's
augmentation (crop scale 0.08-1, colour jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur
only at >= 96 px), and each model gets its own pair of views of every image: the loader yields
four views, the student takes views 0 and 1, the peer views 2 and 3. The two similarity matrices
therefore compare the same images under different augmentations.

Weights: the reference (`util/train_util.py`, `criterion_weight: [1, 1, 100, 1]`) puts 100 on the
KL of one model and 1 on the other's. With the mean-over-N^2 reduction a weight of 1 is a faint
signal (1/N of the per-row KL), so the model with the 100 is the one that is effectively
distilled into. Here that is the student: the small, deployed model learns from the larger peer
(`student_kl_weight: 100`), and the peer, which should be the larger model (the recipes pair a
MobileNetV3-Small student with a MobileNetV3-Large peer), takes the 1. Swap the two weights to
distil the other way.

Both backbones are saved: student.safetensors (what `eval` and `export` use), head.safetensors
(the student's projection head) and peer.safetensors (the peer backbone). Under DDP the NT-Xent
and the similarity matrices use the local batch only (the reference is single-process).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from edgedistill.config import ModelConfig
from edgedistill.errors import UserError
from edgedistill.losses import mutual_kl, nt_xent, view_similarity_log_probs
from edgedistill.methods.registry import register
from edgedistill.methods.base import Method, OptimizerGroup
from edgedistill.methods.simclr import SimCLRConfig, check_optimizer, embed_pair, simclr_encoder


@dataclass
class DoGoConfig(SimCLRConfig):
    # The second model, trained from scratch beside the student (no checkpoint); make it the
    # larger of the two (the student learns from it).
    peer: ModelConfig = field(default_factory=lambda: ModelConfig(arch="mobilenetv3_large_100"))
    # Temperature of the view-to-view similarity softmax that the peers match.
    kl_temperature: float = 0.1
    # KL weights (mean over N^2 entries): the reference's 100 on the model that learns from the
    # other (the student), 1 on the other (the peer).
    student_kl_weight: float = 100.0
    peer_kl_weight: float = 1.0


@register("dogo")
class DoGo(Method):
    Config = DoGoConfig
    # A pair of views per model: student (0, 1), peer (2, 3).
    num_views = 4
    augmentation = "simclr"

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        hp = self.hp
        if hp.peer.checkpoint:
            raise UserError("method.peer.checkpoint: DoGo trains the peer from scratch; remove the checkpoint")
        check_optimizer(hp)
        self.student = simclr_encoder(cfg.student, hp)
        self.peer = simclr_encoder(hp.peer, hp)

    def forward(self, views, labels):
        hp = self.hp
        s1, s2 = embed_pair(self.student, views[0], views[1])
        p1, p2 = embed_pair(self.peer, views[2], views[3])
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
