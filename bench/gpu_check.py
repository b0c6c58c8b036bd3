"""A short end-to-end check for the day a GPU machine is at hand (issue 20); it also runs, smaller,
on the CPU (`--device cpu`, what tests/test_teacher_precision.py runs).

    python bench/gpu_check.py                       # CUDA: ~3-5 min on one H200 -> bench/results/gpu_check.json
    python bench/gpu_check.py --device cpu --out /tmp/gpu_check_cpu.json   # seconds: the CPU path

1. trains DisCo (`teacher.precision: auto`: bf16 on a GPU; student in bf16 autocast with
   channels_last, the trainer's CUDA defaults) for --steps steps, stopped after the checkpoint at
   half way (as a kill would) and resumed to the end with `--resume`;
2. exports the student (embedding model, fp32 ONNX + fp16 on CUDA) and reads the export's parity
   checks (ONNX Runtime vs torch) from its manifest;
3. times the teacher precisions side by side (`bench-train`'s `teacher_mode_table`: DisCo step,
   teacher share, DisCo / MoCo v2 images/s).
Prints one table and writes JSON. Needs only torch, timm, onnx and onnxruntime: the loader is
torchvision's, the teacher random weights (a MoCo v2-shaped ResNet-50 on CUDA, ResNet-20 on the
CPU), the data the embedded digits (no download); DALI and TensorRT are not used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "bench" / "results" / "gpu_check.json"
SETTINGS = {  # per device type: the teacher, the student, image size, batch, steps, timed steps per teacher mode
    "cuda": {"teacher": "resnet50", "student": "mobilenetv3_small_100", "img_size": 64, "batch": 128, "steps": 300,
             "timed": 20},
    "cpu": {"teacher": "resnet20_cifar", "student": "mobilenetv3_small_100", "img_size": 16, "batch": 16, "steps": 6,
            "timed": 2},
}


def _train_interrupted_then_resumed(cfg, run_dir: Path, half: int) -> dict:
    """Train `cfg`, stop right after the checkpoint at step `half` (KeyboardInterrupt, as Ctrl-C would),
    then resume to the end; returns what the two phases did."""
    import edgedistill.train as train_module

    save = train_module._save_checkpoint

    def save_then_stop(path, method, optimizers, scaler, step, *args):
        save(path, method, optimizers, scaler, step, *args)
        if step == half:
            raise KeyboardInterrupt

    t0 = time.perf_counter()
    train_module._save_checkpoint = save_then_stop
    try:
        train_module.train(cfg, run_dir)
        raise RuntimeError(f"training was not stopped at step {half}")
    except KeyboardInterrupt:
        pass
    finally:
        train_module._save_checkpoint = save
    first = time.perf_counter() - t0
    result = train_module.train(cfg, run_dir, resume=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"steps": result.steps, "stopped_at": half, "first_phase_s": round(first, 2),
            "resumed_phase_s": round(result.wall_s, 2), "resumed_images_per_s": round(result.images_per_s, 1),
            "final_losses": result.final_losses, "logged_steps": [r["step"] for r in records],
            "finite": all(all(v == v for k, v in r.items() if isinstance(v, float)) for r in records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cuda | cpu")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: per device, see SETTINGS)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folder here (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch

    from edgedistill.bench.train_speed import (_random_teacher_checkpoint, _Stepper, _synthetic_batch,
                                               default_teacher_modes, teacher_mode_table)
    from edgedistill.deploy.exporter import export_run
    from edgedistill.envinfo import environment, resolve_device
    from edgedistill.fileio import write_json
    from edgedistill.recipe import load_config
    from edgedistill.ui import setup_logging

    setup_logging()
    device = resolve_device(args.device)
    s = dict(SETTINGS["cuda" if device.type == "cuda" else "cpu"])
    steps = args.steps or s["steps"]
    t_start = time.perf_counter()
    checks: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher = work / f"random_{s['teacher']}.pt"
        _random_teacher_checkpoint(s["teacher"], teacher, None)
        overrides = {
            "name": "gpu-check", "method.name": "disco", "student.arch": s["student"], "teacher.arch": s["teacher"],
            "teacher.checkpoint": teacher, "teacher.precision": "auto", "data.train": "embedded:digits",
            "data.loader": "torchvision", "data.workers": 2 if device.type == "cuda" else 0,
            "data.img_size": s["img_size"], "train.batch_size": s["batch"], "train.max_steps": steps,
            "train.epochs": 1000, "train.device": str(device), "train.precision": "auto", "train.channels_last": "auto",
            "train.log_every": max(1, steps // 10), "train.checkpoint_every": max(1, steps // 2),
            "method.queue_size": s["batch"] * 8, "eval.linear_epochs": 5,
        }
        if device.type == "cpu":
            overrides.update({"student.stem_stride": 1, "train.channels_last": "true"})
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
        run_dir = work / "run"
        checks["train_resume"] = _train_interrupted_then_resumed(cfg, run_dir, max(1, steps // 2))
        fidelity = json.loads((run_dir / "teacher_fidelity.json").read_text())
        checks["teacher_precision"] = {"requested": fidelity["requested"], "chosen": fidelity["chosen"],
                                       "modes": fidelity["modes"]}
        export_dir = export_run(run_dir, fp16=device.type == "cuda", embedding=True, val_count=64,
                                out=work / "export")
        manifest = json.loads((export_dir / "manifest.json").read_text())
        checks["export"] = {"status": manifest.get("status"), "problems": manifest.get("problems"), "artifacts": {
            a["name"]: {"file": a.get("file"), "parity_passed": (a.get("parity") or {}).get("passed"),
                        "max_rel_diff": (a.get("accuracy") or {}).get("max_rel_diff"),
                        "min_cosine": (a.get("accuracy") or {}).get("min_cosine")}
            for a in manifest.get("artifacts") or [] if a.get("file")}}

        # Teacher precisions side by side on synthetic batches (the bench-train table).
        stepper_cfg = load_config(None, [f"{k}={v}" for k, v in {**overrides, "train.max_steps": None}.items()
                                         if v is not None])
        modes = default_teacher_modes(device)
        disco = _Stepper(stepper_cfg, device, 10, False, total_steps=(len(modes) + 1) * (s["timed"] + 2))
        moco_cfg = load_config(None, [f"{k}={v}" for k, v in {**overrides, "method.name": "mocov2"}.items()
                                      if not k.startswith("teacher.")])
        mocov2 = _Stepper(moco_cfg, device, 10, False, total_steps=s["timed"] + 2)
        views, labels = _synthetic_batch(s["batch"], s["img_size"], 10, 0, device)
        table, moco = teacher_mode_table(disco, mocov2, views, labels, s["batch"], modes, 2, s["timed"], log=print)
        checks["teacher_modes"] = table
        checks["mocov2"] = moco

    ok = (checks["train_resume"]["steps"] == steps and checks["train_resume"]["finite"]
          and checks["export"]["status"] == "ok"
          and all(a["parity_passed"] for a in checks["export"]["artifacts"].values()))
    result = {"benchmark": "gpu_check", "device": str(device), "settings": {**s, "steps": steps}, "ok": ok,
              "wall_s": round(time.perf_counter() - t_start, 1), **checks, "environment": environment()}
    tr = checks["train_resume"]
    print(f"\n{'check':28s} result")
    print(f"{'train + resume':28s} {tr['steps']} steps (stopped at {tr['stopped_at']}, resumed), "
          f"{tr['resumed_images_per_s']} images/s after resume, losses {tr['final_losses']}")
    print(f"{'teacher precision auto':28s} -> {checks['teacher_precision']['chosen']} "
          + ", ".join(f"{m}: cos {r['mean_cosine']:.6f} / q0.1% {r['q001_cosine']:.6f}"
                      for m, r in checks["teacher_precision"]["modes"].items()))
    print(f"{'export parity':28s} {checks['export']['status']}: " + ", ".join(
        f"{name} parity {'passed' if a['parity_passed'] else 'FAILED'} (max rel diff {a['max_rel_diff']:.2e})"
        for name, a in checks["export"]["artifacts"].items()))
    for mode, r in table.items():
        print(f"{'teacher ' + mode:28s} DisCo {r['images_per_s']:.1f} images/s, step {r['step_ms_median']:.1f} ms, "
              f"teacher {100 * r['teacher_share_of_step']:.0f}% of it, DisCo/MoCo v2 "
              f"{r['disco_over_mocov2_images_per_s']:.2f} (MoCo v2 {moco['images_per_s']:.1f} images/s)")
    print(f"{'all checks':28s} {'ok' if ok else 'FAILED'} in {result['wall_s']} s")
    write_json(args.out, result)
    print(f"written: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
