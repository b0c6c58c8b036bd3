"""The training loop shared by every method.

It writes the run folder (the contract `eval`, `export` and `report` build on): config.yaml,
metrics.jsonl, train.log, checkpoint.pt, student.safetensors, head.safetensors, run.json and, per
method, peer.safetensors / teacher_center.json / tensorboard/. `edgedistill.runfolder.RUN_FOLDER`
is the one listing of those files with what each holds.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from edgedistill.runfolder import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE, METRICS_FILE, RUN_FILE, TENSORBOARD_DIR
from edgedistill import distributed as dist_utils
from edgedistill.config import RunConfig, config_to_yaml, to_dict
from edgedistill.data import build_train_loader, train_folder
from edgedistill.envinfo import environment, resolve_device, seed_everything
from edgedistill.errors import TrainingDiverged, UserError
from edgedistill.methods import create_method, method_class
from edgedistill.methods.base import Method
from edgedistill.models import CLASSIFIER_FILE, HEAD_FILE, STUDENT_FILE, save_safetensors, save_torch
from edgedistill.models.checkpoint import load_torch_file
from edgedistill.models.small_map_conv import use_small_map_grad
from edgedistill.ui import progress_bar, setup_logging
from edgedistill.fileio import write_json, write_text

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    loader: str
    images_per_s: float
    wall_s: float
    final_losses: dict


def run_dir_for(cfg: RunConfig, out: str | Path | None) -> Path:
    return Path(out) if out else Path(cfg.out_dir) / cfg.name


def amp_dtype_for(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that `train.precision` gives on `device` (None: fp32, no autocast)."""
    precision = cfg.train.precision
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


# Where train.channels_last auto turns NHWC on: measured faster there (bench/memory_format.py).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


def use_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    """Whether `train.channels_last` puts the method and its batches in channels_last memory format on `device`."""
    return cfg.train.channels_last == "true" or (cfg.train.channels_last == "auto" and device.type in CHANNELS_LAST_DEVICES)


# config.Optimizer -> its torch class (a method's optimizer group may name one too).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                                                      "adamw": torch.optim.AdamW}


def build_optimizers(method: Method, cfg: RunConfig, world: int) -> list[torch.optim.Optimizer]:
    """One optimizer per parameter group; lr is given for a batch of 256 and scaled linearly."""
    scale = cfg.train.batch_size * world / 256
    optimizers = []
    for group in method.optimizer_groups():
        kind = group.optimizer or cfg.train.optimizer
        lr = (group.lr if group.lr is not None else cfg.train.lr) * scale
        wd = group.weight_decay if group.weight_decay is not None else cfg.train.weight_decay
        if kind not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {kind!r} ({', '.join(OPTIMIZERS)})")
        extra = {"momentum": cfg.train.sgd_momentum} if kind == "sgd" else {}
        optimizers.append(OPTIMIZERS[kind](group.params, lr=lr, weight_decay=wd, **extra, **group.extra))
    return optimizers


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str):
    """Per-step lr schedule: linear warm-up from lr/warmup to lr over `warmup` steps, then cosine
    decay to zero by step `total` ("cosine") or the base lr throughout ("constant")."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    warmup = min(warmup, total)
    if schedule == "constant":
        if warmup <= 1:
            return ConstantLR(optimizer, factor=1.0, total_iters=0)
        return LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    decay = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0)
    if warmup == 0:
        return decay
    ramp = (ConstantLR(optimizer, factor=1.0, total_iters=0) if warmup == 1
            else LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1))
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


@dataclass
class TrainState:
    """What a training step needs besides the model and the batch (built by `setup_training`)."""

    device: torch.device
    channels_last: bool
    amp_dtype: torch.dtype | None  # None: fp32, no autocast
    optimizers: list[torch.optim.Optimizer]
    schedulers: list
    scaler: torch.amp.GradScaler | None  # fp16 only

    @property
    def lr(self) -> float:
        """The learning rate the next step uses (of the first parameter group, as logged)."""
        return self.optimizers[0].param_groups[0]["lr"]

    def autocast(self):
        """The forward's precision context."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def prepare_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batch's views in the memory format of the method."""
        if self.channels_last:
            return [view.contiguous(memory_format=torch.channels_last) for view in views]
        return views


def setup_training(cfg: RunConfig, method: Method, device: torch.device, world: int, total_steps: int) -> TrainState:
    """Set `method` (already on `device`) up for training: memory format, optimizers, lr schedulers over `total_steps` and the fp16 grad scaler."""
    channels_last = use_channels_last(cfg, device)
    if channels_last:
        method.to(memory_format=torch.channels_last)  # in place: the parameters stay the same objects
    if cfg.train.cpu_small_map_grad and device.type == "cpu":
        use_small_map_grad(method)  # in place too
    optimizers = build_optimizers(method, cfg, world)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    schedulers = [build_scheduler(opt, total_steps, cfg.train.warmup_steps, cfg.train.schedule) for opt in optimizers]
    return TrainState(device, channels_last, amp_dtype, optimizers, schedulers, scaler)


def train_step(model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor, state: TrainState) -> dict[str, torch.Tensor]:
    """One training step: forward under autocast, backward (through the grad scaler in fp16), every optimizer's step, every lr scheduler's step. `model` is the method, or its DDP / torch.compile wrapper. Returns the step's losses as tensors: reading them (`float`) is a host sync on the GPU, left to the caller."""
    views = state.prepare_views(views)
    with state.autocast():
        losses = model(views, labels)
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(losses["loss"]).backward()
        for opt in state.optimizers:
            state.scaler.step(opt)
        state.scaler.update()
    else:
        losses["loss"].backward()
        for opt in state.optimizers:
            opt.step()
    for sched in state.schedulers:
        sched.step()
    return losses


