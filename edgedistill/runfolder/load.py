"""The models of a run folder: its recipe as a config, the student backbone, the classifier,
DoGo's peer. One reader, shared by `eval`, `export`, `bench` and `report` (none of them imports
the evaluation to read a run)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from edgedistill.config import RunConfig
from edgedistill.errors import UserError
from edgedistill.runfolder import CLASSIFIER_FILE, CONFIG_FILE, PEER_FILE, STUDENT_FILE, read_config

log = logging.getLogger(__name__)


def load_run_config(run: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run's config.yaml (plus `--set` overrides) as a validated config."""
    from edgedistill.config import apply_overrides
    from edgedistill.recipe import build_config

    data = apply_overrides(read_config(run), overrides or [])
    return build_config(data, str(Path(run) / CONFIG_FILE))


def load_student_backbone(run: str | Path, cfg: RunConfig) -> nn.Module:
    """student.safetensors into the recipe's backbone, in eval mode."""
    from safetensors.torch import load_file

    from edgedistill.models import create_backbone, load_into

    path = Path(run) / STUDENT_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the run did not finish; `edgedistill train --resume` it first")
    backbone = create_backbone(cfg.student)
    load_into(backbone, load_file(str(path)), str(path), allow_mismatch=False)
    return backbone.eval()


def load_classifier(run: str | Path) -> tuple[nn.Linear, dict[str, str]] | None:
    """classifier.safetensors as (nn.Linear, its metadata), None when the run has none."""
    from edgedistill.models import read_classifier

    path = Path(run) / CLASSIFIER_FILE
    return read_classifier(path) if path.is_file() else None


def load_joint_classifier(run: str | Path) -> nn.Linear | None:
    """The classifier a run trained with its backbone (classifier.safetensors marked `joint`)."""
    found = load_classifier(run)
    return found[0] if found is not None and found[1].get("source") == "joint" else None


def load_run_classifier(run_dir: str | Path) -> nn.Module:
    """backbone (student.safetensors) + linear classifier (classifier.safetensors) of an evaluated run."""
    from edgedistill.models import Classifier

    run_dir = Path(run_dir)
    found = load_classifier(run_dir)
    if found is None:
        raise UserError(f"{run_dir / CLASSIFIER_FILE} is missing: run `edgedistill eval {run_dir}` first")
    backbone = load_student_backbone(run_dir, load_run_config(run_dir))
    return Classifier(backbone, found[0]).eval()


def load_peer_backbone(run: str | Path, cfg: RunConfig) -> nn.Module | None:
    """DoGo's peer (peer.safetensors into `method.peer`'s backbone), None for other runs."""
    from safetensors.torch import load_file

    from edgedistill.models import create_backbone, load_into

    path = Path(run) / PEER_FILE
    peer_cfg = getattr(cfg.method, "peer", None)
    if not path.is_file() or peer_cfg is None:
        return None
    backbone = create_backbone(peer_cfg)
    load_into(backbone, load_file(str(path)), str(path), allow_mismatch=False)
    return backbone.eval()
