"""`edgedistill bench-train`: training throughput of DisCo for a teacher -> student pair.

Four data modes, one method and one step function, the trainer's own (`create_method`,
`edgedistill.train.setup_training` and `edgedistill.train.train_step`: optimizers and lr
schedulers, bf16 autocast + channels_last on CUDA, channels_last anywhere with `--channels-last true`;
optional torch.compile):

  synthetic    batches already on the device: the compute ceiling
  dali-gpu     DALI pipeline, decoding + augmentation on the GPU (needs CUDA and DALI)
  dali-cpu     DALI's CPU-only pipeline (needs DALI)
  torchvision  PIL + torchvision.transforms.v2 in a DataLoader with all cores

Per mode: warm-up steps, then timed steps; each step is timed from asking the loader for a
batch to the end of the optimizer step, synchronised on CUDA, and the median is reported
(images/s = batch / median step; images/s from the mean step is kept too). The timing loop and the
statistics are the device kit's (`edgekit.time_calls`, `edgekit.latency_stats`). The teacher's
share of the step is its forward on both views (the same autocast / memory format), timed
separately with CUDA events on GPU (perf_counter on CPU), divided by the median step time of
the synthetic mode. Side by side in the same run (`teacher_modes`), on the synthetic batches: the
DisCo step and the teacher's share of it for each teacher precision (`--teacher-modes`, default
fp32 and every fast mode this device runs natively; `teacher.precision`, see
methods/components.FrozenTeacher), and MoCo v2's step on the same student, batch and memory format
(`mocov2`), so DisCo's images/s over MoCo v2's is read per teacher precision. The loader modes run
the teacher in `--teacher-precision` (auto: the device's fastest native mode, unmeasured: the
fidelity check needs the trainer's `prepare`). Peak GPU memory is `torch.cuda.max_memory_allocated` per mode. Absent
modes are skipped with a one-line reason. Without `--teacher-checkpoint` the teacher is a
randomly initialised MoCo v2 encoder of `--teacher-arch` (backbone + 2-layer MLP head, 128-d):
the numbers are then labelled "random teacher weights: throughput only".

Only light imports at module level: the CLI imports this module for every command.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgedistill.cli_helpers import choices, comma_list, handle_errors


class Mode(str, Enum):
    """Where the training batches come from (`bench-train --modes`)."""

    synthetic = "synthetic"
    dali_gpu = "dali-gpu"
    dali_cpu = "dali-cpu"
    torchvision = "torchvision"


MODES = tuple(m.value for m in Mode)
DEFAULT_OUT = Path("bench/results/train_speed.json")


def _random_teacher_checkpoint(arch: str, path: Path, stem_stride: int | None) -> None:
    """A MoCo v2-shaped checkpoint (`module.encoder_q.*`, MLP head) with random weights."""
    import torch

    from edgedistill.config import ModelConfig
    from edgedistill.models import create_backbone, feature_dim, projection_head

    torch.manual_seed(0)
    backbone = create_backbone(ModelConfig(arch=arch, stem_stride=stem_stride))
    width = feature_dim(backbone)
    head = projection_head(width, width, 128)
    state = {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"module.encoder_q.fc.{k}": v for k, v in head.state_dict().items()})
    torch.save({"state_dict": state}, path)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(loader, start_epoch: int = 0):
    """Endless batches, epoch after epoch."""
    epoch = start_epoch
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


class _Stepper:
    """The method and the training state `edgedistill.train.train` builds, stepped by its `train_step`."""

    def __init__(self, cfg, device, num_classes: int, compile_: bool, total_steps: int):
        import torch

        from edgedistill.methods import create_method
        from edgedistill.train import setup_training

        torch.manual_seed(cfg.seed)
        self.device = device
        self.method = create_method(cfg, num_classes=num_classes).to(device)
        self.state = setup_training(cfg, self.method, device, 1, total_steps)
        self.forward = torch.compile(self.method) if compile_ else self.method
        self.recipe_teacher_compile = bool(cfg.teacher is not None and cfg.teacher.compile)
        self.method.train()

    def set_teacher(self, mode: str) -> None:
        """Run the teacher in `mode` (fp32 | bf16 | fp16, "+compile": torch.compile'd; without it the
        recipe's teacher.compile), in the step's memory format."""
        import torch

        precision, _, extra = mode.partition("+")
        teacher = self.method.teacher
        teacher.compile = extra == "compile" if extra else self.recipe_teacher_compile
        teacher.set_mode(precision)
        if self.state.channels_last and self.method.teacher.fast is not None:
            self.method.teacher.fast.to(memory_format=torch.channels_last)
        self.method.train()

    def step(self, views, labels) -> None:
        from edgedistill.train import train_step

        train_step(self.forward, views, labels, self.state)

    def teacher_ms(self, views, reps: int) -> float:
        """Median time (ms) of the teacher's forward on all views, as inside the DisCo step (CUDA events on the GPU, the host clock on the CPU; two warm-up repetitions)."""
        from edgedistill.bench.torch_runtime import cuda_time_ms
        from edgedistill.kit import load_kit_module

        kit = load_kit_module("edgekit")
        views = self.state.prepare_views(views)

        def forward() -> None:  # returns None: the kit then takes the host wall time
            with self.state.autocast():
                for view in views:
                    self.method.teacher(view)

        step = (lambda: cuda_time_ms(forward)) if self.device.type == "cuda" else forward
        return kit.median_ms(kit.time_calls(step, warmup=2, runs=reps))


def _time_mode(stepper, batches, batch_size: int, warmup: int, steps: int) -> dict:
    import torch

    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    device = stepper.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():  # from asking the loader for a batch to the end of the (synchronised) optimizer step
        stepper.step(*next(batches))
        _sync(device)

    lat = kit.latency_stats(kit.time_calls(step, warmup=warmup, runs=steps))
    return {
        "status": "ok",
        "images_per_s": round(batch_size * 1000.0 / lat["p50"], 2),
        "images_per_s_mean": round(batch_size * 1000.0 / lat["mean"], 2),
        "step_ms_median": round(lat["p50"], 3),
        "step_ms_p90": round(lat["p90"], 3),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
    }


def _ratio(mode: dict, reference: dict) -> float | None:
    """images/s of `mode` over that of `reference`, when both ran."""
    if mode.get("status") == "ok" and reference.get("status") == "ok":
        return round(mode["images_per_s"] / reference["images_per_s"], 3)
    return None


def _synthetic_batch(batch_size: int, img_size: int, classes: int, seed: int, device):
    import torch

    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device) for _ in range(2)]
    return views, torch.randint(0, classes, (batch_size,), generator=gen).to(device)


