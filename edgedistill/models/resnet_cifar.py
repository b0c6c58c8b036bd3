"""The He et al. (2016) CIFAR ResNets (20/32/44/56/110), registered with timm.

3x3 stem with 16 channels, three stages of 16/32/64 channels with n basic blocks each, "option A"
shortcuts (stride-2 subsampling plus zero-padded channels, no projection convolution), global
average pooling, `linear` 64 -> classes. Module names follow the widely used reference
implementation so its checkpoints (the ones in ../shared/teachers/) load without renaming.
After `import edgedistill.models`, `timm.create_model("resnet56_cifar", num_classes=0)` works like
any timm model.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model


class _ShortcutA(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (parameter-free)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, **_ignored):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = self.head_hidden_size = 64
        self.num_classes = num_classes
        self.linear = nn.Linear(64, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (3, 32, 32),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "classifier": "linear",
            "first_conv": "conv1",
            "num_classes": num_classes,
        }
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def reset_classifier(self, num_classes: int, *_, **__):
        self.num_classes = num_classes
        self.linear = nn.Linear(64, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x, pre_logits: bool = False):
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.linear(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _make(depth):
    def fn(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError("CIFAR ResNets have no hub weights: pass a local checkpoint instead")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        return CifarResNet(depth, **kwargs)

    fn.__name__ = f"resnet{depth}_cifar"
    fn.__doc__ = f"He et al. CIFAR ResNet-{depth} (option A shortcuts)."
    fn.__module__ = __name__
    return register_model(fn)


resnet20_cifar = _make(20)
resnet32_cifar = _make(32)
resnet44_cifar = _make(44)
resnet56_cifar = _make(56)
resnet110_cifar = _make(110)
