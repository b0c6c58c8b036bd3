"""The frozen teacher's speed per precision (issue 20), one thread, modes side by side in
interleaved rounds, for the CIFAR ResNet-56 at 32 px and a ResNet-50 at 224 px:

    OMP_NUM_THREADS=1 python bench/teacher_speed.py        # -> bench/results/teacher_speed.json (~6 min)
    OMP_NUM_THREADS=1 python bench/teacher_speed.py --quick --out /tmp/t.json   # seconds: a smoke run

For each teacher and each precision this CPU runs (fp32, and bf16 where it has AVX512_BF16/AMX;
`methods.components.fast_teacher_modes`, with the modes offered on request: int8-openvino): the teacher's ms per image (its forward over DisCo's two
views of a batch), its MAC rate against this CPU's peak for that precision, the cosine of its target
to fp32's (mean, 0.1% quantile), the DisCo step (ms, images/s) and MoCo v2's images/s on the same
student, batch and memory format (channels_last), and DisCo / MoCo v2. The step is the trainer's own
(`bench.train_speed._Stepper`: `create_method`, `train.setup_training`, `train.train_step`), timed
with the device kit's `time_calls` / `latency_stats`; each round runs every mode once, medians over
the rounds.

Fidelity: for the ResNet-56 with its checkpoint and the CIFAR-10 images present, the training run's
own check (`FrozenTeacher.prepare`: centred targets on 1,024 augmented training views, kNN top-1);
otherwise (random weights, the ResNet-50) the cosine on a uniform-noise batch, labelled so.

Peak MAC rate of one core (the assumption, written into the JSON): FMA units x vector lanes x clock;
fp32 lanes = vector width / 32 (512-bit with AVX-512F, else 256; 256 on AMD family 25, Zen 4, whose
AVX-512 runs on 256-bit units); bf16 doubles it (VDPBF16PS: two
bf16 products per fp32 lane); clock = /proc/cpuinfo "cpu MHz" unless --ghz; --fma-units 2 (two
512-bit FMA pipes: Zen 5, Ice Lake-SP and later Xeons). AMX is not modelled. Run it alone on an
idle machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "teacher_speed.json"
R56_CHECKPOINT = ROOT.parent / "shared" / "teachers" / "resnet-cifar10" / "resnet56-4bfd9763.th"
CIFAR_TRAIN = ROOT / ".data" / "cifar10-jpg" / "train"
STUDENT = "mobilenetv3_small_100"
MODELS = [
    # name, arch, img_size, batch, checkpoint (None: random weights), training images for the fidelity check
    {"name": "resnet56_cifar@32", "arch": "resnet56_cifar", "img_size": 32, "batch": 128,
     "checkpoint": R56_CHECKPOINT, "data": CIFAR_TRAIN, "recipe": ROOT / "recipes" / "fidelity" / "disco.yaml"},
    # timm's resnet50: the torchvision ResNet-50 architecture (v1.5, stride in the 3x3), random weights.
    {"name": "resnet50@224", "arch": "resnet50", "img_size": 224, "batch": 16, "checkpoint": None, "data": None},
]
QUICK = [{"name": "resnet20_cifar@16", "arch": "resnet20_cifar", "img_size": 16, "batch": 8, "checkpoint": None,
          "data": None}]


def count_macs(module, img_size: int) -> int:
    """Multiply-accumulates of one image through `module`'s Conv2d and Linear layers."""
    import torch
    import torch.nn as nn

    total = [0]

    def hook(layer, inputs, output):
        if isinstance(layer, nn.Conv2d):
            total[0] += output.numel() * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            total[0] += output.numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module(torch.zeros(1, 3, img_size, img_size))
    module.train(was_training)
    for h in handles:
        h.remove()
    return total[0]


