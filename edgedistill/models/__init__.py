"""Backbones, projection heads, encoders and checkpoint loading."""

from edgedistill.models.backbones import (
    Classifier,
    Encoder,
    count_params,
    create_backbone,
    feature_dim,
    head_from_state,
    projection_head,
    simclr_head,
)
from edgedistill.models.checkpoint import (
    CLASSIFIER_FILE,
    HEAD_FILE,
    STUDENT_FILE,
    load_encoder,
    load_into,
    read_classifier,
    read_run_config,
    save_safetensors,
    save_torch,
)

__all__ = [
    "CLASSIFIER_FILE",
    "HEAD_FILE",
    "STUDENT_FILE",
    "Classifier",
    "Encoder",
    "count_params",
    "create_backbone",
    "feature_dim",
    "load_encoder",
    "load_into",
    "head_from_state",
    "projection_head",
    "simclr_head",
    "read_classifier",
    "read_run_config",
    "save_safetensors",
    "save_torch",
]