def _trainable_state(method: Method) -> dict:
    frozen = method.frozen_prefixes()
    return {k: v for k, v in method.state_dict().items() if not k.startswith(frozen)}


def _cuda_device(method: nn.Module) -> torch.device | None:
    """The CUDA device `method` trains on (None on the CPU)."""
    param = next(iter(method.parameters()), None)
    return param.device if param is not None and param.device.type == "cuda" else None


def _save_checkpoint(path: Path, method, optimizers, scaler, step, epoch, step_in_epoch, cfg, schedulers=(),
                     resumes=()) -> None:
    cuda = _cuda_device(method)
    save_torch(
        {
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "method": _trainable_state(method),
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": torch.get_rng_state(),
            # The generator of the training GPU (dropout, GPU-side augmentation draws): without it a
            # resume on the GPU is not the uninterrupted run.
            "cuda_rng": torch.cuda.get_rng_state(cuda) if cuda is not None else None,
            "config": to_dict(cfg),
            "world_size": dist_utils.world_size(),
            "resumes": list(resumes),
        },
        path,
    )


# Recipe keys a --resume may change. Bookkeeping that does not touch the weights, where the folder
# is, and the training budget: a changed train.max_steps / train.epochs re-plans the lr schedule
# for the new length from the checkpoint's step on (recorded in run.json "resumes"). Anything else
# (method, data, model, optimizer, lr, seed, precision, ...) would leave the weights coming from
# neither recipe, so it is refused.
RESUME_MAY_CHANGE = ("name", "out_dir", "train.max_steps", "train.epochs", "train.log_every",
                     "train.checkpoint_every", "train.tensorboard", "train.cpu_small_map_grad", "data.workers")
