"""Supervised cross-entropy on one view: a quick way to obtain a teacher (used by `demo`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from edgedistill.methods import register
from edgedistill.methods.base import Method, MethodConfig
from edgedistill.models import create_backbone, feature_dim


@dataclass
class SupervisedConfig(MethodConfig):
    label_smoothing: float = 0.0


@register("supervised")
class Supervised(Method):
    Config = SupervisedConfig
    num_views = 1

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.backbone = create_backbone(cfg.student)
        self.fc = nn.Linear(feature_dim(self.backbone), num_classes)

    def forward(self, views, labels):
        logits = self.fc(self.backbone(views[0]))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hp.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "train_acc": acc.detach()}

    def deployable(self):
        return {"student": self.backbone}
