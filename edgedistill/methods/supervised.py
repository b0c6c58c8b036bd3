"""Supervised cross-entropy on one view: a quick way to obtain a teacher (used by `demo`).

With `embed_dim > 0` the classifier sits on a projection MLP (backbone -> MLP -> embedding ->
linear), and the run saves that MLP as head.safetensors. A run folder used as a DisCo/SEED
teacher then provides the MLP output as its embedding: centred and class-discriminative, unlike
pooled ReLU features whose normalised vectors all point into one orthant (measured on the demo's
digits: mean pairwise cosine 0.29 for the embedding against 0.82 for pooled features), which
leaves the student little to distinguish.

With `embed_dim: 0` the classifier sits on the pooled features and the run also saves it as
classifier.safetensors (marked `source: joint`): the deployable student for `export`, trained
with the backbone. Used to train the students of the INT8 quality table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from edgedistill.methods.registry import register
from edgedistill.methods.base import Method, MethodConfig
from edgedistill.models import create_backbone, feature_dim, projection_head


@dataclass
class SupervisedConfig(MethodConfig):
    label_smoothing: float = 0.0
    # Width of the embedding the classifier sits on; 0 = classifier on the pooled features.
    embed_dim: int = 128


@register("supervised")
class Supervised(Method):
    Config = SupervisedConfig
    num_views = 1

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.backbone = create_backbone(cfg.student)
        width = feature_dim(self.backbone)
        embed = self.hp.embed_dim
        self.head = projection_head(width, width, embed) if embed else nn.Identity()
        self.fc = nn.Linear(embed or width, num_classes)

    def forward(self, views, labels):
        logits = self.fc(self.head(self.backbone(views[0])))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hp.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "train_acc": acc.detach()}

    def deployable(self):
        parts = {"student": self.backbone, "head": self.head}
        if not self.hp.embed_dim:
            # The fc trained jointly with the backbone is the deployable classifier: `eval` keeps it
            # (a probe fit afterwards on frozen features amplifies INT8 noise far more).
            parts["classifier"] = self.fc
        return parts