_RESUME_BUDGET = ("train.max_steps", "train.epochs")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple]:
    """{dotted key: (checkpoint's value, this recipe's)} for every key that differs."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    missing = object()
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes[key] = (None if a is missing else a, None if b is missing else b)
    return changes


def _check_resume_recipe(ckpt: dict, cfg: RunConfig, path: Path) -> dict[str, tuple]:
    """Refuse a --resume whose recipe differs from the checkpoint's in a key outside
    RESUME_MAY_CHANGE (naming the keys); returns the allowed changes."""
    changes = recipe_changes(ckpt.get("config") or {}, cfg)
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise UserError(f"--resume: {path} was trained with another recipe ({shown}{more}); on resume only "
                        f"{', '.join(RESUME_MAY_CHANGE)} may change: resume with the run's own "
                        f"{path.parent / CONFIG_FILE}, or start a new run with another --out")
    return changes


def _load_checkpoint(path: Path, method: Method, state: TrainState, ckpt: dict | None = None,
                     replan: tuple | None = None) -> tuple[int, int, int]:
    """Restore `method` and `state` from the checkpoint (`ckpt`, when already read). `replan`
    (cfg, total): the budget changed, so the lr schedule is planned again for `total` steps and
    advanced to the checkpoint's step, instead of restoring the old plan."""
    optimizers, schedulers, scaler = state.optimizers, state.schedulers, state.scaler
    ckpt = load_torch_file(path) if ckpt is None else ckpt
    missing, unexpected = method.load_state_dict(ckpt["method"], strict=False)
    frozen = method.frozen_prefixes()
    missing = [k for k in missing if not k.startswith(frozen)]
    if missing or unexpected:
        raise UserError(f"{path} does not fit this recipe (missing {missing[:5]}, unexpected {unexpected[:5]}): was the recipe changed?")
    if len(ckpt["optimizers"]) != len(optimizers):
        raise UserError(f"{path} has {len(ckpt['optimizers'])} optimizer states, this method has {len(optimizers)}")
    for opt, saved in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(saved)
    if "schedulers" not in ckpt:
        raise UserError(f"{path} was written before lr schedulers were saved with the checkpoint: start the run again")
    if replan is None:
        for sched, saved in zip(schedulers, ckpt["schedulers"]):
            sched.load_state_dict(saved)
    else:
        cfg, total = replan
        state.schedulers[:] = _replanned_schedulers(optimizers, cfg, total, ckpt["step"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])
    if state.device.type == "cuda":
        if ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], state.device)
        else:
            log.warning("%s holds no CUDA RNG state (written on the CPU or by an older edgedistill): the resumed "
                        "run's GPU random draws differ from an uninterrupted run", path)
    saved_world = ckpt.get("world_size", 1)
    if saved_world != dist_utils.world_size():
        # The epoch's files are sharded by rank: another world size resumes into a different split,
        # so the rest of the epoch is not the uninterrupted run's (training still proceeds).
        log.warning("%s was written with %d process(es), resuming with %d: the rest of this epoch's "
                    "batches differ from an uninterrupted run", path, saved_world, dist_utils.world_size())
    return ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]


def _replanned_schedulers(optimizers, cfg: RunConfig, total: int, step: int) -> list:
    """Fresh lr schedulers over `total` steps, advanced `step` steps: the schedule the new budget
    gives from here on."""
    import warnings

    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
    schedulers = [build_scheduler(opt, total, cfg.train.warmup_steps, cfg.train.schedule) for opt in optimizers]
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore", UserWarning)
        for sched in schedulers:
            for _ in range(step):
                sched.step()
    return schedulers


def _trim_metrics(path: Path, step: int) -> None:
    """Before a resume from `step`: drop the records of steps after it (a kill between checkpoints
    logged them once already; the resumed run logs them again) and a partial last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill mid-write
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(f"{line}\n" for line in kept))


def _save_deployable(method: Method, run_dir: Path, cfg: RunConfig, classes: list[str]) -> None:
    for role, module in method.deployable().items():
        if role == "head" and not isinstance(module, nn.Sequential):
            continue  # an identity head has nothing to save
        # Roles other than the student and its head carry their own architecture (DoGo's peer).
        arch = getattr(getattr(cfg.method, role, None), "arch", None) or cfg.student.arch
        meta = {"arch": arch, "role": role, "method": cfg.method.name, "img_size": str(cfg.data.img_size)}
        if role == "classifier":  # a jointly trained fc: what `eval` and `export` deploy
            meta.update({"classes": json.dumps(classes), "source": "joint"})
        path = run_dir / {"student": STUDENT_FILE, "head": HEAD_FILE, "classifier": CLASSIFIER_FILE}.get(
            role, f"{role}.safetensors")
        save_safetensors(module.state_dict(), path, meta)


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter writing into <run>/tensorboard, beside metrics.jsonl (`train.tensorboard: true`)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("train.tensorboard: true needs the tensorboard package: pip install tensorboard, "
                        "or set train.tensorboard=false")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))


def _check_finite(losses: dict, step: int, ckpt: Path) -> None:
    """Raise TrainingDiverged (exit 3) on a non-finite loss. Under DDP every rank calls this at the
    same steps and the verdict is all-reduced first, so all ranks stop together (a rank that
    stopped alone would leave the others waiting in the next collective until NCCL's timeout)."""
    bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v).all()}
    ranks = dist_utils.ranks_with(bool(bad))
    if ranks:
        kept = f"the last good checkpoint {ckpt} is kept" if ckpt.is_file() else "no checkpoint had been written yet"
        where = f" on rank(s) {', '.join(map(str, ranks))}" if dist_utils.is_distributed() else ""
        seen = f" ({', '.join(f'{k}={v}' for k, v in bad.items())})" if bad else ""
        raise TrainingDiverged(
            f"loss became non-finite at step {step}{where}{seen}; "
            f"{kept}. Lower train.lr or add train.warmup_steps, then --resume or start again."
        )


