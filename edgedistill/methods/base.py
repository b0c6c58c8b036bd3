"""The interface every training method implements.

A method is an `nn.Module` whose `forward(views, labels)` runs one training step's computation
and returns named losses ("loss" is the one to minimise). The trainer owns everything else
(data, optimisation, precision, checkpoints, logging), so adding a method touches only its file:

- `Config`: a dataclass of the method's hyper-parameters (the recipe's `method:` section);
- `num_views`: augmented views per image the loader must produce;
- `augmentation`: the loaders' view recipe, "mocov2" (aug-plus) or "simclr";
- `optimizer_groups()`: parameter groups, each optionally with its own optimizer settings
  (DoGo trains two peers with two optimizers);
- `deployable()`: the modules saved at the end (the student backbone, and its projection head
  so the run can serve as a teacher later); everything else (teacher, momentum encoder, queue)
  is training machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from edgedistill.config import RunConfig
from edgedistill.data.torch_loader import Augmentation


@dataclass
class MethodConfig:
    name: str = ""


@dataclass
class OptimizerGroup:
    """Parameters stepped by one optimizer; None fields fall back to the recipe's `train:`."""

    params: list[nn.Parameter]
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    name: str = "student"
    extra: dict = field(default_factory=dict)


class Method(nn.Module):
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    num_views: ClassVar[int] = 2
    augmentation: ClassVar[Augmentation] = "mocov2"
    needs_teacher: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.hp = cfg.method
        self.num_classes = num_classes

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def optimizer_groups(self) -> list[OptimizerGroup]:
        return [OptimizerGroup([p for p in self.parameters() if p.requires_grad])]

    def deployable(self) -> dict[str, nn.Module]:
        """Modules saved at the end of training, by role: "student" (the backbone that `eval`
        and `export` use) -> student.safetensors, "head" -> head.safetensors, any other role R
        (e.g. DoGo's second peer) -> R.safetensors."""
        raise NotImplementedError

    def prepare(self, run_dir, folder, device: torch.device, channels_last: bool = False, steps: int | None = None) -> None:
        """Called once by the trainer before training (and again on resume) with the run folder and
        the training images: where a method computes or reloads data-dependent state that is not
        learnt (e.g. the teacher centre). `channels_last`: the memory format the training step will
        run in (what a measurement of its speed must use); `steps`: the run's planned optimizer
        steps (None: unknown). Default: nothing."""

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes not saved in training checkpoints (rebuilt from their source)."""
        return ()