def arithmetic(mode: str) -> str:
    """The precision a teacher mode computes in ("fp32-ort": fp32 by ONNX Runtime, "bf16-openvino": bf16
    and "int8-openvino": int8 by OpenVINO; "+compile": compiled)."""
    from edgedistill.methods.components import EXPORTED_MODES

    precision = mode.partition("+")[0]
    return precision.partition("-")[0] if precision in EXPORTED_MODES else precision


def cpu_peak(fma_units: int, ghz: float | None) -> dict:
    """Peak MACs/s of one core per precision, with the assumption spelled out."""
    from edgedistill.envinfo import cpu_info

    cpu = cpu_info()
    isa = cpu["isa"]
    if ghz is None:
        try:
            mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("cpu MHz")]
            ghz = round(max(mhz) / 1000, 3) if mhz else None
        except OSError:
            ghz = None
    from edgedistill.envinfo import avx512_on_256bit_units

    split = avx512_on_256bit_units(cpu)  # Zen 4: one 512-bit instruction in two 256-bit halves
    width = 512 if isa.get("avx512f") and not split else 256
    lanes = width // 32
    fp32 = fma_units * lanes * ghz if ghz else None
    bf16 = 2 * fp32 if fp32 and (isa.get("avx512_bf16") or isa.get("amx_bf16")) else None
    int8 = 4 * fp32 if fp32 and isa.get("int8_dot") else None
    return {"gmac_per_s": {"fp32": fp32 and round(fp32, 1), "bf16": bf16 and round(bf16, 1), "int8": int8 and round(int8, 1)},
            "assumption": f"{fma_units} FMA units x {lanes} fp32 lanes ({width}-bit"
                          f"{', AVX-512 on 256-bit units (AMD family 25)' if split else ''}) x {ghz} GHz; bf16 = 2x fp32 "
                          "(VDPBF16PS, two products per lane); int8 = 4x fp32 (VNNI's VPDPBUSD, four per lane); AMX not modelled",
            "isa": isa}


