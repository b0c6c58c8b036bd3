"""Evaluation of frozen features: weighted kNN and a linear probe (`edgedistill eval`).

Features are extracted once (eval transform: resize, centre crop, normalise) for the labelled
train and val folders. kNN: cosine similarity, the k nearest training features vote with weight
exp(sim / T) (InstDisc / DINO protocol). Linear probe: L2-regularised logistic regression on
standardised features, solved by L-BFGS (`eval.linear_solver: lbfgs`) or trained by SGD with a
cosine schedule (`sgd`); the standardisation is folded into its weights so that `backbone -> Linear`
is a deployable classifier (classifier.safetensors).

The deployed classifier must survive INT8. A probe on the pooled features of a small student
reads a tensor whose range is set by a few large channels, so one 8-bit scale over it (the INT8
classifier's input) is coarse for all the others: the demo's probe lost 3-6 points from that
alone while the INT8 backbone's features cost nothing. So `export` keeps the classifier and its
input in float by default (`--int8-classifier` quantizes them; `deploy.quantize.classifier_check`
measures the INT8 file either way), and the probe is chosen for accuracy: unless `eval.linear_weight_decay` is
set, its weight decay is the one of PROBE_WEIGHT_DECAYS with the best top-1 on 10% of the
training features held out. A run whose classifier was trained jointly with the backbone
(`supervised` with `embed_dim: 0`) keeps it: `eval` scores the probe but deploys the joint
classifier.
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

from edgedistill.runfolder import EVAL_FILE
from edgedistill.runfolder.load import (  # noqa: F401 (load_run_config, load_student_backbone: public here before)
    load_joint_classifier,
    load_peer_backbone,
    load_run_config,
    load_student_backbone,
)
from edgedistill import distributed as dist_utils
from edgedistill.config import RunConfig, apply_overrides
from edgedistill.recipe import build_config
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
    read_classifier,
    read_run_config,
    save_safetensors,
)
from edgedistill.ui import console, progress_bar
from edgedistill.fileio import write_json
from edgedistill.knn import knn_top1

log = logging.getLogger(__name__)

PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)


@dataclass
class ModelScores:
    arch: str
    params: int
    feature_dim: int
    knn_top1: float
    linear_top1: float
    extract_images_per_s: float
    probe: dict = field(default_factory=dict)
    # "probe" (deployed: the linear probe) or "joint" (deployed: the classifier trained with the backbone)
    classifier: str = "probe"
    classifier_top1: float | None = None
    # The papers' linear protocol (eval.protocol: paper), None when not run.
    paper_linear_top1: float | None = None
    paper_probe: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    run: str
    student: ModelScores
    teacher: ModelScores | None
    classes: list[str]
    n_train: int
    n_val: int
    knn_k: int
    # "frozen", or "paper" (then both linear_top1 and paper_linear_top1 are reported).
    protocol: str = "frozen"
    # DoGo's second model (peer.safetensors), scored like the student.
    peer: ModelScores | None = None
    environment: dict = field(default_factory=dict)


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


def linear_probe(train_f, train_y, num_classes: int, epochs: int, lr: float, weight_decay: float,
                 seed: int, batch_size: int = 256, solver: str = "lbfgs", max_iter: int = 1000,
                 init: nn.Linear | None = None) -> nn.Linear:
    """Train a linear classifier on frozen features; returns it with standardisation folded in.
    `solver` lbfgs: the L2-regularised multinomial logistic regression solved to convergence (full
    batch, deterministic; `max_iter` iterations at most), started from `init` (a classifier this
    function returned, e.g. for a neighbouring weight decay: the problem is convex, so the start
    changes how many iterations it takes, not where it ends, up to the tolerance) or from small
    random weights; sgd: `epochs` of minibatch SGD with momentum and a cosine schedule (the probe
    before 2026-12; on small training sets it stops far from the optimum: 77.7% against 89.6% for
    the same features and weight decay on the demo)."""
    gen = torch.Generator().manual_seed(seed)
    # Near-constant features (dead channels) would get huge weights once 1/std is folded in,
    # which wrecks INT8 ranges of the deployed classifier: floor std at 10% of the mean std.
    mean, std = train_f.mean(0), train_f.std(0)
    std = std.clamp_min(max(1e-6, 0.1 * float(std.mean())))
    x = (train_f - mean) / std
    fc = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        if init is not None and solver == "lbfgs":  # unfold: x @ W.T + b == train_f @ init.W.T + init.b
            fc.weight.copy_(init.weight * std)
            fc.bias.copy_(init.bias + init.weight @ mean)
        else:
            fc.weight.normal_(0, 0.01, generator=gen)
            fc.bias.zero_()
    if solver == "lbfgs":
        _fit_lbfgs(fc, x, train_y, weight_decay, max_iter)
    else:
        _fit_sgd(fc, x, train_y, epochs, lr, weight_decay, gen, batch_size)
    folded = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(fc.weight / std)
        folded.bias.copy_(fc.bias - (fc.weight / std) @ mean)
    return folded


def _fit_lbfgs(fc: nn.Linear, x: torch.Tensor, y: torch.Tensor, weight_decay: float, max_iter: int) -> None:
    # weight_decay / 2 * |W|^2: the penalty whose gradient SGD's weight_decay adds (the bias is free).
    opt = torch.optim.LBFGS(fc.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    # The loss's gradient in closed form (softmax - one-hot): no autograd graph per call, whose
    # overhead is much of a call on a probe-sized problem.
    targets = F.one_hot(y, fc.out_features).to(x.dtype)

    @torch.no_grad()
    def closure():
        logits = torch.addmm(fc.bias, x, fc.weight.t())
        loss = F.cross_entropy(logits, y) + 0.5 * weight_decay * fc.weight.pow(2).sum()
        residual = (logits.softmax(1) - targets) / x.shape[0]
        fc.weight.grad = torch.addmm(fc.weight, residual.t(), x, beta=weight_decay)
        fc.bias.grad = residual.sum(0)
        return loss

    opt.step(closure)


def _fit_sgd(fc: nn.Linear, x: torch.Tensor, train_y: torch.Tensor, epochs: int, lr: float, weight_decay: float,
             gen: torch.Generator, batch_size: int) -> None:
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


def paper_linear_probe(backbone: nn.Module, train: ImageFolder, val_f: torch.Tensor, val_y: torch.Tensor,
                       cfg: RunConfig, device: torch.device) -> tuple[float, dict]:
    """The papers' linear protocol (MoCo, DisCo, SEED): a linear layer on the frozen backbone's
    pooled features of random-resized-crop (scale 0.08-1) + horizontal-flip views, drawn afresh
    every epoch, BN in eval mode; SGD momentum 0.9, no weight decay, lr `paper_lr` (per 256 images)
    divided by 10 at 60% and 80% of `paper_epochs`. Scored on the centre-crop validation features
    `val_f`. Returns (top-1 percent, settings)."""
    import torchvision.transforms.v2 as T

    from edgedistill.data.torch_loader import EvalDataset, ForkSafeDataLoader

    ev = cfg.eval
    data = cfg.data
    transform = T.Compose([T.ToImage(), T.RandomResizedCrop(data.img_size, scale=(0.08, 1.0), antialias=True),
                           T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(data.mean, data.std)])
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = ForkSafeDataLoader(EvalDataset(train, transform), batch_size=ev.batch_size, shuffle=True,
                                drop_last=False, num_workers=data.workers, generator=gen)
    backbone = backbone.to(device).eval()
    fc = nn.Linear(val_f.shape[1], len(train.classes)).to(device)
    with torch.no_grad():
        fc.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(cfg.seed))
        fc.bias.zero_()
    lr = ev.paper_lr * ev.batch_size / 256
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    milestones = sorted({max(1, int(0.6 * ev.paper_epochs)), max(1, int(0.8 * ev.paper_epochs))})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    with progress_bar(ev.paper_epochs * len(loader), "paper linear protocol", enabled=dist_utils.is_main(),
                      show_loss=False) as bar:
        for _ in range(ev.paper_epochs):
            for images, target in loader:
                with torch.no_grad():
                    feats = backbone(images.to(device)).float()
                loss = F.cross_entropy(fc(feats), target.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.advance(1)
            sched.step()
    fc = fc.cpu()
    score = round(top1(fc, val_f, val_y), 3)
    return score, {"epochs": ev.paper_epochs, "lr": lr, "batch_size": ev.batch_size, "milestones": milestones,
                   "weight_decay": 0.0, "crop_scale": [0.08, 1.0]}


def choose_probe(train_f, train_y, num_classes: int, cfg, seed: int) -> tuple[nn.Linear, dict]:
    """The linear probe to deploy: `cfg.linear_weight_decay` when set, otherwise the weight decay
    of PROBE_WEIGHT_DECAYS with the best top-1 on a held-out tenth of the training features (ties
    go to the stronger decay); refit on all features."""
    fit = lambda f, y, wd, init=None: linear_probe(  # noqa: E731
        f, y, num_classes, cfg.linear_epochs, cfg.linear_lr, wd, seed, solver=cfg.linear_solver,
        max_iter=cfg.linear_max_iter, init=init)
    if cfg.linear_weight_decay is not None:
        return fit(train_f, train_y, cfg.linear_weight_decay), {"weight_decay": cfg.linear_weight_decay, "chosen": False}
    perm = torch.randperm(train_f.shape[0], generator=torch.Generator().manual_seed(seed))
    n_held = max(1, train_f.shape[0] // 10)
    held, kept = perm[:n_held], perm[n_held:]
    # Along the regularisation path, strongest decay first, each fit starting where the last ended.
    candidates, previous = {}, None
    for wd in sorted(PROBE_WEIGHT_DECAYS, reverse=True):
        candidates[wd] = previous = fit(train_f[kept], train_y[kept], wd, previous)
    scores = {wd: round(top1(candidates[wd], train_f[held], train_y[held]), 3) for wd in PROBE_WEIGHT_DECAYS}
    best = max(reversed(PROBE_WEIGHT_DECAYS), key=lambda wd: scores[wd])
    info = {"weight_decay": best, "chosen": True, "held_out": int(n_held),
            "candidates": {f"{wd:g}": {"held_out_top1": v} for wd, v in scores.items()}}
    return fit(train_f, train_y, best, candidates[best]), info


def top1(fc: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (fc(feats).argmax(1) == labels).float().mean().item()


def score_backbone(backbone: nn.Module, arch: str, train: ImageFolder, val: ImageFolder, cfg: RunConfig,
                   device: torch.device, what: str, joint: nn.Linear | None = None) -> tuple[ModelScores, nn.Linear]:
    train_f, train_y, ips = extract_features(backbone, train, cfg, device, f"{what} train")
    val_f, val_y, _ = extract_features(backbone, val, cfg, device, f"{what} val")
    n_cls = len(train.classes)
    knn = knn_top1(train_f, train_y, val_f, val_y, cfg.eval.knn_k, cfg.eval.knn_temperature, n_cls)
    fc, probe = choose_probe(train_f, train_y, n_cls, cfg.eval, cfg.seed)
    scores = ModelScores(arch, count_params(backbone), train_f.shape[1], round(knn, 3),
                         round(top1(fc, val_f, val_y), 3), round(ips, 1), probe)
    log.info("%s %s: kNN top-1 %.2f%%, linear top-1 %.2f%% (probe weight decay %g)", what, arch, scores.knn_top1,
             scores.linear_top1, probe["weight_decay"])
    if cfg.eval.protocol == "paper":
        scores.paper_linear_top1, scores.paper_probe = paper_linear_probe(backbone, train, val_f, val_y, cfg, device)
        log.info("%s %s: linear top-1 %.2f%% with the papers' protocol (%d epochs of augmented views)", what, arch,
                 scores.paper_linear_top1, cfg.eval.paper_epochs)
    if joint is not None:
        scores.classifier, scores.classifier_top1 = "joint", round(top1(joint, val_f, val_y), 3)
        log.info("%s %s: jointly trained classifier top-1 %.2f%% (kept as the deployed classifier)", what, arch,
                 scores.classifier_top1)
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
    joint = load_joint_classifier(run)
    student, fc = score_backbone(load_student_backbone(run, cfg), cfg.student.arch, train, val, cfg, device, "student",
                                 joint)
    if dist_utils.is_main() and joint is None:
        save_safetensors({"weight": fc.weight, "bias": fc.bias}, run / CLASSIFIER_FILE,
                         {"classes": json.dumps(train.classes), "linear_top1": str(student.linear_top1),
                          "source": "probe", "weight_decay": str(student.probe["weight_decay"])})
    teacher = None
    if with_teacher:
        if cfg.teacher is None:
            raise UserError(f"{run} was trained without a teacher: drop --teacher")
        teacher, _ = score_backbone(load_encoder(cfg.teacher).backbone, cfg.teacher.arch, train, val, cfg, device, "teacher")
    peer = None
    peer_backbone = load_peer_backbone(run, cfg)  # DoGo's second model, scored like the student
    if peer_backbone is not None:
        peer, _ = score_backbone(peer_backbone, cfg.method.peer.arch, train, val, cfg, device, "peer")
    result = EvalResult(str(run), student, teacher, train.classes, len(train), len(val), cfg.eval.knn_k,
                        cfg.eval.protocol, peer, environment())
    if dist_utils.is_main():
        write_json(run / EVAL_FILE, asdict(result))
    dist_utils.barrier()
    return result


def print_eval(result: EvalResult) -> None:
    from rich.table import Table

    table = Table(title=f"{result.run}  ({result.n_train} train / {result.n_val} val images)")
    paper = result.protocol == "paper"
    columns = ["model", "arch", "params (M)", f"kNN top-1 (k={result.knn_k})", "linear top-1 (frozen)"]
    for col in columns + (["linear top-1 (paper)"] if paper else []):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, s in (("student", result.student), ("peer", result.peer), ("teacher", result.teacher)):
        if s is not None:
            row = [name, s.arch, f"{s.params / 1e6:.2f}", f"{s.knn_top1:.2f}", f"{s.linear_top1:.2f}"]
            if paper:
                row.append("-" if s.paper_linear_top1 is None else f"{s.paper_linear_top1:.2f}")
            table.add_row(*row)
    console.print(table)
