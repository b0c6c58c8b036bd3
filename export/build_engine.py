#!/usr/bin/env python3
"""Build a TensorRT engine from an exported ONNX file, on the device that will run it.

Torch-free and dependency-light (the `tensorrt` Python package; `onnx`, where installed, checks an
INT8 file's Q/DQ graph before the build and names a node TensorRT would refuse):
engines are tied to the GPU, TensorRT version and driver they were built with, so they are built
on the target (a Jetson, an x86 box with an NVIDIA GPU), not shipped.

    python build_engine.py model.onnx --fp16                 # fp16 engine (TensorRT 10: FP16 flag)
    python build_engine.py model.int8.s8s8.onnx --int8       # INT8 from the QDQ ONNX (strongly typed)
    python build_engine.py model.onnx --fp16 --print-trtexec # the equivalent trtexec command only

What it does, against the documented TensorRT 10/11 Python API:
- `trt.Builder` + `builder.create_network(flags)`: networks are always explicit-batch in TRT 10
  (the EXPLICIT_BATCH flag is deprecated and not passed); `--int8` on a QDQ model asks for a
  STRONGLY_TYPED network (the Q/DQ nodes carry the precision: explicit quantization; the implicit
  INT8 calibrators are deprecated since TRT 10.1). TRT 11 is always strongly typed and has no
  FP16/INT8 builder flags: there the fp16 engine must be built from `model.fp16.onnx`.
- `trt.OnnxParser.parse_from_file` (handles external weight files), errors listed one per line.
- One optimization profile over the dynamic batch: min/opt/max batch (default 1/8/32).
- Builder flags: FP16 when asked and the TRT version has it; `--weakly-typed --int8` (TRT 10 only)
  builds the QDQ model with INT8+FP16 flags so the unquantized layers may run in fp16.
- A timing cache file is loaded when present and written back after the build, so rebuilds
  (other precisions, other batch ranges) are faster.
- `build_serialized_network` -> the serialized engine (`.engine` / `.plan`) + a JSON sidecar with
  the TensorRT version, GPU, precision, profile and build time.

Exit codes: 0 built (or command printed), 1 the build failed, 2 bad input / TensorRT missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_WORKSPACE_MIB = 2048


class BuildError(RuntimeError):
    """The engine could not be built (parser or builder errors, listed in the message)."""


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when the TensorRT builder can be imported, else (False, one-line reason)."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a placeholder wheel that raises on import
        return False, f"TensorRT is not importable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})"
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        return False, "the installed tensorrt package has no builder (a lean/dispatch runtime only): install the full TensorRT"
    return True, getattr(trt, "__version__", "unknown")


def gpu_name() -> dict | None:
    """GPU name and driver from nvidia-smi (None where there is none); torch-free."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    parts = [p.strip() for p in out[0].split(",")]
    return {"name": parts[0], "driver": parts[1] if len(parts) > 1 else None,
            "compute_capability": parts[2] if len(parts) > 2 else None}


