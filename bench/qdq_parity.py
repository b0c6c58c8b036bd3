"""How closely the torch fake-quant graph (what QAD trains, `deploy.qad.FakeQuantGraph`) and ONNX
Runtime compute one exported INT8 file: top-1 agreement and output KL of each against the exact QDQ
reference (ONNX Runtime, graph optimisation off), beside the file's own KL from fp32. The same
measure as the export's QAD parity check, taken on a file before any training, so a gap found after
QAD can be told from the arithmetic.

    python bench/qdq_parity.py RUN EXPORT_DIR [--placement tuned] [--images 2000] [--perturb]

RUN: the training run (its validation images); EXPORT_DIR: an `edgedistill export --int8` folder.
`--perturb`: QAD's write-back instead. Every learnable activation scale of the torch graph is moved
by its own random factor in [0.8, 1.25] and every weight by 5% Gaussian noise (what training
might do), the file is made again from them the way the export makes the QAD file (the trained
float weights, the learnt scales as overrides, the export's ranges), and the same comparison is
taken on it, with a count of the learnt scales that did not reach the file unchanged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("export", type=Path)
    parser.add_argument("--placement", default="tuned", help="the placement the INT8 file was built with")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--perturb", action="store_true", help="check QAD's write-back (see above)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import onnx

    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import qad
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy.runtime import output_divergence, run, session
    from edgedistill.runfolder.load import load_run_config

    int8 = next(args.export.glob("model.int8.*.onnx"))
    images, _, _, _ = ddata.validation_set(load_run_config(args.run), args.images)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "model.pre.onnx"
        q.prepare(args.export / "model.onnx", pre, args.placement)
        graph = qad.FakeQuantGraph(onnx.load(str(int8)), qad.float_initializers(pre), learn_scales=args.perturb)
        if args.perturb:
            int8 = _written_back(graph, pre, args, Path(tmp))
        exact = run(session(int8, exact=True), images)
        ort = run(session(int8), images)
    fp32 = run(session(args.export / "model.onnx"), images)
    print(f"{int8.name} on {len(images)} validation images; exact reference vs fp32: KL "
          f"{output_divergence(fp32, exact, 'classifier'):.5f}")
    for name, out in (("torch fake-quant graph", qad.outputs(graph, images)), ("ONNX Runtime's kernels", ort)):
        print(f"{name} vs the exact reference: agreement {100 * (out.argmax(1) == exact.argmax(1)).mean():.2f}%, "
              f"KL {output_divergence(out, exact, 'classifier'):.5f}")
    return 0


def _written_back(graph, pre: Path, args, tmp: Path) -> Path:
    """The graph's scales and weights perturbed, then the file made from them as the export makes
    the QAD file; prints how many learnt scales the file does not carry unchanged."""
    import json
    import shutil

    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from edgedistill.deploy import qad
    from edgedistill.deploy import quantize as q

    manifest = json.loads((args.export / "manifest.json").read_text())
    int8 = manifest["int8"]
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for log_scale in graph.act_scales:
            log_scale.add_(float(np.log(rng.uniform(0.8, 1.25))))
        for weight in graph.params:
            weight.mul_(1 + 0.05 * torch.randn(weight.shape, generator=gen))
    label = int8["calibration"]["label"]
    settings = q.QuantSettings(int8["calibration"]["calibrator"], percentile=int8["calibration"].get("percentile", 99.99))
    calib = q.Calibration(pre, [], [label], settings, {}, tmp, None)
    shutil.copyfile(args.export / "calibration.json", calib.path)  # the export's ranges
    plan = q.make_plan("ort-cpu", pre, args.placement, int8["cpu_class"]["built_for"],
                       float_classifier=bool(int8["placement"]["float_nodes"]), float_stem=False)
    trained = qad.write_trained_float(pre, graph.trained_weights(), tmp / "model.trained.onnx")
    overrides = graph.activation_overrides()
    out = q.quantize(trained, tmp / "model.int8.written.onnx", int8["format"], calib, plan, overrides=overrides)
    consts = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    # (a graph output's Q reads the float tensor under the quantizer's new name)
    written = {n.input[0].removesuffix("_QuantizeLinear_Input"): float(consts[n.input[1]])
               for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear" and n.input[1] in consts}
    off = [t for t, o in overrides.items() if t not in written or abs(written[t] / float(o["scale"]) - 1) > 1e-5]
    print(f"--perturb: {len(overrides)} learnt activation scales written back, {len(off)} not as learnt")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
