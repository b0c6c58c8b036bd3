"""How closely the torch fake-quant graph (what QAD trains, `deploy.qad.FakeQuantGraph`) and ONNX
Runtime compute one exported INT8 file: top-1 agreement and output KL of each against the exact QDQ
reference (ONNX Runtime, graph optimisation off), beside the file's own KL from fp32. The same
measure as the export's QAD parity check, taken on a file before any training, so a gap found after
QAD can be told from the arithmetic.

    python bench/qdq_parity.py RUN EXPORT_DIR [--placement tuned] [--images 2000]

RUN: the training run (its validation images); EXPORT_DIR: an `edgedistill export --int8` folder.
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
        graph = qad.FakeQuantGraph(onnx.load(str(int8)), qad.float_initializers(pre))
    exact = run(session(int8, exact=True), images)
    fp32 = run(session(args.export / "model.onnx"), images)
    print(f"{int8.name} on {len(images)} validation images; exact reference vs fp32: KL "
          f"{output_divergence(fp32, exact, 'classifier'):.5f}")
    for name, out in (("torch fake-quant graph", qad.outputs(graph, images)), ("ONNX Runtime's kernels", run(session(int8), images))):
        print(f"{name} vs the exact reference: agreement {100 * (out.argmax(1) == exact.argmax(1)).mean():.2f}%, "
              f"KL {output_divergence(out, exact, 'classifier'):.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