def trtexec_command(onnx_path: str, engine_path: str, precision: str, input_name: str, chw: tuple[int, int, int],
                    batches: tuple[int, int, int] = DEFAULT_BATCHES, timing_cache: str | None = None,
                    workspace_mib: int = DEFAULT_WORKSPACE_MIB, weakly_typed: bool = False) -> str:
    """The trtexec command that builds the same engine as `build()` (TensorRT 10 flags)."""
    c, h, w = chw
    shape = lambda b: f"{input_name}:{b}x{c}x{h}x{w}"  # noqa: E731
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--minShapes={shape(batches[0])}", f"--optShapes={shape(batches[1])}", f"--maxShapes={shape(batches[2])}",
            f"--memPoolSize=workspace:{workspace_mib}M"]
    if precision == "fp16":
        args.append("--fp16")
    elif precision == "int8":
        args += ["--int8", "--fp16"] if weakly_typed else ["--stronglyTyped"]
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def qdq_problems(onnx_path: str | os.PathLike) -> list[str] | None:
    """What TensorRT's explicit quantization will refuse in a QDQ file, one line per node: a
    DequantizeLinear of an int32 tensor (a quantized bias: the parser accepts only activation
    types there), unsigned or asymmetric Q/DQ (TensorRT's are signed int8 with zero point 0), and
    a QuantizeLinear not followed by a DequantizeLinear. None when `onnx` is not installed (the
    parser's own errors still apply)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        source = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and source is not None and source.data_type == onnx.TensorProto.INT32:
            problems.append(f"{node.name}: DequantizeLinear of the int32 tensor {node.input[0]} (a quantized bias); "
                            "TensorRT takes float biases: re-export with `edgedistill export --target tensorrt`")
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zero is not None and (zero.data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(zero).any()):
            problems.append(f"{node.name}: zero point {node.input[2]} is not int8 zero; TensorRT quantizes "
                            "symmetrically to signed int8 (qdq-s8s8-sym)")
        if node.op_type == "QuantizeLinear" and any(c.op_type != "DequantizeLinear" for c in consumers.get(node.output[0], [])):
            problems.append(f"{node.name}: QuantizeLinear output {node.output[0]} feeds a node other than DequantizeLinear")
    return problems


def build(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str = "fp16",
          batches: tuple[int, int, int] = DEFAULT_BATCHES, timing_cache: str | os.PathLike | None = None,
          workspace_mib: int = DEFAULT_WORKSPACE_MIB, weakly_typed: bool = False, verbose: bool = False) -> dict:
    """Build and serialize an engine; returns the sidecar record (also written as <engine>.json)."""
    import tensorrt as trt

    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    bmin, bopt, bmax = batches
    if not 1 <= bmin <= bopt <= bmax:
        raise ValueError(f"batches must satisfy 1 <= min <= opt <= max, got {batches}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision == "int8":  # name the offending node before the parser's less telling error
        problems = qdq_problems(onnx_path)
        if problems:
            raise BuildError(f"{onnx_path}: not a TensorRT explicit-quantization graph:\n  " + "\n  ".join(problems))
    major = int(str(trt.__version__).split(".")[0])
    flag_names = set(dir(trt.BuilderFlag))
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)

    strongly_typed = precision == "int8" and not weakly_typed
    if precision == "fp16" and "FP16" not in flag_names:
        strongly_typed = True  # TRT 11+: the ONNX itself must be fp16 (model.fp16.onnx)
    if weakly_typed and "INT8" not in flag_names:
        raise BuildError(f"TensorRT {trt.__version__} has no weakly typed INT8 (BuilderFlag.INT8 was removed): drop --weakly-typed")
    flags = 0
    if strongly_typed and major < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{onnx_path}: the ONNX parser failed:\n  " + "\n  ".join(errors or ["(no parser message)"]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and weakly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    inputs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        fixed = [int(d) for d in dims[1:]]
        if any(d < 0 for d in fixed):
            raise BuildError(f"{onnx_path}: input {tensor.name} has dynamic non-batch dimensions {dims}: re-export with a fixed image size")
        profile.set_shape(tensor.name, [bmin, *fixed], [bopt, *fixed], [bmax, *fixed])
        inputs.append({"name": tensor.name, "shape": [-1, *fixed], "dtype": str(tensor.dtype)})
    config.add_optimization_profile(profile)

    cache_bytes = b""
    if timing_cache and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build a {precision} engine (see the TensorRT log above)")
    _write_atomic(engine_path, memoryview(serialized))
    if timing_cache:  # shared between builds: a half-written cache would poison the next one
        _write_atomic(Path(timing_cache), memoryview(config.get_timing_cache().serialize()))

    record = {
        "engine": str(engine_path),
        "onnx": str(onnx_path),
        "precision": precision,
        "strongly_typed": bool(strongly_typed),
        "tensorrt": str(trt.__version__),
        "gpu": gpu_name(),
        "profile": {"min": bmin, "opt": bopt, "max": bmax},
        "inputs": inputs,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "workspace_mib": workspace_mib,
        "build_seconds": round(seconds, 2),
        "bytes": engine_path.stat().st_size,
    }
    _write_atomic(Path(str(engine_path) + ".json"), json.dumps(record, indent=2).encode())
    return record


def _write_atomic(path: Path, data) -> None:
    """Write through a uniquely named temporary file beside `path`, then rename (no half files;
    two builds writing the same file never share a temporary)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _input_from_manifest(onnx_path: Path) -> tuple[str, tuple[int, int, int]] | None:
    """Input name and CHW from the export's manifest.json (beside the model, or one level up)."""
    for folder in (onnx_path.parent, onnx_path.parent.parent):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            spec = json.loads(manifest.read_text()).get("input", {})
            if spec.get("name") and spec.get("shape"):
                return spec["name"], tuple(int(d) for d in spec["shape"][1:])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", type=Path, help="exported ONNX file (model.onnx, model.fp16.onnx, model.int8.s8s8.onnx)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_const", dest="precision", const="fp16", help="fp16 engine (default)")
    prec.add_argument("--int8", action="store_const", dest="precision", const="int8", help="INT8 engine from a QDQ ONNX")
    prec.add_argument("--fp32", action="store_const", dest="precision", const="fp32", help="fp32 engine (reference)")
    p.add_argument("--engine", type=Path, help="output engine (default: <onnx stem>.<precision>.engine)")
    p.add_argument("--min-batch", type=int, default=DEFAULT_BATCHES[0])
    p.add_argument("--opt-batch", type=int, default=DEFAULT_BATCHES[1])
    p.add_argument("--max-batch", type=int, default=DEFAULT_BATCHES[2])
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (read when present, then updated)")
    p.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB)
    p.add_argument("--weakly-typed", action="store_true", help="TRT 10 only: INT8+FP16 flags instead of a strongly typed network")
    p.add_argument("--print-trtexec", action="store_true", help="print the equivalent trtexec command and exit")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    precision = args.precision or "fp16"
    if not args.onnx.is_file():
        print(f"error: {args.onnx} does not exist: pass an exported ONNX file", file=sys.stderr)
        return 2
    engine = args.engine or args.onnx.with_name(f"{args.onnx.stem}.{precision}.engine")
    batches = (args.min_batch, args.opt_batch, args.max_batch)
    if args.print_trtexec:
        spec = _input_from_manifest(args.onnx) or ("input", (3, 224, 224))
        print(trtexec_command(str(args.onnx), str(engine), precision, spec[0], spec[1], batches,
                              str(args.timing_cache) if args.timing_cache else None, args.workspace_mib, args.weakly_typed))
        return 0
    ok, why = tensorrt_available()
    if not ok:
        print(f"error: {why}; on the device use the trtexec command (--print-trtexec) or install TensorRT", file=sys.stderr)
        return 2
    try:
        record = build(args.onnx, engine, precision, batches, args.timing_cache, args.workspace_mib, args.weakly_typed, args.verbose)
    except (BuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
