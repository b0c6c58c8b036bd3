"""Quantization-aware distillation: the torch fake-quant arithmetic against ONNX Runtime's
QuantizeLinear/DequantizeLinear, the QDQ graph executed in torch against the exported file, QAD
repairing a damaged post-training model, and an interrupted QAD resuming exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from int8util import calibration, export_mnv3
from onnx import TensorProto, helper

from edgedistill.deploy import qad
from edgedistill.deploy import quantize as q
from edgedistill.deploy.runtime import run, session


def _qdq_model(zero_point: np.ndarray, scale: np.ndarray, shape: list[int], axis: int) -> bytes:
    """x -> QuantizeLinear -> (q) -> DequantizeLinear -> (y), both outputs visible."""
    elem = TensorProto.UINT8 if zero_point.dtype == np.uint8 else TensorProto.INT8
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("q", elem, shape), helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(zero_point, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("zero_point", [np.uint8(131), np.int8(0)], ids=["u8-asymmetric", "s8-symmetric"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_matches_onnxruntime_quantize_dequantize(zero_point, per_channel):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    channels = 4
    scale = np.array([0.05, 0.013, 0.2, 0.7], np.float32) if per_channel else np.float32(0.05)
    zp = np.full(channels, zero_point, dtype=zero_point.dtype) if per_channel else np.asarray(zero_point)
    x = rng.standard_normal((3, channels, 50)).astype(np.float32) * 20  # far beyond the range: saturation
    step = (scale.reshape(1, -1, 1) if per_channel else scale)
    x[:, :, :10] = (np.arange(-5, 5) + 0.5)[None, None, :] * step  # exact ties: round half to even
    sess = ort.InferenceSession(_qdq_model(zp, scale, list(x.shape), 1), providers=["CPUExecutionProvider"])
    ort_q, ort_y = sess.run(None, {"x": x})
    qmin, qmax = (0, 255) if zero_point.dtype == np.uint8 else (-128, 127)
    args = (torch.from_numpy(np.asarray(scale)), torch.from_numpy(zp.astype(np.float32)))
    torch_q = qad.quantize_linear(torch.from_numpy(x), *args, qmin, qmax, axis=1).numpy()
    torch_y = qad.fake_quantize(torch.from_numpy(x), *args, qmin, qmax, axis=1).numpy()
    np.testing.assert_array_equal(torch_q, ort_q.astype(np.float32))
    np.testing.assert_array_equal(torch_y, ort_y)
    assert (ort_q == qmin).any() and (ort_q == qmax).any()  # saturation was exercised


def test_straight_through_gradient_inside_the_range_only():
    x = torch.tensor([-10.0, 0.26, 0.74, 10.0], requires_grad=True)
    qad.fake_quantize(x, torch.tensor(0.5), torch.tensor(0.0), -4, 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def mnv3(tmp_path_factory):
    """Random MobileNetV3-Small: the torch model, its prepared ONNX graph and a calibration."""
    tmp = tmp_path_factory.mktemp("qad")
    model = export_mnv3(tmp / "model.onnx", seed=1)
    pre = tmp / "pre.onnx"
    q.prepare(tmp / "model.onnx", pre)
    images = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    return model, pre, calibration(pre, tmp, images), tmp


@pytest.mark.parametrize("fmt,target", [("qdq-u8s8", "ort-cpu"), ("qdq-s8s8-sym", "tensorrt")])
def test_qdq_file_matches_the_torch_fake_quant_graph_before_and_after_training(mnv3, fmt, target):
    _model, pre, calib, tmp = mnv3
    plan = q.make_plan(target, pre)
    ptq = q.quantize(pre, tmp / f"{fmt}.onnx", fmt, calib, plan)
    graph = qad.FakeQuantGraph(onnx.load(str(ptq)), qad.float_initializers(pre), learn_scales=True)
    assert len(graph.act_scales) > 10
    images = np.random.default_rng(5).standard_normal((64, 3, 32, 32)).astype(np.float32)

    def matching(path: Path) -> float:
        ours, theirs = qad.outputs(graph, images), run(session(path), images)
        scale = max(1.0, float(np.abs(theirs).max()))
        return float((np.abs(ours - theirs).max(1) <= 1e-3 * scale).mean())

    assert matching(ptq) >= 0.95
    # Move the weights and activation scales as training would; the export quantizes the weights
    # again with ONNX Runtime and hands it the scales.
    with torch.no_grad():
        for param in graph.params:
            param.mul_(1.0 + 0.05 * torch.randn_like(param))
        for log_scale in graph.act_scales:
            log_scale.add_(0.1 * torch.randn(()))
    trained = qad.write_trained_float(pre, graph.trained_weights(), tmp / f"{fmt}.trained.onnx")
    requantized = q.quantize(trained, tmp / f"{fmt}.qad.onnx", fmt, calib, plan, overrides=graph.activation_overrides())
    assert matching(requantized) >= 0.95
    assert not np.allclose(run(session(requantized), images), run(session(ptq), images))


class _Images:
    """A deterministic unlabelled loader with the training loaders' interface; can fail at a step."""

    name = "synthetic"

    def __init__(self, batch_size: int = 8, steps_per_epoch: int = 3, fail_at: int | None = None):
        self.batch_size, self.steps_per_epoch, self.fail_at, self.served = batch_size, steps_per_epoch, fail_at, 0

    def epoch(self, epoch: int, skip: int = 0):
        for step in range(skip, self.steps_per_epoch):
            if self.fail_at is not None and self.served == self.fail_at:
                raise KeyboardInterrupt("interrupted mid-QAD")
            self.served += 1
            gen = torch.Generator().manual_seed(1000 * epoch + step)
            yield [torch.randn(self.batch_size, 3, 32, 32, generator=gen)], torch.zeros(self.batch_size)