def teacher_mode_table(disco: _Stepper, mocov2: _Stepper, views, labels, batch_size: int, teacher_modes: list[str],
                       warmup: int, steps: int, log=print) -> tuple[dict, dict]:
    """The DisCo step (synthetic batch) and the teacher's share of it for each teacher precision, and
    MoCo v2's step on the same batch, one after the other in this process; returns (per mode, mocov2)."""
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")

    def timed(stepper) -> dict:
        def step():
            stepper.step(views, labels)
            _sync(stepper.device)

        lat = kit.latency_stats(kit.time_calls(step, warmup=warmup, runs=steps))
        return {"step_ms_median": round(lat["p50"], 3), "step_ms_p90": round(lat["p90"], 3),
                "images_per_s": round(batch_size * 1000.0 / lat["p50"], 2)}

    log(f"mocov2 (same student and batch): {warmup} warm-up + {steps} timed steps ...")
    moco = {"status": "ok", **timed(mocov2)}
    table = {}
    for mode in teacher_modes:
        log(f"disco, teacher {mode}: {warmup} warm-up + {steps} timed steps ...")
        disco.set_teacher(mode)
        row = timed(disco)
        teacher = disco.teacher_ms(views, reps=max(3, min(steps, 10)))
        row.update({"status": "ok", "teacher_ms_both_views": round(teacher, 3),
                    "teacher_share_of_step": round(teacher / row["step_ms_median"], 4),
                    "disco_over_mocov2_images_per_s": round(row["images_per_s"] / moco["images_per_s"], 3)})
        table[mode] = row
    if "fp32" in table:
        for row in table.values():
            row["speedup_over_fp32_teacher"] = round(row["images_per_s"] / table["fp32"]["images_per_s"], 3)
    return table, moco


def default_teacher_modes(device) -> list[str]:
    """fp32 and every fast teacher precision `device` runs natively, those offered on request too."""
    from edgedistill.methods.components import fast_teacher_modes

    return ["fp32", *fast_teacher_modes(device, on_request=True)]


