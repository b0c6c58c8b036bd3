"""Backbones (timm, plus the registered CIFAR ResNets), projection heads and encoders."""

from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn

from edgedistill.config import ModelConfig
from edgedistill.errors import UserError
from edgedistill.models import resnet_cifar  # noqa: F401  (registers resnet*_cifar with timm)


def _unknown_arch(arch: str) -> UserError:
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else "; see `timm.list_models()`"
    return UserError(f"unknown architecture {arch!r}{hint}")


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm model without classifier: `model(x)` returns pooled features [N, feature_dim].

    Weights are never downloaded (pretrained=False); they come from local checkpoints.
    """
    if not timm.is_model(cfg.arch):
        raise _unknown_arch(cfg.arch)
    model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    if cfg.stem_stride is not None:
        set_stem_stride(model, cfg.stem_stride)
    return model


def feature_dim(backbone: nn.Module) -> int:
    # MobileNetV3 has a conv head after pooling: its output width is head_hidden_size.
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def set_stem_stride(model: nn.Module, stride: int) -> None:
    """Change the first convolution's stride (e.g. 1 for 32x32 inputs); parameters unchanged.

    For ResNets with a stride-1 stem the max-pool is removed too (the usual CIFAR variant).
    """
    first = model.pretrained_cfg.get("first_conv") or "conv1"
    conv = model.get_submodule(first if isinstance(first, str) else first[0])
    if not isinstance(conv, nn.Conv2d):
        raise UserError(f"cannot set stem_stride for {type(model).__name__}: first conv {first!r} not found")
    conv.stride = (stride, stride)
    if stride == 1 and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2 projection MLP: Linear - ReLU - Linear (keys 0.* and 2.*, as MoCo's `fc`)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def simclr_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """DoGo/SimCLR projection head: Linear(no bias) - BN - ReLU - Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


def head_from_state(state: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    """Rebuild a saved projection head (MoCo MLP or SimCLR/DoGo head) from its state dict."""
    if {"0.weight", "1.running_mean", "3.weight"} <= set(state):
        head = simclr_head(state["0.weight"].shape[1], state["0.weight"].shape[0], state["3.weight"].shape[0])
    elif {"0.weight", "2.weight"} <= set(state):
        head = projection_head(state["0.weight"].shape[1], state["0.weight"].shape[0], state["2.weight"].shape[0])
    else:
        from edgedistill.errors import UserError

        raise UserError(f"{source}: unrecognised projection head (keys {', '.join(sorted(state)[:6])})")
    head.load_state_dict(state)
    return head


class Encoder(nn.Module):
    """Backbone followed by an optional projection head; `embed` returns the head output."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()

    @property
    def out_dim(self) -> int:
        if isinstance(self.head, nn.Sequential):
            return self.head[-1].out_features
        return feature_dim(self.backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Classifier(nn.Module):
    """Backbone + linear classifier: the deployable student (`edgedistill export` input)."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