def test_interrupted_qad_resumes_exactly(mnv3, tmp_path):
    model, pre, calib, tmp = mnv3
    ptq = q.quantize(pre, tmp / "resume.onnx", "qdq-u8s8", calib, q.make_plan("ort-cpu", pre))
    settings = qad.QADSettings(steps=7, lr=1e-3, checkpoint_every=2, log_every=1)
    key = qad.checkpoint_key(ptq, settings)

    def fresh() -> qad.FakeQuantGraph:
        return qad.FakeQuantGraph(onnx.load(str(ptq)), qad.float_initializers(pre))

    straight = fresh()
    whole = qad.train(straight, model, _Images(), "classifier", settings, tmp_path / "a", key, progress=False)
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        qad.train(fresh(), model, _Images(fail_at=5), "classifier", settings, tmp_path / "b", key, progress=False)
    assert (tmp_path / "b" / qad.CHECKPOINT_FILE).is_file()
    resumed = fresh()
    record = qad.train(resumed, model, _Images(), "classifier", settings, tmp_path / "b", key, progress=False)
    assert record["resumed_from_step"] == 4 and record["loss_curve"] == whole["loss_curve"]
    for a, b in zip(straight.params, resumed.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not (tmp_path / "b" / qad.CHECKPOINT_FILE).exists()  # removed once finished
    # Other settings do not pick up a foreign checkpoint.
    assert qad.checkpoint_key(ptq, qad.QADSettings(steps=8)) != key


def _small_cnn(path: Path) -> torch.nn.Module:
    """Three conv+ReLU layers, global pooling, a linear head (random, seeded), exported as ONNX."""
    import warnings

    torch.manual_seed(3)
    layers = [torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
              torch.nn.Conv2d(32, 32, 3, 1, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
              torch.nn.Linear(32, 10)]
    with torch.no_grad():  # logits that differ between images (a random head averages to ~0)
        layers[-1].weight.mul_(200.0)
    model = torch.nn.Sequential(*layers).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return model


def test_qad_repairs_a_damaged_minmax_model(tmp_path):
    """MinMax ranges calibrated on images 128x too bright (steps 128x too coarse: 16% of the decisions flip), nothing
    excluded: QAD against the fp32 model lowers the INT8 model's divergence from fp32 on images it
    did not train on, and raises its top-1 agreement with fp32."""
    from edgedistill.deploy.runtime import output_divergence

    model = _small_cnn(tmp_path / "small.onnx")
    pre = tmp_path / "pre.onnx"
    q.prepare(tmp_path / "small.onnx", pre)
    bright = 128 * np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    ptq = q.quantize(pre, tmp_path / "damaged.onnx", "qdq-u8s8", calibration(pre, tmp_path, bright),
                     q.make_plan("ort-cpu", pre))
    graph = qad.FakeQuantGraph(onnx.load(str(ptq)), qad.float_initializers(pre), learn_scales=True)
    held_out = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        reference = model(held_out).numpy()
    before = run(session(ptq), held_out.numpy())
    settings = qad.QADSettings(steps=60, batch_size=32)
    record = qad.train(graph, model, _Images(batch_size=32, steps_per_epoch=20), "classifier", settings, tmp_path,
                       qad.checkpoint_key(ptq, settings), progress=False)
    after = qad.outputs(graph, held_out.numpy())
    kl_before, kl_after = output_divergence(reference, before, "classifier"), output_divergence(reference, after, "classifier")
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert (after.argmax(1) == reference.argmax(1)).mean() > (before.argmax(1) == reference.argmax(1)).mean()
    # What QAD is for is judged above, on images it did not train on; the logged loss is one
    # training batch per step, and its curve's shape depends on the CPU's weight bits (7 without VNNI).
    assert record["loss_curve"] and all(math.isfinite(loss) for _, loss in record["loss_curve"])


def test_qad_steps_runs_qad_before_the_float_fallback(evaluated_run, tmp_path):
    """--max-drop 0 is missed by PTQ on the tiny run: with --qad-steps N, QAD runs first, then the
    float fallback only if still needed; the manifest says which delivered."""
    from edgedistill.deploy import export_run
    from edgedistill.deploy.exporter import ExportCheckFailed

    try:
        out = export_run(evaluated_run, int8=True, int8_format="qdq-u8s8", calibrator="minmax", max_drop=0.0,
                         placement="tuned", int8_classifier=True, max_float_share=0.1, qad_steps=4, qad_batch=16,
                         out=tmp_path / "ex",
                         cache_dir=tmp_path / "c", val_count=96, calib_count=32)
    except ExportCheckFailed as e:  # the budget may stay out of reach; the record is what is tested
        out = e.export_dir
    m = json.loads((out / "manifest.json").read_text())
    int8 = m["int8"]
    assert int8["ptq"]["drop"] > 0 and int8["qad"]["steps"] == 4
    held = int8["qad"]["held_out_divergence"]
    assert int8["qad"]["kept"] == (held["qad"] < held["ptq"])  # a QAD that hurts is not shipped
    delivered = "qad" if int8["qad"]["kept"] else "ptq"
    assert int8["delivered_by"] == ("fallback" if int8["max_drop"]["kept_in_float"] else delivered)
    assert int8["qad"]["parity"]["passed"], int8["qad"]["parity"]