def run_bench(teacher_arch: str, student_arch: str, teacher_checkpoint: str | None, img_size: int, batch_size: int,
              data: str, modes: list[str], warmup: int, steps: int, compile_: bool, device_spec: str,
              workers: int | None, stem_stride: int | None, seed: int = 0, threads: int | None = None,
              channels_last: str = "auto", log=print, teacher_precision: str = "auto",
              teacher_modes: list[str] | None = None, teacher_compile: bool = False) -> dict:
    import os
    import tempfile

    import torch

    from edgedistill.config import to_dict
    from edgedistill.recipe import load_config
    from edgedistill.data import dali_available, train_folder
    from edgedistill.envinfo import environment, resolve_device
    from edgedistill.errors import UserError

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {choices(Mode)}")
    if warmup < 0 or steps < 1:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    device = resolve_device(device_spec)
    if threads:
        torch.set_num_threads(threads)  # intra-op threads of the training step (recorded in environment)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        random_teacher = teacher_checkpoint is None
        if random_teacher:
            teacher_checkpoint = str(Path(tmp) / f"random_{teacher_arch}.pt")
            _random_teacher_checkpoint(teacher_arch, Path(teacher_checkpoint), stem_stride)
        overrides = {
            "name": "bench-train", "seed": seed, "method.name": "disco",
            "student.arch": student_arch, "teacher.arch": teacher_arch, "teacher.checkpoint": teacher_checkpoint,
            "data.train": data, "data.img_size": img_size, "data.workers": workers,
            "train.batch_size": batch_size, "train.compile": compile_, "train.device": device_spec,
            "train.channels_last": channels_last,
            # The queue must be a multiple of the batch; its size does not change the step's cost much.
            "method.queue_size": batch_size * max(1, 4096 // batch_size),
        }
        if stem_stride is not None:
            overrides["student.stem_stride"] = stem_stride
            overrides["teacher.stem_stride"] = stem_stride
        overrides["teacher.precision"] = teacher_precision
        overrides["teacher.compile"] = teacher_compile
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
        from edgedistill.methods.components import check_teacher_precision, fast_teacher_modes

        fast = fast_teacher_modes(device)
        teacher_modes = default_teacher_modes(device) if teacher_modes is None else teacher_modes
        for mode in [teacher_precision, *teacher_modes]:
            precision, _, extra = mode.partition("+")
            check_teacher_precision(precision, device)
            if extra not in ("", "compile") or (extra and precision in ("fp32", "auto")):
                raise UserError(f"--teacher-modes: {mode!r}: only bf16+compile / fp16+compile take a suffix")
        # auto (unmeasured here): the device's fastest native mode.
        teacher_modes = list(dict.fromkeys((fast[0] if fast else "fp32") if m == "auto" else m for m in teacher_modes))
        folder = train_folder(cfg.data, cfg.seed)
        if len(folder) < batch_size:
            raise UserError(f"{folder.root} has {len(folder)} usable images, fewer than one batch of {batch_size}")
        # The lr schedule spans every step taken (it only sets the lr, not the cost of a step).
        total_steps = (len(modes) + len(teacher_modes)) * (warmup + steps)
        stepper = _Stepper(cfg, device, len(folder.classes), compile_, total_steps=total_steps)
        loader_teacher = teacher_precision if teacher_precision != "auto" else (fast[0] if fast else "fp32")
        stepper.set_teacher(loader_teacher)
        moco_overrides = {k: v for k, v in overrides.items() if not k.startswith("teacher.")}
        moco_cfg = load_config(None, [f"{k}={v}" for k, v in {**moco_overrides, "method.name": "mocov2"}.items()])
        mocov2 = _Stepper(moco_cfg, device, len(folder.classes), compile_, total_steps=warmup + steps)

    results: dict[str, dict] = {}
    synthetic_views = None
    for mode in modes:
        reason = None
        if mode == "dali-gpu" and device.type != "cuda":
            reason = "no CUDA device"
        elif mode.startswith("dali") and not dali_available():
            reason = "NVIDIA DALI is not installed"
        if reason:
            results[mode] = {"status": "skipped", "reason": reason}
            log(f"{mode}: skipped ({reason})")
            continue
        gen = torch.Generator().manual_seed(seed)
        if mode == "synthetic":
            views = [torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device) for _ in range(2)]
            labels = torch.randint(0, len(folder.classes), (batch_size,), generator=gen).to(device)
            synthetic_views = views

            def endless(views=views, labels=labels):
                while True:
                    yield views, labels

            batches = endless()
        elif mode == "torchvision":
            from edgedistill.data.torch_loader import TorchvisionTrainLoader

            batches = _batches(TorchvisionTrainLoader(folder, cfg.data, 2, batch_size, seed, device))
        else:
            from edgedistill.data.dali_loader import DaliTrainLoader

            try:
                loader = DaliTrainLoader(folder, cfg.data, 2, batch_size, seed, device, gpu=mode == "dali-gpu")
            except UserError as e:
                results[mode] = {"status": "skipped", "reason": str(e)}
                log(f"{mode}: skipped ({e})")
                continue
            batches = _batches(loader)
        log(f"{mode}: {warmup} warm-up + {steps} timed steps of batch {batch_size} at {img_size}px ...")
        results[mode] = _time_mode(stepper, batches, batch_size, warmup, steps)
        if hasattr(batches, "close"):
            batches.close()

    teacher = {"status": "skipped", "reason": "the synthetic mode was not run"}
    if synthetic_views is not None:
        stepper.set_teacher(loader_teacher)
        ms = stepper.teacher_ms(synthetic_views, reps=max(3, min(steps, 10)))
        step_ms = results["synthetic"]["step_ms_median"]
        teacher = {"status": "ok", "forward_ms_both_views": round(ms, 3), "share_of_step": round(ms / step_ms, 4),
                   "timer": "cuda events" if device.type == "cuda" else "perf_counter"}

    views, labels = _synthetic_batch(batch_size, img_size, len(folder.classes), seed, device)
    per_mode, moco = teacher_mode_table(stepper, mocov2, views, labels, batch_size, teacher_modes, warmup, steps, log)

    dali_gpu, synthetic, dali_cpu, torchvision = (results.get(m.value, {}) for m in
                                                  (Mode.dali_gpu, Mode.synthetic, Mode.dali_cpu, Mode.torchvision))
    return {
        "benchmark": "train_speed",
        "method": "disco",
        "teacher": teacher_arch,
        "student": student_arch,
        "teacher_weights": "random teacher weights: throughput only" if random_teacher else teacher_checkpoint,
        "img_size": img_size,
        "batch_size": batch_size,
        "views": 2,
        "data": str(folder.root),
        "n_images": len(folder),
        "device": str(device),
        "precision": str(stepper.state.amp_dtype).replace("torch.", "") if stepper.state.amp_dtype else "fp32",
        "channels_last": stepper.state.channels_last,
        "compile": compile_,
        "loader_workers": workers,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "modes": results,
        "teacher_precision_loader_modes": loader_teacher,
        "teacher_share": teacher,
        "teacher_modes": per_mode,
        "mocov2": moco,
        "ratios": {
            "dali_gpu_over_synthetic": _ratio(dali_gpu, synthetic),
            "dali_gpu_over_torchvision": _ratio(dali_gpu, torchvision),
            "dali_cpu_over_synthetic": _ratio(dali_cpu, synthetic),
            "dali_cpu_over_torchvision": _ratio(dali_cpu, torchvision),
        },
        # Load on this machine while measuring: a shared or busy machine makes CPU numbers low.
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "config": to_dict(cfg) | {"teacher": {**to_dict(cfg)["teacher"], "checkpoint": None if random_teacher else teacher_checkpoint}},
        "environment": environment(threads),
    }


