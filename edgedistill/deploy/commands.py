"""`edgedistill export`: ONNX fp32/fp16, INT8 QDQ and TensorRT engines of a run, each checked on
real validation images. Heavy imports happen inside the command."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from edgedistill.cli_helpers import EXIT_CHECK_FAILED, handle_errors
from edgedistill.deploy.quantize import CALIBRATORS, CPU_CLASSES, DEFAULT_OPSET, EXPORTERS, FORMATS, PLACEMENTS, TARGETS


def _choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum for a Typer option from the Literal values declared in deploy/quantize.py."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Target = _choice_enum("Target", TARGETS)
CpuClass = _choice_enum("CpuClass", ("auto", *CPU_CLASSES))
Int8Format = _choice_enum("Int8Format", ("auto", *FORMATS))
Calibrator = _choice_enum("Calibrator", CALIBRATORS)
Placement = _choice_enum("Placement", PLACEMENTS)
Exporter = _choice_enum("Exporter", EXPORTERS)


@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (config.yaml, student.safetensors; classifier.safetensors from `edgedistill eval`).")],
    int8: Annotated[bool, typer.Option("--int8", help="Also write an INT8 QDQ model (ONNX Runtime static PTQ).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an fp16 ONNX model (fp32 input/output).")] = False,
    target: Annotated[Target, typer.Option(help="INT8 target: ort-cpu (format measured fastest on this CPU) or tensorrt (signed symmetric QDQ; engines where TensorRT + a GPU exist).")] = Target("ort-cpu"),
    cpu: Annotated[CpuClass, typer.Option("--cpu", help="CPU class the INT8 file is built for (ort-cpu): auto (this machine, said in the log and manifest), x86-avx2 (7-bit weights: no VNNI), x86-vnni or arm64. A class other than this machine's is scored with the exact QDQ arithmetic, as is every TensorRT file.")] = CpuClass("auto"),
    int8_format: Annotated[Int8Format, typer.Option("--int8-format", help="auto (ort-cpu: time both), qdq-s8s8-sym or qdq-u8s8.")] = Int8Format("auto"),
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="Folder of calibration images (default: the run's training images).")] = None,
    calib_count: Annotated[int | None, typer.Option("--calib-count", help="Calibration images (default 512, capped by what exists; an explicit count larger than the folder is an error).")] = None,
    calibrator: Annotated[Calibrator, typer.Option(help="auto (try Percentile 99.9/99.99/99.999, Entropy and MinMax; keep the one whose output diverges least from fp32 on held-out calibration images), minmax, entropy or percentile.")] = Calibrator("auto"),
    percentile: Annotated[float, typer.Option(help="Percentile calibrator's percentile (asymmetric where the format allows).")] = 99.99,
    placement: Annotated[Placement, typer.Option(help="Where the Q/DQ pairs go. auto (ort-cpu: build `tuned` and `split-hardswish`, score both on held-out calibration images, time both beside fp32 on this CPU when it is of the --cpu class, keep the fastest that costs no accuracy; tensorrt: `tuned`), tuned (every op type ONNX Runtime quantizes, HardSwish kept whole in float with clipped input ranges; for tensorrt only the weighted layers' and residual adds' inputs), split-hardswish (HardSwish split into int8 HardSigmoid + Mul first) or ort-default (ONNX Runtime's stock quantize_static, for comparison).")] = Placement("auto"),
    int8_classifier: Annotated[bool, typer.Option("--int8-classifier", help="Quantize the classifier's head too: by default everything from the output of the last layer before the global pooling to the logits runs with float activations (its layers but the classifier with int8 weights), because one 8-bit scale over the features, pooled or not yet pooled, is too coarse for most of their channels; see docs/int8.md. With this and --int8-stem every weighted layer is INT8. Either way export warns when the INT8 file's expected drop on held-out calibration images exceeds a point.")] = False,
    int8_stem: Annotated[bool, typer.Option("--int8-stem", help="Quantize the stem (the layer that reads the image) too: by default it stays in float, its output quantized for the next layer, because its weights are a negligible share of the file, its 3-channel INT8 kernel is slower than fp32 on CPUs, and it is among the layers whose quantization costs most accuracy; see docs/int8.md.")] = False,
    entropy_bins: Annotated[int, typer.Option("--entropy-bins", help="Entropy calibrator histogram bins (TensorRT uses 2048; slower).")] = 512,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="INT8 top-1 drop budget in points. When post-training quantization misses it: the layers whose float precision helps the network output most (end-to-end sensitivity) kept in float, the fewest that meet it (at most --max-float-share); if that cannot meet it, quantization-aware distillation (--qad-steps) and the same fallback on its model.")] = None,
    max_float_share: Annotated[float, typer.Option("--max-float-share", help="--max-drop keeps at most this share of the weighted layers in float (1 = no limit).")] = 0.1,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Write the per-layer INT8 sensitivity report (sensitivity.json: each layer's effect on the network output) even without --max-drop.")] = False,
    latency_fallback: Annotated[bool, typer.Option("--latency-fallback", help="Time the INT8 file with each block's layers in float beside the all-INT8 file on this CPU (ort-cpu, a machine of the --cpu class) and keep in float the blocks whose INT8 kernels are slower, when the result is faster and loses no more accuracy (or stays within --max-drop); the manifest's int8.latency_fallback has the per-block table.")] = False,
    qad_steps: Annotated[int | None, typer.Option("--qad-steps", help="Quantization-aware distillation after PTQ: fine-tune the INT8 model (fake quantization exactly as exported) against the fp32 model on unlabelled training images for N steps, then export the QDQ model with the trained weights. Given (N > 0): right after PTQ, before any layer goes back to float. Default: 300 steps only when PTQ and the float fallback both miss --max-drop; 0 = never.")] = None,
    qad_lr: Annotated[float, typer.Option("--qad-lr", help="QAD learning rate, relative: each tensor moves by about this fraction of its RMS per step (Adam, cosine decay to 0).")] = 1e-3,
    qad_batch: Annotated[int, typer.Option("--qad-batch", help="QAD batch size (images per step).")] = 64,
    embedding: Annotated[bool, typer.Option("--embedding", help="Export the bare embedding model (pooled features), not the classifier.")] = False,
    out: Annotated[Path | None, typer.Option(help="Export folder (default: RUN/export).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 parses in ONNX Runtime and TensorRT 8.6+).")] = DEFAULT_OPSET,
    exporter: Annotated[Exporter, typer.Option(help="legacy (TorchScript, fast) or dynamo (torch.export; opset >= 18).")] = Exporter("legacy"),
    val_count: Annotated[int, typer.Option("--val-count", help="Validation images every artifact is scored on (a seeded subset, at least 1; all of them when the folder holds fewer). They are held in memory as one array.")] = 1000,
    tolerance: Annotated[float, typer.Option(help="fp32 parity: max |ONNX - torch| / max(1, max |torch|).")] = 1e-4,
    tolerance_fp16: Annotated[float, typer.Option("--tolerance-fp16", help="fp16 parity tolerance (same measure).")] = 2e-2,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to optimise for.")] = 8,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 32,
):
    """Export a run: ONNX fp32 (+ fp16, + INT8 QDQ), checked against torch on real validation images, with manifest.json, accuracy.json, sample inputs and the device kit.

    INT8: post-training quantization; with --max-drop, the fewest layers back in float that meet it, and quantization-aware distillation only when they cannot (or when asked: --qad-steps). The manifest says which delivered the file.

    Exit codes: 0 ok, 1 a check failed (parity beyond tolerance, --max-drop not reachable), 2 bad input.
    """
    from edgedistill.deploy.exporter import ExportCheckFailed, export_run
    from edgedistill.ui import console, setup_logging

    setup_logging()
    try:
        folder = export_run(
            run, int8=int8, fp16=fp16, target=target.value, cpu=cpu.value, int8_format=int8_format.value, calib_data=calib_data,
            calib_count=calib_count, calibrator=calibrator.value, percentile=percentile, placement=placement.value,
            int8_classifier=int8_classifier, int8_stem=int8_stem, entropy_bins=entropy_bins, max_drop=max_drop, max_float_share=max_float_share, sensitivity=sensitivity,
            latency_fallback=latency_fallback,
            qad_steps=qad_steps, qad_lr=qad_lr, qad_batch=qad_batch, embedding=embedding, out=out, opset=opset,
            exporter=exporter.value, val_count=val_count, tolerance=tolerance, tolerance_fp16=tolerance_fp16,
            batches=(min_batch, opt_batch, max_batch),
        )
    except ExportCheckFailed as e:
        if e.export_dir is not None:
            print_export(e.export_dir)
        console.print(f"[bold red]check failed:[/] {e}", highlight=False)
        raise typer.Exit(EXIT_CHECK_FAILED) from None
    print_export(folder)


def print_export(folder: Path) -> None:
    """One table: artifact, file, size, top-1, agreement, max |diff|, notes."""
    from rich.table import Table

    from edgedistill.ui import console

    from edgedistill.deploy.manifest import MANIFEST_FILE, read_manifest, recommendation_text

    manifest = read_manifest(Path(folder), f"re-run `edgedistill export` into {folder}")
    table = Table(title=f"{folder}  ({manifest['arch']}, {manifest['kind']}, {manifest['validation']['images']} val images)")
    for col in ("artifact", "file", "size (KB)", "top-1", "agreement", "max |diff|", "notes"):
        table.add_column(col, justify="left" if col in ("artifact", "file", "notes") else "right")
    for a in manifest["artifacts"]:
        acc = a.get("accuracy") or {}
        notes = []
        if a.get("parity"):
            notes.append("parity ok" if a["parity"]["passed"] else "[red]parity FAILED[/]")
        qz = a.get("quantization")
        if qz:
            layers = qz["int8_layers"]
            notes.append(f"{qz['name']}, {qz['calibration']['label']}, drop {acc.get('drop_vs_fp32', 0):.2f}"
                         + (f" ± {acc['drop_se']:.2f}" if "drop_se" in acc else ""))
            notes.append(f"{layers['int8']}/{layers['weighted_layers']} layers INT8, {qz['size_ratio_vs_fp32']:.1f}x smaller")
        table.add_row(a["name"], a["file"] or "(run folder)", f"{a['bytes'] / 1024:.0f}" if a.get("bytes") else "-",
                      f"{acc['top1']:.2f}" if "top1" in acc else "-",
                      f"{acc['agreement']:.2f}" if "agreement" in acc else "-",
                      f"{acc['max_abs_diff']:.2g}" if a["file"] else "-", "; ".join(notes))
    console.print(table)
    int8 = manifest.get("int8") or {}
    if int8.get("format_choice"):
        console.print(f"INT8 format: {int8['format_choice']['reason']}", highlight=False)
    for score in (int8.get("calibration") or {}).get("auto_scores") or []:
        console.print(f"  calibrator {score['calibrator']}: output divergence {score['output_divergence']:.5f}", highlight=False)
    if int8.get("placement_choice"):
        console.print(f"INT8 placement: {int8['placement_choice']['reason']}", highlight=False)
    rec = manifest.get("recommendation")
    if rec:
        console.print(recommendation_text(rec), highlight=False)
    if (int8.get("classifier_check") or {}).get("fragile"):
        console.print(f"[yellow]warning:[/] {int8['classifier_check']['advice']}", highlight=False)
    trt = manifest.get("tensorrt") or {}
    if trt.get("built"):
        console.print(f"TensorRT engines: {', '.join(e['engine'] for e in trt['engines'] if 'error' not in e)}")
    elif manifest.get("target") == "tensorrt":
        console.print(f"TensorRT engines skipped: {trt.get('reason')}", highlight=False)
        for job in trt.get("commands", []):
            console.print(f"  on the device: {job['kit_command']}", highlight=False, soft_wrap=True)
    console.print(f"manifest: {Path(folder) / MANIFEST_FILE}  status: {manifest['status']}", highlight=False)