def _training_data(cfg: RunConfig, device: torch.device, rank: int, world: int):
    """The training folder and this rank's loader of the method's views."""
    with dist_utils.main_process_first():  # rank 0 materialises the dataset / verification cache
        folder = train_folder(cfg.data, cfg.seed)
    dist_utils.same_on_all_ranks(len(folder), f"the number of usable images in {folder.root}")
    kind = method_class(cfg.method.name)
    loader = build_train_loader(cfg.data, folder, kind.num_views, cfg.train.batch_size, cfg.seed, device, rank, world,
                                kind.augmentation)
    if loader.steps_per_epoch == 0:
        raise UserError(f"{folder.root}: not one full batch per epoch; lower train.batch_size")
    return folder, loader


def _checkpoint(path: Path, method: Method, state: TrainState, cfg: RunConfig, step: int, epoch: int,
                step_in_epoch: int, steps_per_epoch: int, resumes: list | tuple = ()) -> None:
    """Save the checkpoint after `step`; at the end of an epoch it points at the start of the next."""
    at_epoch_end = step_in_epoch == steps_per_epoch
    _save_checkpoint(path, method, state.optimizers, state.scaler, step, epoch + 1 if at_epoch_end else epoch,
                     0 if at_epoch_end else step_in_epoch, cfg, state.schedulers, resumes)