def _cosine(stepper, model: dict, modes: list[str], seed: int, run_dir: Path) -> dict:
    """Per fast mode: the target's cosine to fp32 (see the module doc for which images)."""
    import torch

    from edgedistill.methods.components import EXPORTED_MODES, cosine_summary

    teacher = stepper.method.teacher
    data = model["data"]
    if data is not None and Path(data).is_dir() and model["checkpoint"] is not None:
        from edgedistill.data import train_folder

        cfg = stepper.cfg
        folder = train_folder(cfg.data, cfg.seed)
        teacher.candidates = [m for m in modes if m != "fp32"]  # auto's measurement, of every mode timed here
        teacher.prepare(run_dir, folder, cfg.data, cfg.seed, stepper.device, channels_last=True)
        fidelity = teacher.fidelity
        out = {m: {k: fidelity["modes"][m][k] for k in ("mean_cosine", "q001_cosine", "knn_top1")}
               for m in modes if m in fidelity["modes"]}
        out["fp32"] = {"mean_cosine": 1.0, "q001_cosine": 1.0, "knn_top1": fidelity.get("fp32", {}).get("knn_top1")}
        return {"images": "1,024 augmented training views (the training run's check, centred targets)", "modes": out}
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(model["batch"] * 2, 3, model["img_size"], model["img_size"], generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    teacher.eval()
    reference = teacher._target(x, "fp32")
    out = {}
    for mode in modes:
        teacher.set_mode(mode)
        out[mode] = {k: v for k, v in cosine_summary(reference, teacher._target(x, mode)).items()
                     if k in ("mean_cosine", "q001_cosine")}
    return {"images": f"{x.shape[0]} uniform-noise images (random weights: speed only)", "modes": out}


def bench_model(model: dict, rounds: int, steps: int, seed: int, peak: dict, compile_: bool = False, log=print) -> dict:
    import torch

    from edgedistill.bench.train_speed import _random_teacher_checkpoint, _Stepper, _synthetic_batch, default_teacher_modes
    from edgedistill.kit import load_kit_module
    from edgedistill.methods.components import EXPORTED_MODES, cosine_summary
    from edgedistill.recipe import load_config

    kit = load_kit_module("edgekit")
    device = torch.device("cpu")
    base_modes = default_teacher_modes(device)
    compiled = [m for m in base_modes if m != "fp32" and m not in EXPORTED_MODES]  # torch.compile: torch's modes only
    modes = base_modes + ([f"{m}+compile" for m in compiled] if compile_ else [])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = model["checkpoint"]
        random_weights = checkpoint is None or not Path(checkpoint).is_file()
        if random_weights:
            checkpoint = Path(tmp) / "teacher.pt"
            _random_teacher_checkpoint(model["arch"], checkpoint, None)
        batch, size = model["batch"], model["img_size"]
        common = {"seed": seed, "student.arch": STUDENT, "data.img_size": size, "train.batch_size": batch,
                  "train.channels_last": "true", "train.precision": "fp32", "train.device": "cpu",
                  "data.train": model["data"] if model["data"] is not None and Path(model["data"]).is_dir() else "embedded:digits",
                  "data.workers": 0, "method.queue_size": batch * max(1, 4096 // batch)}
        total = rounds * (steps + 1) * (len(modes) + 1) + 10
        # The fidelity table's DisCo recipe where there is one (its data settings: crop, centring).
        recipe = model.get("recipe") if not random_weights else None
        disco_cfg = load_config(recipe, [f"{k}={v}" for k, v in {
            **common, "method.name": "disco", "teacher.arch": model["arch"], "teacher.checkpoint": checkpoint,
            "teacher.precision": "auto"}.items()])
        disco = _Stepper(disco_cfg, device, 10, False, total)
        disco.cfg = disco_cfg
        moco = _Stepper(load_config(None, [f"{k}={v}" for k, v in {**common, "method.name": "mocov2"}.items()]),
                        device, 10, False, total)
        log(f"{model['name']}: fidelity ...")
        fidelity = _cosine(disco, {**model, "checkpoint": None if random_weights else checkpoint}, base_modes, seed,
                           Path(tmp))
        for mode in modes[len(base_modes):]:  # compiled: cosine through the compiled module, first call compiles it
            log(f"{model['name']}: compiling the {mode} teacher ...")
            disco.set_teacher(mode)
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
            x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            teacher = disco.method.teacher
            with torch.no_grad():
                got = teacher._target(x, mode.partition("+")[0])
            compile_s = time.perf_counter() - t0
            teacher.compile = False
            teacher.set_mode(mode.partition("+")[0])
            with torch.no_grad():
                ref = teacher._target(x, mode.partition("+")[0])
            cos = cosine_summary(ref, got)
            fidelity["modes"][mode] = {"compile_s": round(compile_s, 1),
                                       "cosine_to_uncompiled_mean": cos["mean_cosine"],
                                       "cosine_to_uncompiled_q001": cos["q001_cosine"]}
    macs = count_macs(disco.method.teacher.encoder, size)
    views, labels = _synthetic_batch(batch, size, 10, seed, device)
    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    times = {m: {"teacher": [], "disco": []} for m in modes}
    moco_times: list[float] = []
    for r in range(rounds):
        for mode in modes:
            disco.set_teacher(mode)
            times[mode]["teacher"].append(disco.teacher_ms(views, reps=2))
            times[mode]["disco"] += kit.time_calls(lambda: disco.step(views, labels), warmup=1, runs=steps)
        moco_times += kit.time_calls(lambda: moco.step(views, labels), warmup=1, runs=steps)
        log(f"{model['name']}: round {r + 1}/{rounds}: " + ", ".join(
            f"{m} teacher {times[m]['teacher'][-1]:.0f} ms" for m in modes))
    moco_ms = kit.median_ms(moco_times)
    rows = {}
    for mode in modes:
        teacher_ms = float(sorted(times[mode]["teacher"])[len(times[mode]["teacher"]) // 2])
        step = kit.latency_stats(times[mode]["disco"])
        per_image = teacher_ms / (2 * batch)
        rate = macs / (per_image / 1000) / 1e9
        peak_rate = peak["gmac_per_s"].get(arithmetic(mode))
        rows[mode] = {
            "teacher_ms_per_image": round(per_image, 4), "teacher_ms_both_views": round(teacher_ms, 2),
            "teacher_gmac_per_s": round(rate, 2), "peak_gmac_per_s": peak_rate,
            "fraction_of_peak": round(rate / peak_rate, 3) if peak_rate else None,
            **fidelity["modes"].get(mode, {}),
            "disco_step_ms": round(step["p50"], 2), "disco_step_ms_p90": round(step["p90"], 2),
            "disco_images_per_s": round(batch * 1000 / step["p50"], 1),
            "teacher_share_of_step": round(teacher_ms / step["p50"], 3),
            "mocov2_images_per_s": round(batch * 1000 / moco_ms, 1),
            "disco_over_mocov2": round(moco_ms / step["p50"], 3),
        }
    for row in rows.values():
        row["disco_speedup_over_fp32"] = round(row["disco_images_per_s"] / rows["fp32"]["disco_images_per_s"], 3)
    return {"teacher": model["name"], "arch": model["arch"], "img_size": size, "batch_size": batch, "views": 2,
            "student": STUDENT, "weights": "random (speed only)" if random_weights else str(Path(model["checkpoint"]).name),
            "teacher_macs_per_image": macs, "fidelity_images": fidelity["images"], "mocov2_step_ms": round(moco_ms, 2),
            "modes": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed DisCo / MoCo v2 steps per mode and round")
    parser.add_argument("--fma-units", type=int, default=2)
    parser.add_argument("--ghz", type=float, default=None)
    parser.add_argument("--compile", action="store_true",
                        help="also time each fast mode torch.compile'd (teacher.compile; about a minute to compile each)")
    parser.add_argument("--quick", action="store_true", help="a tiny ResNet-20 at 16 px, batch 8 (a smoke run)")
    parser.add_argument("--teacher", choices=[m["name"] for m in MODELS], action="append",
                        help="time only this teacher (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)

    import os

    import torch

    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json

    torch.set_num_threads(1)
    peak = cpu_peak(args.fma_units, args.ghz)
    chosen = QUICK if args.quick else [m for m in MODELS if not args.teacher or m["name"] in args.teacher]
    rows = [bench_model(m, args.rounds, args.steps, args.seed, peak, args.compile, log=lambda s: print(s, flush=True))
            for m in chosen]
    for row in rows:
        for mode, r in row["modes"].items():
            share = "no peak modelled" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.0%} of peak"
            print(f"{row['teacher']:18s} {mode:8s} teacher {r['teacher_ms_per_image']:.3f} ms/img "
                  f"{r['teacher_gmac_per_s']:6.1f} GMAC/s ({share})  cos "
                  f"{r.get('mean_cosine', r.get('cosine_to_uncompiled_mean', float('nan'))):.6f}/"
                  f"{r.get('q001_cosine', r.get('cosine_to_uncompiled_q001', float('nan'))):.6f}"
                  f"{' (to uncompiled)' if 'mean_cosine' not in r else ''}  DisCo "
                  f"{r['disco_images_per_s']:6.1f} img/s (x{r['disco_speedup_over_fp32']:.2f})  "
                  f"MoCo v2 {r['mocov2_images_per_s']:6.1f}  DisCo/MoCo {r['disco_over_mocov2']:.2f}", flush=True)
    write_json(args.out, {"benchmark": "teacher_speed", "device": "cpu", "threads": torch.get_num_threads(),
                          "compile": args.compile,
                          "rounds": args.rounds, "timed_steps_per_round": args.steps, "channels_last": True,
                          "peak": peak, "rows": rows,
                          "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
                          "environment": environment(1)})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