def print_table(result: dict) -> None:
    from rich.table import Table

    from edgedistill.ui import console

    title = (f"DisCo {result['teacher']} -> {result['student']}, batch {result['batch_size']} x 2 views at "
             f"{result['img_size']}px on {result['device']} ({result['precision']})")
    table = Table(title=title, caption=result["teacher_weights"] if "random" in result["teacher_weights"] else None)
    for col in ("mode", "images/s", "step ms (median)", "step ms (p90)", "peak GPU GiB", "note"):
        table.add_column(col, justify="left" if col in ("mode", "note") else "right")
    for mode, r in result["modes"].items():
        if r["status"] == "ok":
            mem = "-" if r["peak_gpu_mem_gib"] is None else f"{r['peak_gpu_mem_gib']:.2f}"
            table.add_row(mode, f"{r['images_per_s']:.1f}", f"{r['step_ms_median']:.1f}", f"{r['step_ms_p90']:.1f}", mem, "")
        else:
            table.add_row(mode, "-", "-", "-", "-", f"skipped: {r['reason']}")
    console.print(table)
    t = result["teacher_share"]
    if t["status"] == "ok":
        console.print(f"teacher forward (both views): {t['forward_ms_both_views']:.1f} ms = "
                      f"{100 * t['share_of_step']:.1f}% of the synthetic step ({t['timer']})")
    modes = Table(title=f"Teacher precision side by side (synthetic batches); MoCo v2 on the same student and batch: "
                        f"{result['mocov2']['images_per_s']:.1f} images/s")
    for col in ("teacher", "DisCo images/s", "step ms", "teacher ms", "teacher share", "DisCo / MoCo v2", "x fp32"):
        modes.add_column(col, justify="left" if col == "teacher" else "right")
    for mode, r in result["teacher_modes"].items():
        x = r.get("speedup_over_fp32_teacher")
        modes.add_row(mode, f"{r['images_per_s']:.1f}", f"{r['step_ms_median']:.1f}", f"{r['teacher_ms_both_views']:.1f}",
                      f"{100 * r['teacher_share_of_step']:.0f}%", f"{r['disco_over_mocov2_images_per_s']:.2f}",
                      "-" if x is None else f"{x:.2f}")
    console.print(modes)
    ratios = ", ".join(f"{k.replace('_over_', ' / ')} = {v:.2f}" for k, v in result["ratios"].items() if v is not None)
    if ratios:
        console.print(f"ratios: {ratios}")


