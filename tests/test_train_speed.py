"""`edgedistill bench-train` on tiny settings: the command runs and its JSON has every field."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from edgedistill.cli import app


def test_bench_train_tiny(tmp_path):
    threads = torch.get_num_threads()
    try:
        _bench_train_tiny(tmp_path)
    finally:
        torch.set_num_threads(threads)  # the command sets 1 thread (steady on a busy 2-core machine)


def _bench_train_tiny(tmp_path):
    out = tmp_path / "speed.json"
    args = ["bench-train", "--teacher-arch", "resnet20_cifar", "--student-arch", "mobilenetv3_small_100",
            "--img-size", "16", "--batch-size", "8", "--warmup", "1", "--steps", "2", "--workers", "0", "--threads", "1",
            "--modes", "synthetic,torchvision,dali-gpu", "--device", "cpu", "--channels-last", "true",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["teacher"] == "resnet20_cifar" and data["student"] == "mobilenetv3_small_100"
    assert data["teacher_weights"] == "random teacher weights: throughput only"
    assert (data["batch_size"], data["img_size"], data["device"], data["precision"]) == (8, 16, "cpu", "fp32")
    assert data["channels_last"] is True and data["config"]["train"]["channels_last"] == "true"
    for mode in ("synthetic", "torchvision"):
        r = data["modes"][mode]
        assert r["status"] == "ok" and r["images_per_s"] > 0 and r["step_ms_median"] > 0
        assert r["peak_gpu_mem_gib"] is None
    if not torch.cuda.is_available():
        assert data["modes"]["dali-gpu"]["status"] == "skipped" and data["modes"]["dali-gpu"]["reason"]
    share = data["teacher_share"]
    assert share["status"] == "ok" and 0 < share["share_of_step"] < 1.5
    assert set(data["ratios"]) == {"dali_gpu_over_synthetic", "dali_gpu_over_torchvision",
                                   "dali_cpu_over_synthetic", "dali_cpu_over_torchvision"}
    assert data["environment"]["versions"]["torch"] and data["config"]["method"]["name"] == "disco"
    assert data["config"]["teacher"]["checkpoint"] is None
    # Teacher precisions side by side, and MoCo v2 on the same student and batch (issue 20).
    from edgedistill.methods.components import fast_teacher_modes

    assert list(data["teacher_modes"]) == ["fp32", *fast_teacher_modes(torch.device("cpu"), on_request=True)]
    assert data["mocov2"]["images_per_s"] > 0
    for row in data["teacher_modes"].values():
        assert row["images_per_s"] > 0 and 0 < row["teacher_share_of_step"] < 1.5
        assert row["disco_over_mocov2_images_per_s"] > 0
    assert data["teacher_modes"]["fp32"]["speedup_over_fp32_teacher"] == 1.0


def test_bench_train_rejects_a_teacher_mode_this_cpu_lacks(tmp_path):
    result = CliRunner().invoke(app, ["bench-train", "--device", "cpu", "--teacher-modes", "fp32,fp16",
                                      "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "fp16 needs a CUDA device" in result.output


def test_bench_train_rejects_unknown_mode(tmp_path):
    result = CliRunner().invoke(app, ["bench-train", "--modes", "synthetic,warp", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "warp" in result.output
