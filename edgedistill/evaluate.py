"""Evaluation of frozen features: weighted kNN and a linear probe (`edgedistill eval`).

Features are extracted once (eval transform: resize, centre crop, normalise) for the labelled
train and val folders. kNN: cosine similarity, the k nearest training features vote with weight
exp(sim / T) (InstDisc / DINO protocol). Linear probe: a linear layer on standardised features,
trained with SGD + cosine schedule; the standardisation is folded into its weights so that
`backbone -> Linear` is a deployable classifier (classifier.safetensors).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from edgedistill import distributed as dist_utils
from edgedistill.config import RunConfig, apply_overrides, build_config
from edgedistill.data import ImageFolder, train_folder, val_folder
from edgedistill.data.torch_loader import eval_loader
from edgedistill.envinfo import environment, resolve_device, seed_everything
from edgedistill.errors import UserError
from edgedistill.models import (
    CLASSIFIER_FILE,
    STUDENT_FILE,
    count_params,
    create_backbone,
    feature_dim,
    load_encoder,
    load_into,
    read_run_config,
    save_safetensors,
)
from edgedistill.ui import console, progress_bar

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


@dataclass
class ModelScores:
    arch: str
    params: int
    feature_dim: int
    knn_top1: float
    linear_top1: float
    extract_images_per_s: float


@dataclass
class EvalResult:
    run: str
    student: ModelScores
    teacher: ModelScores | None
    classes: list[str]
    n_train: int
    n_val: int
    knn_k: int
    environment: dict = field(default_factory=dict)


def load_run_config(run: Path, overrides: list[str] | None = None) -> RunConfig:
    data = apply_overrides(read_run_config(run), overrides or [])
    return build_config(data, str(Path(run) / "config.yaml"))


def load_student_backbone(run: Path, cfg: RunConfig) -> nn.Module:
    path = Path(run) / STUDENT_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the run did not finish; `edgedistill train --resume` it first")
    backbone = create_backbone(cfg.student)
    load_into(backbone, load_file(str(path)), str(path), allow_mismatch=False)
    return backbone.eval()


@torch.no_grad()
def extract_features(backbone: nn.Module, folder: ImageFolder, cfg: RunConfig, device: torch.device,
                     what: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Features and labels of every image in `folder`, each counted exactly once.

    Under torchrun each rank takes a contiguous shard and the shards are gathered in order,
    so the result is identical to the single-process one.
    """
    n, rank, world = len(folder), dist_utils.rank(), dist_utils.world_size()
    per = math.ceil(n / world)
    indices = range(rank * per, min(n, (rank + 1) * per))
    loader = eval_loader(folder, cfg.data, cfg.eval.batch_size, indices)
    backbone = backbone.to(device).eval()
    feats, labels = [], []
    start = time.perf_counter()
    with progress_bar(len(loader), f"features {what}", enabled=dist_utils.is_main(), show_loss=False) as bar:
        for images, target in loader:
            feats.append(backbone(images.to(device)).float().cpu())
            labels.append(target)
            bar.advance(1)
    ips = len(indices) / max(time.perf_counter() - start, 1e-9)
    # An empty shard (fewer images than ranks) still needs the feature width for the gather.
    feats_t = torch.cat(feats) if feats else torch.empty(0, feature_dim(backbone))
    labels_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    if world > 1:
        feats_t, labels_t = dist_utils.gather_shards(feats_t, labels_t, per)
        feats_t, labels_t = feats_t[:n], labels_t[:n]
    return feats_t, labels_t, ips


def knn_top1(train_f, train_y, val_f, val_y, k: int, temperature: float, num_classes: int, chunk: int = 512) -> float:
    """Weighted kNN top-1 (percent) on cosine similarity."""
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    k = min(k, train_f.shape[0])
    correct = 0
    for start in range(0, val_f.shape[0], chunk):
        sim = val_f[start : start + chunk] @ train_f.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == val_y[start : start + chunk]).sum().item()
    return 100.0 * correct / val_f.shape[0]


