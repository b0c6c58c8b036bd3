"""SimCLR (Chen et al. 2020): one model, NT-Xent between two augmented views of each image.

DoGo's own baseline: exactly DoGo's per-model loss with the mutual term off and no peer. The
encoder is the backbone and DoGo's projection head Linear(feat, 512, no bias) - BN - ReLU -
Linear(512, 128); NT-Xent with T = 0.5 over the 2N views of the batch; SimCLR's augmentation
(crop scale 0.08-1, colour jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur only at
>= 96 px); Adam 3e-4, weight decay 1e-6 by default, as the DoGo reference runs it (pair with
`train.schedule: constant` for its constant learning rate). Under DDP the NT-Xent uses the local
batch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from edgedistill.config import ModelConfig
from edgedistill.errors import UserError
from edgedistill.losses import nt_xent
from edgedistill.methods.registry import register
from edgedistill.methods.base import Method, MethodConfig, OptimizerGroup
from edgedistill.models import Encoder, create_backbone, feature_dim, simclr_head

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class SimCLRConfig(MethodConfig):
    # NT-Xent temperature.
    temperature: float = 0.5
    proj_hidden: int = 512
    proj_dim: int = 128
    # The model's optimizer; None falls back to the recipe's `train:` section. lr is for a batch
    # of 256 and scales linearly with train.batch_size, like every lr in edgedistill.
    optimizer: str | None = "adam"
    lr: float | None = 3e-4
    weight_decay: float | None = 1e-6


def check_optimizer(hp: SimCLRConfig) -> None:
    if hp.optimizer is not None and hp.optimizer not in OPTIMIZERS:
        raise UserError(f"method.optimizer: {hp.optimizer!r} is not one of {', '.join(OPTIMIZERS)} "
                        "(or leave it unset to use train.optimizer)")


def simclr_encoder(model_cfg: ModelConfig, hp: SimCLRConfig) -> Encoder:
    """A backbone with SimCLR/DoGo's projection head."""
    backbone = create_backbone(model_cfg)
    return Encoder(backbone, simclr_head(feature_dim(backbone), hp.proj_hidden, hp.proj_dim))


def embed_pair(encoder: Encoder, x1, x2):
    """L2-normalised fp32 embeddings of two views."""
    return F.normalize(encoder(x1).float(), dim=1), F.normalize(encoder(x2).float(), dim=1)


@register("simclr")
class SimCLR(Method):
    Config = SimCLRConfig
    num_views = 2
    augmentation = "simclr"

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        check_optimizer(self.hp)
        self.student = simclr_encoder(cfg.student, self.hp)

    def forward(self, views, labels):
        z1, z2 = embed_pair(self.student, views[0], views[1])
        loss = nt_xent(z1, z2, self.hp.temperature)
        return {"loss": loss, "ntxent_student": loss.detach()}

    def optimizer_groups(self):
        hp = self.hp
        return [OptimizerGroup(list(self.student.parameters()), hp.optimizer, hp.lr, hp.weight_decay, name="student")]

    def deployable(self) -> dict[str, nn.Module]:
        return {"student": self.student.backbone, "head": self.student.head}
