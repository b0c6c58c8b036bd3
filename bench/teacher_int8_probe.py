"""Where an INT8 teacher's error comes from (issue 20): the CIFAR ResNet-56's centred target, INT8
placements and calibrators side by side, the mean cosine to fp32's by OpenVINO and by the exact QDQ
reference (ONNX Runtime, graph optimisation off). Cosines only: it may run beside other work.

    OMP_NUM_THREADS=1 python bench/teacher_int8_probe.py    # -> bench/results/teacher_int8_probe.json (~10 min)

The views are the training run's fidelity views (`FrozenTeacher._fidelity_data`: two augmented
views of 512 training images, seed 0, the DisCo recipe's augmentation); the even ones calibrate
(ONNX Runtime's `quantize_static`, QDQ u8s8, per-channel int8 weights, 7 bits of them on a CPU
without VNNI as the export builds them), the odd ones measure. `--variant NAME` runs only those.
`int8-openvino` is the last placement (`methods/components.INT8_OV_MODE`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "bench" / "results" / "teacher_int8_probe.json"
RECIPE = ROOT / "recipes" / "fidelity" / "disco.yaml"
CHECKPOINT = ROOT.parent / "shared" / "teachers" / "resnet-cifar10" / "resnet56-4bfd9763.th"
TRAIN = ROOT / ".data" / "cifar10-jpg" / "train"
# name: (quantized op types, which convolutions stay float, calibrator, percentile)
VARIANTS = {
    "conv+add, minmax": (("Conv", "Add"), "none", "minmax", None),
    "conv, minmax": (("Conv",), "none", "minmax", None),
    "conv+add, minmax, first stage only": (("Conv", "Add"), "stages 2-3", "minmax", None),
    "conv, stem float, minmax": (("Conv",), "stem", "minmax", None),
    "conv, stem float, percentile 99.99": (("Conv",), "stem", "percentile", 99.99),
    "conv, stem float, percentile 99.9999": (("Conv",), "stem", "percentile", 99.9999),
    "conv, stem float, percentile 99.999 (int8-openvino)": (("Conv",), "stem", "percentile", 99.999),
    "conv, stem and first stage float, percentile 99.999": (("Conv",), "stage 1", "percentile", 99.999),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="only these (default: all)")
    args = parser.parse_args(argv)

    import numpy as np
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgedistill.data.folder import scan_folder
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy.onnx_module import INPUT_NAME, export_module
    from edgedistill.deploy.runtime import session
    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json
    from edgedistill.kit import load_kit_module
    from edgedistill.methods.components import FrozenTeacher, cosine_summary
    from edgedistill.recipe import load_config

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, [f"teacher.checkpoint={CHECKPOINT}", "teacher.precision=fp32", f"data.train={TRAIN}"])
    folder = scan_folder(cfg.data.train)
    teacher = FrozenTeacher(cfg.teacher, "eval", center=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher.prepare(tmp, folder, cfg.data, cfg.seed, torch.device("cpu"), "mocov2", cfg.train.batch_size)
        views = teacher._fidelity_data(folder, cfg.data, cfg.seed, torch.device("cpu"), "mocov2",
                                       torch.contiguous_format)[0].contiguous().numpy()
        calib, test = views[0::2], views[1::2]
        center = teacher.center.numpy()
        teacher.encoder.eval()
        with torch.no_grad():
            reference = teacher.encoder(torch.from_numpy(test)).float().numpy() - center
        fp32, pre = tmp / "teacher.onnx", tmp / "teacher.pre.onnx"
        export_module(teacher.encoder, fp32, cfg.data.img_size, "embedding")
        q.prepare(fp32, pre)
        convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
        adds = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Add"]
        kit = load_kit_module("edgekit")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(calib[i:i + 32] for i in range(0, len(calib), 32))

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {INPUT_NAME: batch}

        def cosine(run) -> float:
            out = np.concatenate([run(test[i:i + 128]) for i in range(0, len(test), 128)]) - center
            return cosine_summary(torch.from_numpy(reference), torch.from_numpy(out))["mean_cosine"]

        weights = q.format_options("qdq-u8s8", q.resolve_cpu_class("auto"))  # 7-bit weights without VNNI
        for name in args.variant or VARIANTS:
            op_types, float_convs, calibrator, percentile = VARIANTS[name]
            first_stage = q.first_stage_nodes(pre)  # the stem and the first stage's convolutions
            exclude = {"none": [], "stem": q.stem_nodes(pre), "stage 1": first_stage,
                       "stages 2-3": convs[len(first_stage):] + adds[len(adds) // 3:]}[float_convs]
            path = tmp / "int8.onnx"
            quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=weights["reduce_range"],
                            op_types_to_quantize=list(op_types), nodes_to_exclude=exclude,
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "percentile": CalibrationMethod.Percentile}[calibrator],
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           **({"CalibPercentile": percentile} if percentile else {})})
            exact = session(path, threads=1, exact=True)
            rows[name] = {"openvino_bf16": cosine(kit.OpenVinoRunner(path, 1, inference_precision="bf16").predict),
                          "exact_qdq": cosine(lambda x: exact.run(None, {INPUT_NAME: x})[0]),
                          "int8_convs": q.int8_share(pre, path)["int8"], "convs": len(convs)}
            print(f"{name:55s} OpenVINO {rows[name]['openvino_bf16']:.6f}  exact QDQ {rows[name]['exact_qdq']:.6f}  "
                  f"{rows[name]['int8_convs']}/{len(convs)} convs INT8", flush=True)
        rows["float, OpenVINO bf16 (bf16-openvino)"] = {
            "openvino_bf16": cosine(kit.OpenVinoRunner(fp32, 1, inference_precision="bf16").predict)}
    write_json(args.out, {"benchmark": "teacher_int8_probe", "teacher": CHECKPOINT.name, "target": "centred, normalised",
                          "calibration_views": len(calib), "measured_views": len(test),
                          "seven_bit_weights": weights["reduce_range"], "rows": rows,
                          "environment": environment(1)})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