class _MetricsLog:
    """The logging intervals: images/s and the losses on every rank, metrics.jsonl (and TensorBoard) records on the main process."""

    def __init__(self, run_dir: Path, cfg: RunConfig, main: bool, images_per_step: int, step: int):
        self.file = (run_dir / METRICS_FILE).open("a") if main else None
        self.board = tensorboard_writer(run_dir) if main and cfg.train.tensorboard else None
        self.images_per_step = images_per_step
        self.start = self.last_time = time.perf_counter()
        self.last_step = step

    def record(self, step: int, epoch: int, lr: float, losses: dict, device: torch.device) -> tuple[dict, float]:
        """Log the interval ending at `step`; returns its rounded losses and images/s."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        images_per_s = (step - self.last_step) * self.images_per_step / (now - self.last_time)
        rounded = {k: round(float(v.detach()), 6) for k, v in losses.items()}
        self.last_time, self.last_step = now, step
        if self.file is not None:
            record = {"step": step, "epoch": epoch, "lr": lr,
                      **rounded, "images_per_s": round(images_per_s, 2), "time_s": round(now - self.start, 3)}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.board is not None:
                for key, value in record.items():
                    if key not in ("step", "epoch"):
                        self.board.add_scalar(f"train/{key}", value, step)
                self.board.flush()
        return rounded, images_per_s

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def train(cfg: RunConfig, out: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Train `cfg` into its run folder and return a summary."""
    run_dir = run_dir_for(cfg, out)
    ckpt_path = run_dir / CHECKPOINT_FILE
    if not resume and ckpt_path.exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: {ckpt_path} does not exist (nothing to resume); drop --resume to start")

    distributed = dist_utils.init_from_env(cfg.train.device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    device = dist_utils.device_for_rank(cfg.train.device) if distributed else resolve_device(cfg.train.device)
    main = dist_utils.is_main()
    ckpt, changes = None, {}
    if resume:  # before config.yaml is rewritten: the folder must not claim a recipe its weights lack
        ckpt = load_torch_file(ckpt_path)
        changes = _check_resume_recipe(ckpt, cfg, ckpt_path)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / LOG_FILE)
        write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
    seed_everything(cfg.seed)

    folder, loader = _training_data(cfg, device, rank, world)
    torch.manual_seed(cfg.seed)
    method = create_method(cfg, num_classes=len(folder.classes)).to(device)
    # max_steps 0 saves the initialised student untrained (the "untrained" baseline row of `compare`).
    total = cfg.train.max_steps if cfg.train.max_steps is not None else cfg.train.epochs * loader.steps_per_epoch
    total = min(total, cfg.train.epochs * loader.steps_per_epoch)
    with dist_utils.main_process_first():  # rank 0 computes data-dependent state (teacher centre), the rest reuse it
        method.prepare(run_dir, folder, device, channels_last=use_channels_last(cfg, device), steps=total)
    state = setup_training(cfg, method, device, world, total)

    step, start_epoch, skip = 0, 0, 0
    resumes: list[dict] = []
    if resume:
        replan = (cfg, total) if any(k in changes for k in _RESUME_BUDGET) else None
        step, start_epoch, skip = _load_checkpoint(ckpt_path, method, state, ckpt, replan)
        resumes = [*ckpt.get("resumes", []),
                   {"step": step, "changed": {k: list(v) for k, v in changes.items()}}]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, step, start_epoch, skip)
        if changes:
            log.warning("resumed with %s changed (%s)%s", ", ".join(changes),
                        "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
                        f"; the lr schedule is re-planned for {total} steps from step {step}" if replan else "")
        if main:
            _trim_metrics(run_dir / METRICS_FILE, step)
        del ckpt

    model = dist_utils.wrap_ddp(method, device) if distributed else method
    forward = torch.compile(model) if cfg.train.compile else model
    if main:
        log.info(
            "method=%s student=%s teacher=%s loader=%s device=%s precision=%s channels_last=%s world=%d",
            cfg.method.name, cfg.student.arch, cfg.teacher.arch if cfg.teacher else None, loader.name, device,
            state.amp_dtype or "fp32", state.channels_last, world,
        )
        log.info("%d training images in %d classes (%d skipped as unreadable); %d steps/epoch, %d steps in all",
                 len(folder), len(folder.classes), len(folder.skipped), loader.steps_per_epoch, total)

    method.train()
    images_per_step = cfg.train.batch_size * world
    metrics = _MetricsLog(run_dir, cfg, main, images_per_step, step)
    start_step, last_losses = step, {}
    with progress_bar(total, f"{cfg.method.name} {cfg.student.arch}", enabled=main) as bar:
        bar.advance(step)
        epoch = start_epoch
        while step < total:
            step_in_epoch = skip
            for views, labels in loader.epoch(epoch, skip=skip):
                step_lr = state.lr
                losses = train_step(forward, views, labels, state)
                step += 1
                step_in_epoch += 1
                bar.advance(1)
                # On the GPU every .item() is a host sync: inspect losses only at log/checkpoint steps.
                log_now = step % cfg.train.log_every == 0 or step == total
                ckpt_now = step % cfg.train.checkpoint_every == 0 or step == total
                if device.type == "cpu" or log_now or ckpt_now:
                    _check_finite(losses, step, ckpt_path)
                if log_now:
                    last_losses, images_per_s = metrics.record(step, epoch, step_lr, losses, device)
                    bar.update_fields(loss=last_losses["loss"], ips=images_per_s)
                if ckpt_now and main:
                    _checkpoint(ckpt_path, method, state, cfg, step, epoch, step_in_epoch, loader.steps_per_epoch,
                                resumes)
                if step >= total:
                    break
            epoch, skip = epoch + 1, 0

    wall = time.perf_counter() - metrics.start
    metrics.close()
    ips = (step - start_step) * images_per_step / max(wall, 1e-9)
    result = TrainResult(run_dir, step, loader.name, ips, wall, last_losses)
    if main:
        _save_deployable(method, run_dir, cfg, folder.classes)
        summary = {
            "status": "complete", "steps": step, "epochs": epoch, "loader": loader.name, "device": str(device),
            "world_size": world, "images_per_s": round(ips, 2), "wall_s": round(wall, 2),
            "final_losses": last_losses, "skipped_images": folder.skipped, "resumes": resumes,
            "environment": environment(),
        }
        write_json(run_dir / RUN_FILE, summary)
        log.info("done: %d steps in %.1fs (%.1f images/s, loader %s); student -> %s",
                 step, wall, ips, loader.name, run_dir / STUDENT_FILE)
    dist_utils.barrier()
    return result