@handle_errors
def bench_train(
    teacher_arch: Annotated[str, typer.Option(help="Teacher architecture (timm name).")] = "resnet50",
    student_arch: Annotated[str, typer.Option(help="Student architecture (timm name).")] = "efficientnet_b0",
    teacher_checkpoint: Annotated[Optional[str], typer.Option(
        help="Teacher checkpoint; omitted = random weights (throughput only).")] = None,
    img_size: Annotated[int, typer.Option(help="Crop size.")] = 224,
    batch_size: Annotated[int, typer.Option(help="Images per step (each gives 2 views).")] = 256,
    data: Annotated[str, typer.Option(help="ImageFolder directory, or embedded:digits.")] = "embedded:digits",
    modes: Annotated[str, typer.Option(help=f"Comma-separated subset of {','.join(MODES)}.")] = ",".join(MODES),
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per mode.")] = 10,
    steps: Annotated[int, typer.Option(help="Timed steps per mode.")] = 30,
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the method.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Loader threads/workers (default: all cores).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        help="torch intra-op threads for the step (default: torch's choice; 1 is steadier on a busy CPU).")] = None,
    stem_stride: Annotated[Optional[int], typer.Option(help="First-conv stride of both models (1 for tiny inputs).")] = None,
    channels_last: Annotated[str, typer.Option(
        help="train.channels_last for the step: auto (the trainer's default) | true | false.")] = "auto",
    teacher_precision: Annotated[str, typer.Option(
        help="teacher.precision of the loader modes: auto (this device's fastest native mode) | fp32 | bf16 | fp16.")] = "auto",
    teacher_modes: Annotated[Optional[str], typer.Option(
        help="Teacher precisions timed side by side (default: fp32 and every fast mode this device runs); "
             "bf16+compile / fp16+compile: torch.compile'd.")] = None,
    teacher_compile: Annotated[bool, typer.Option(
        "--teacher-compile/--no-teacher-compile", help="teacher.compile for the loader modes.")] = False,
    out: Annotated[Path, typer.Option(help="JSON result file.")] = DEFAULT_OUT,
):
    """Training throughput (images/s), peak GPU memory and the teacher's share of the step for DisCo: synthetic batches vs DALI GPU vs DALI CPU vs torchvision loaders."""
    from edgedistill.fileio import write_json
    from edgedistill.ui import console, setup_logging

    setup_logging()
    result = run_bench(teacher_arch, student_arch, teacher_checkpoint, img_size, batch_size, data, comma_list(modes),
                       warmup, steps, compile_, device, workers, stem_stride, threads=threads,
                       channels_last=channels_last, teacher_precision=teacher_precision,
                       teacher_compile=teacher_compile,
                       teacher_modes=comma_list(teacher_modes) if teacher_modes else None,
                       log=lambda msg: console.print(msg, highlight=False))
    print_table(result)
    write_json(out, result)
    console.print(f"written: {out}")