def linear_probe(train_f, train_y, num_classes: int, epochs: int, lr: float, weight_decay: float,
                 seed: int, batch_size: int = 256) -> nn.Linear:
    """Train a linear classifier on frozen features; returns it with standardisation folded in."""
    gen = torch.Generator().manual_seed(seed)
    # Near-constant features (dead channels) would get huge weights once 1/std is folded in,
    # which wrecks INT8 ranges of the deployed classifier: floor std at 10% of the mean std.
    mean, std = train_f.mean(0), train_f.std(0)
    std = std.clamp_min(max(1e-6, 0.1 * float(std.mean())))
    x = (train_f - mean) / std
    fc = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        fc.weight.normal_(0, 0.01, generator=gen)
        fc.bias.zero_()
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(fc(x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    folded = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(fc.weight / std)
        folded.bias.copy_(fc.bias - (fc.weight / std) @ mean)
    return folded


def top1(fc: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (fc(feats).argmax(1) == labels).float().mean().item()


def score_backbone(backbone: nn.Module, arch: str, train: ImageFolder, val: ImageFolder, cfg: RunConfig,
                   device: torch.device, what: str) -> tuple[ModelScores, nn.Linear]:
    train_f, train_y, ips = extract_features(backbone, train, cfg, device, f"{what} train")
    val_f, val_y, _ = extract_features(backbone, val, cfg, device, f"{what} val")
    n_cls = len(train.classes)
    knn = knn_top1(train_f, train_y, val_f, val_y, cfg.eval.knn_k, cfg.eval.knn_temperature, n_cls)
    fc = linear_probe(train_f, train_y, n_cls, cfg.eval.linear_epochs, cfg.eval.linear_lr,
                      cfg.eval.linear_weight_decay, cfg.seed)
    scores = ModelScores(arch, count_params(backbone), train_f.shape[1], round(knn, 3),
                         round(top1(fc, val_f, val_y), 3), round(ips, 1))
    log.info("%s %s: kNN top-1 %.2f%%, linear top-1 %.2f%%", what, arch, scores.knn_top1, scores.linear_top1)
    return scores, fc


def evaluate_run(run: str | Path, with_teacher: bool = False, overrides: list[str] | None = None) -> EvalResult:
    run = Path(run)
    cfg = load_run_config(run, overrides)
    seed_everything(cfg.seed)
    # Under torchrun every rank extracts the features of its shard (see extract_features).
    distributed = dist_utils.init_from_env(cfg.train.device)
    device = dist_utils.device_for_rank(cfg.train.device) if distributed else resolve_device(cfg.train.device)
    # The kNN bank and the probe use every labelled training image (no max_images subset).
    cfg.data.max_images = None
    with dist_utils.main_process_first():
        train, val = train_folder(cfg.data, cfg.seed), val_folder(cfg.data)
    if train.classes != val.classes:
        raise UserError(f"class folders differ between {train.root} and {val.root}: they must hold the same classes")
    student, fc = score_backbone(load_student_backbone(run, cfg), cfg.student.arch, train, val, cfg, device, "student")
    if dist_utils.is_main():
        save_safetensors({"weight": fc.weight, "bias": fc.bias}, run / CLASSIFIER_FILE,
                         {"classes": json.dumps(train.classes), "linear_top1": str(student.linear_top1)})
    teacher = None
    if with_teacher:
        if cfg.teacher is None:
            raise UserError(f"{run} was trained without a teacher: drop --teacher")
        teacher, _ = score_backbone(load_encoder(cfg.teacher).backbone, cfg.teacher.arch, train, val, cfg, device, "teacher")
    result = EvalResult(str(run), student, teacher, train.classes, len(train), len(val), cfg.eval.knn_k, environment())
    if dist_utils.is_main():
        (run / EVAL_FILE).write_text(json.dumps(asdict(result), indent=2))
    dist_utils.barrier()
    return result


def print_eval(result: EvalResult) -> None:
    from rich.table import Table

    table = Table(title=f"{result.run}  ({result.n_train} train / {result.n_val} val images)")
    for col in ("model", "arch", "params (M)", f"kNN top-1 (k={result.knn_k})", "linear top-1"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, s in (("student", result.student), ("teacher", result.teacher)):
        if s is not None:
            table.add_row(name, s.arch, f"{s.params / 1e6:.2f}", f"{s.knn_top1:.2f}", f"{s.linear_top1:.2f}")
    console.print(table)
