"""Issue 20: the frozen teacher's precision (teacher.precision), its fidelity check and `auto`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_script, tiny_overrides
from edgedistill.errors import UserError
from edgedistill.methods import components
from edgedistill.methods.components import TEACHER_FIDELITY_FILE, FrozenTeacher
from edgedistill.recipe import load_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A random CIFAR ResNet-20 (plain state dict, no head); BN statistics set so it is not an identity."""
    from edgedistill.config import ModelConfig
    from edgedistill.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(ModelConfig(arch="resnet20_cifar"))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.0)
            m.bias.data.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Let this CPU count as bf16-capable (autocast runs either way) with bf16 its only fast mode, and
    take it whatever its speed (bf16 is emulated, slower than fp32, on a CPU without AVX512_BF16), so
    these tests of the fidelity rule do not depend on the ISA; a smaller fidelity sample keeps them fast."""
    monkeypatch.setattr(components, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(components, "fast_teacher_modes", lambda device, on_request=False: ["bf16"])
    monkeypatch.setattr(components, "AUTO_MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(components, "FIDELITY_IMAGES", 128)


def cfg_for(ckpt, precision: str | None = None, **extra):
    items = {"method.name": "disco", "teacher.arch": "resnet20_cifar", "teacher.checkpoint": str(ckpt),
             "train.batch_size": 64, "method.queue_size": 128, "data.max_images": 400, **extra}
    if precision is not None:
        items["teacher.precision"] = precision
    return load_config(None, tiny_overrides(**items))


def prepared(cfg, run_dir, channels_last: bool = False, steps: int | None = None):
    from edgedistill.data import train_folder
    from edgedistill.methods import create_method

    method = create_method(cfg, num_classes=10)
    method.prepare(run_dir, train_folder(cfg.data, cfg.seed), CPU, channels_last=channels_last, steps=steps)
    method.train()
    return method


def test_auto_is_the_default_and_fp32_is_the_old_teacher_bit_for_bit(teacher_ckpt, tmp_path, bf16_cpu):
    assert cfg_for(teacher_ckpt).teacher.precision == "auto"
    m = prepared(cfg_for(teacher_ckpt, "fp32"), tmp_path)
    teacher = m.teacher
    assert teacher.mode == "fp32" and teacher.fast is None
    assert json.loads((tmp_path / TEACHER_FIDELITY_FILE).read_text())["chosen"] == "fp32"
    x = torch.randn(16, 3, 32, 32)
    old = F.normalize(teacher.encoder(x).float() - teacher.center, dim=1)  # the teacher before issue 20
    assert torch.equal(teacher(x), old)
    assert not any(k.startswith("teacher.fast") for k in m.state_dict())


def test_auto_takes_bf16_when_its_cosine_passes_and_a_resume_reuses_it(teacher_ckpt, tmp_path, bf16_cpu, caplog):
    cfg = cfg_for(teacher_ckpt)
    m = prepared(cfg, tmp_path)
    record = json.loads((tmp_path / TEACHER_FIDELITY_FILE).read_text())
    assert record["chosen"] == "bf16" == m.teacher.mode
    bf16 = record["modes"]["bf16"]
    assert bf16["passed"] and bf16["mean_cosine"] >= 0.999 and bf16["q001_cosine"] >= 0.99
    assert abs(bf16["knn_top1"] - record["fp32"]["knn_top1"]) <= 5
    # The fast copy: BatchNorm folded away, channels_last, eval mode; a direct cosine check.
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.teacher.fast.modules())
    assert not m.teacher.fast.training
    x = torch.randn(64, 3, 32, 32)
    cos = F.cosine_similarity(m.teacher(x), m.teacher._target(x, "fp32"), dim=1)
    assert float(cos.mean()) >= 0.999
    with caplog.at_level(logging.INFO):
        again = prepared(cfg, tmp_path)
    assert again.teacher.mode == "bf16" and "reused" in caplog.text


def test_auto_refuses_a_mode_below_the_threshold(teacher_ckpt, tmp_path, bf16_cpu, monkeypatch, caplog):
    monkeypatch.setattr(components, "FIDELITY_MIN_COSINE", 1.000001)  # no cosine reaches it
    with caplog.at_level(logging.WARNING):
        m = prepared(cfg_for(teacher_ckpt), tmp_path / "auto")
    assert m.teacher.mode == "fp32" and m.teacher.fast is None
    assert "bf16 refused" in caplog.text
    record = json.loads((tmp_path / "auto" / TEACHER_FIDELITY_FILE).read_text())
    assert record["chosen"] == "fp32" and record["modes"]["bf16"]["passed"] is False
    # Asked for explicitly, the mode is kept, with a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m = prepared(cfg_for(teacher_ckpt, "bf16"), tmp_path / "bf16")
    assert m.teacher.mode == "bf16" and "auto would refuse it" in caplog.text


def test_auto_without_a_fast_mode_is_fp32(teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(components, "fast_teacher_modes", lambda device, on_request=False: [])
    m = prepared(cfg_for(teacher_ckpt), tmp_path)
    assert m.teacher.mode == "fp32"
    assert "no fast teacher mode" in json.loads((tmp_path / TEACHER_FIDELITY_FILE).read_text())["note"]


def test_auto_takes_the_fastest_mode_that_passes_and_beats_fp32():
    from edgedistill.methods.components import choose_teacher_mode

    modes = {"bf16": {"passed": True, "ms_per_image": 1.0}, "fp32-ort": {"passed": True, "ms_per_image": 1.4},
             "fp16": {"passed": False, "ms_per_image": 0.5}}
    assert choose_teacher_mode("auto", 2.0, modes) == "bf16"  # fp16 is faster but failed its fidelity check
    assert choose_teacher_mode("auto", 1.2, modes) == "bf16"
    assert choose_teacher_mode("auto", 0.9, modes) == "fp32"  # every passing mode is slower than fp32 here
    assert choose_teacher_mode("fp32-ort", 0.9, modes) == "fp32-ort"  # asked for: kept


def test_fp32_on_onnxruntime_is_fp32_and_auto_takes_it_only_when_faster(teacher_ckpt, tmp_path, monkeypatch, caplog):
    """fp32-ort: the teacher exported to ONNX and run by ONNX Runtime on the CPU, the same target to
    fp32 rounding; auto (no bf16 here) times it against torch's fp32 on the fidelity views and takes
    it only if it was faster; a resumed run reuses the choice."""
    monkeypatch.setattr(components, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(components, "FIDELITY_IMAGES", 128)
    m = prepared(cfg_for(teacher_ckpt, "fp32-ort"), tmp_path / "ort")
    assert m.teacher.mode == "fp32-ort" and m.teacher.fast is None
    x = torch.randn(48, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    cos = F.cosine_similarity(m.teacher(x), m.teacher._target(x, "fp32"), dim=1)
    assert float(cos.min()) > 0.99999
    assert not any("sessions" in k or "ort" in k.lower() for k in m.state_dict())

    m = prepared(cfg_for(teacher_ckpt), tmp_path / "auto")
    record = json.loads((tmp_path / "auto" / TEACHER_FIDELITY_FILE).read_text())
    assert record["candidates"] == ["fp32-ort"]
    ort = record["modes"]["fp32-ort"]
    assert ort["passed"] and ort["mean_cosine"] > 0.99999
    faster = ort["ms_per_image"] < record["fp32"]["ms_per_image"]
    assert record["chosen"] == m.teacher.mode == ("fp32-ort" if faster else "fp32")
    with caplog.at_level(logging.INFO):
        again = prepared(cfg_for(teacher_ckpt), tmp_path / "auto")
    assert again.teacher.mode == record["chosen"] and "reused" in caplog.text


def test_bf16_on_openvino_runs_the_exported_teacher_and_is_offered_only_where_bf16_is_native(teacher_ckpt, tmp_path,
                                                                                             monkeypatch):
    """bf16-openvino: the teacher's ONNX file compiled by OpenVINO with bf16 inference; the target stays
    within the fidelity threshold of fp32's. (On a CPU without AVX512_BF16 OpenVINO computes it in fp32:
    the plumbing is what this checks there.) auto offers it only with native bf16 and the package."""
    pytest.importorskip("openvino")
    from edgedistill.methods.components import OV_MODE, ExportedTeacher

    teacher = FrozenTeacher(cfg_for(teacher_ckpt).teacher)
    teacher.set_mode(OV_MODE)
    assert isinstance(teacher._runner, ExportedTeacher) and teacher._runner.runtime == "openvino" and teacher.fast is None
    x = torch.randn(48, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    cos = F.cosine_similarity(teacher._target(x, OV_MODE), teacher._target(x, "fp32"), dim=1)
    assert float(cos.mean()) >= components.FIDELITY_MIN_COSINE
    assert list(teacher._runner.runners) == [32]  # one compiled model per input size
    monkeypatch.setattr(components, "cpu_has_bf16", lambda: True)
    assert components.fast_teacher_modes(CPU) == ["bf16", "fp32-ort", OV_MODE]
    monkeypatch.setattr(components, "openvino_installed", lambda: False)
    assert components.fast_teacher_modes(CPU) == ["bf16", "fp32-ort"]
    with pytest.raises(UserError, match="bf16-openvino runs the teacher in bf16 with OpenVINO.*pip install openvino"):
        components.check_teacher_precision(OV_MODE, CPU)
    monkeypatch.setattr(components, "cpu_has_bf16", lambda: False)
    assert components.fast_teacher_modes(CPU) == ["fp32-ort"]
    with pytest.raises(UserError, match="neither AVX512_BF16 nor AMX.*use teacher.precision=auto or fp32"):
        prepared(cfg_for(teacher_ckpt, OV_MODE), tmp_path)


def test_int8_on_openvino_quantizes_every_conv_after_the_first_stage_on_its_own_calibration_views(teacher_ckpt,
                                                                                                  tmp_path):
    """int8-openvino, asked for: the teacher's ONNX file quantized by the export's path (QDQ, every
    convolution INT8 after the first stage), calibrated on augmented training views that are not the
    fidelity check's, run by OpenVINO; its fidelity is measured and recorded like any mode's; a
    resumed run rebuilds the same quantized teacher."""
    pytest.importorskip("openvino")
    import json

    from edgedistill.methods.components import INT8_OV_MODE, ExportedTeacher

    calls = []
    data = FrozenTeacher._calibration_data

    def spy(self, *args):
        views = data(self, *args)
        calls.append(views)
        return views

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FrozenTeacher, "_calibration_data", spy)
        mp.setattr(components, "FIDELITY_IMAGES", 64)
        mp.setattr(components, "INT8_CALIBRATION_IMAGES", 64)
        m = prepared(cfg_for(teacher_ckpt, INT8_OV_MODE), tmp_path)
        teacher = m.teacher
        assert teacher.mode == INT8_OV_MODE and isinstance(teacher._runner, ExportedTeacher)
        record = json.loads((tmp_path / "teacher_fidelity.json").read_text())
        int8 = record["modes"][INT8_OV_MODE]["int8"]
        # every convolution after the stem and the first stage (ResNet-20: 1 + 3 blocks x 2 of 19)
        assert int8["weighted_layers"] == 19 and int8["int8"] == 19 - 7 and int8["calibration_views"] == 128
        assert record["chosen"] == INT8_OV_MODE and record["modes"][INT8_OV_MODE]["mean_cosine"] > 0.98
        assert len(calls) == 1 and calls[0].shape == (128, 3, 32, 32)
        # the calibration images are the end of the fidelity check's order, the check's the front
        order = FrozenTeacher._subset_order(train_folder_of(m), m.cfg.seed)
        assert not set(order[:64]) & set(order[-64:])
        x = torch.randn(16, 3, 32, 32)
        first = teacher(x)
        again = prepared(cfg_for(teacher_ckpt, INT8_OV_MODE), tmp_path)  # resumed: the record reused
        assert again.teacher.mode == INT8_OV_MODE and len(calls) == 1  # calibrated only when first run
        assert torch.equal(again.teacher(x), first) and len(calls) == 2


def test_auto_tries_int8_only_on_a_run_that_repays_its_calibration(teacher_ckpt, tmp_path, monkeypatch):
    """int8-openvino calibrates at the start of the run: auto measures it for a run of at least
    INT8_AUTO_MIN_TRAIN_IMAGES training images (the trainer's planned steps x the batch), never for
    a short one (the demo's) or an unknown one, and says why in the record."""
    from edgedistill.config import INT8_AUTO_MIN_TRAIN_IMAGES
    from edgedistill.methods.components import INT8_OV_MODE

    monkeypatch.setattr(components, "openvino_installed", lambda: True)
    assert INT8_OV_MODE not in components.auto_teacher_modes(CPU, None)
    assert INT8_OV_MODE not in components.auto_teacher_modes(CPU, 200 * 64)  # the demo's DisCo run
    assert INT8_OV_MODE in components.auto_teacher_modes(CPU, INT8_AUTO_MIN_TRAIN_IMAGES)
    asked = []

    def no_fast_mode(device, train_images):  # what the trainer's plan reaches auto with; nothing measured
        asked.append(train_images)
        return []

    monkeypatch.setattr(components, "auto_teacher_modes", no_fast_mode)
    prepared(cfg_for(teacher_ckpt, "auto"), tmp_path / "long", steps=2000)
    prepared(cfg_for(teacher_ckpt, "auto"), tmp_path / "short", steps=20)
    assert asked == [2000 * 64, 20 * 64]
    monkeypatch.undo()
    monkeypatch.setattr(components, "openvino_installed", lambda: True)
    monkeypatch.setattr(components, "fast_teacher_modes",
                        lambda device, on_request=False: ["fp32-ort"] + ([INT8_OV_MODE] if on_request else []))
    monkeypatch.setattr(components, "FIDELITY_IMAGES", 64)
    prepared(cfg_for(teacher_ckpt, "auto"), tmp_path / "short2", steps=20)
    record = json.loads((tmp_path / "short2" / TEACHER_FIDELITY_FILE).read_text())
    assert record["candidates"] == ["fp32-ort"] and record["train_images"] == 20 * 64
    assert "int8-openvino not tried: the run's 1280 training images are fewer than the 100,000" in record["note"]


def train_folder_of(method):
    from edgedistill.data import train_folder

    return train_folder(method.cfg.data, method.cfg.seed)


def test_auto_times_fp32_in_the_memory_format_of_the_step(teacher_ckpt, tmp_path, monkeypatch):
    """The trainer runs the teacher in channels_last on the CPU (train.channels_last auto), where
    fp32 can be twice as fast as in NCHW: auto's timing of fp32 must see the step's layout, or it
    takes a mode slower than the step's own fp32. A recorded choice is reused for the same layout only."""
    from edgedistill.data import train_folder
    from edgedistill.methods import create_method

    monkeypatch.setattr(components, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(components, "FIDELITY_IMAGES", 64)
    cfg = cfg_for(teacher_ckpt)
    teacher = create_method(cfg, num_classes=10).teacher
    target, layouts = teacher._target, []

    def spy(x, mode):
        if mode == "fp32":
            layouts.append("channels_last" if x.stride(1) == 1 else "nchw")
        return target(x, mode)

    monkeypatch.setattr(teacher, "_target", spy)
    folder = train_folder(cfg.data, cfg.seed)
    teacher.prepare(tmp_path, folder, cfg.data, cfg.seed, CPU, channels_last=True)
    assert layouts and set(layouts) == {"channels_last"}
    assert json.loads((tmp_path / TEACHER_FIDELITY_FILE).read_text())["memory_format"] == "channels_last"
    layouts.clear()
    teacher.prepare(tmp_path, folder, cfg.data, cfg.seed, CPU, channels_last=True)
    assert not layouts  # reused
    teacher.prepare(tmp_path, folder, cfg.data, cfg.seed, CPU, channels_last=False)
    assert layouts and set(layouts) == {"nchw"}  # measured again, for the other layout


def test_train_mode_bn_is_left_unfolded(teacher_ckpt, bf16_cpu):
    from edgedistill.methods import create_method

    m = create_method(cfg_for(teacher_ckpt, "bf16", **{"method.teacher_bn": "train"}), num_classes=10)
    m.teacher.set_mode("bf16")
    m.train()
    assert m.teacher.fast is None and m.teacher.encoder.training  # batch statistics, as the reference
    assert m.teacher(torch.randn(8, 3, 32, 32)).shape == (8, 64)


def test_precision_errors_name_the_key_and_the_fix(teacher_ckpt, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: disco\nteacher:\n  arch: resnet20_cifar\n  checkpoint: {teacher_ckpt}\n  precision: fp8\n")
    with pytest.raises(UserError, match=r"r\.yaml: teacher\.precision: 'fp8' is not one of auto, fp32, bf16, fp16, fp32-ort, bf16-openvino"):
        load_config(recipe)
    with pytest.raises(UserError, match="int8 is spelt int8-openvino .*auto tries it on runs of at least 100,000"):
        cfg_for(teacher_ckpt, "int8")
    with pytest.raises(UserError, match="int8-openvino runs the teacher's convolutions in INT8 with OpenVINO on the CPU "
                                        r"\(this run is on cuda\)"):
        components.check_teacher_precision("int8-openvino", torch.device("cuda"))
    with pytest.raises(UserError, match="unknown key 'student.precision'"):
        load_config(None, ["student.precision=bf16"])
    with pytest.raises(UserError, match="fp16 needs a CUDA device.*teacher.precision=auto"):
        prepared(cfg_for(teacher_ckpt, "fp16"), tmp_path)
    monkeypatch.setattr(components, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="bf16 on cpu needs AVX512_BF16 or AMX"):
        prepared(cfg_for(teacher_ckpt, "bf16"), tmp_path)
    with pytest.raises(UserError, match="not one of fp32"):
        FrozenTeacher(cfg_for(teacher_ckpt).teacher).set_mode("int4")
    with pytest.raises(UserError, match="fp32-ort runs the teacher with ONNX Runtime on the CPU.*use teacher.precision=auto"):
        components.check_teacher_precision("fp32-ort", torch.device("cuda"))
    with pytest.raises(UserError, match="fp32-ort needs method.teacher_bn=eval"):
        FrozenTeacher(cfg_for(teacher_ckpt).teacher, bn_mode="train").set_mode("fp32-ort")


def test_teacher_speed_script_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert bench_script("teacher_speed").main(["--quick", "--rounds", "1", "--steps", "1",
                                                    "--out", str(tmp_path / "t.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "t.json").read_text())
    row = data["rows"][0]
    assert row["teacher_macs_per_image"] > 0 and data["peak"]["assumption"]
    fp32 = row["modes"]["fp32"]
    assert fp32["mean_cosine"] == 1.0 and fp32["disco_speedup_over_fp32"] == 1.0
    assert fp32["disco_images_per_s"] > 0 and fp32["mocov2_images_per_s"] > 0 and fp32["teacher_gmac_per_s"] > 0
    ort = row["modes"]["fp32-ort"]  # every CPU has it; its share of peak is against the fp32 peak
    assert ort["peak_gmac_per_s"] == fp32["peak_gmac_per_s"] and ort["mean_cosine"] > 0.9999


def test_gpu_check_cpu_path(tmp_path):
    """bench/gpu_check.py on the CPU: train, stop at half way, resume, export + parity, teacher modes timed."""
    threads = torch.get_num_threads()
    try:
        rc = bench_script("gpu_check").main(["--device", "cpu", "--out", str(tmp_path / "g.json")])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "g.json").read_text())
    assert rc == 0 and data["ok"]
    assert data["train_resume"]["steps"] == data["settings"]["steps"] and data["train_resume"]["stopped_at"] == 3
    assert data["teacher_precision"]["requested"] == "auto"
    assert data["export"]["artifacts"]["onnx-fp32"]["parity_passed"]
    assert "fp32" in data["teacher_modes"] and data["mocov2"]["images_per_s"] > 0


def test_teacher_compile_wraps_only_the_fast_copy(teacher_ckpt, bf16_cpu):
    """teacher.compile: a torch.compile wrapper of the folded copy (built lazily: nothing compiles
    here), never of fp32, not in the state dict; switching modes reuses the built copies."""
    from edgedistill.methods import create_method

    m = create_method(cfg_for(teacher_ckpt, "bf16", **{"teacher.compile": "true"}), num_classes=10)
    teacher = m.teacher
    teacher.set_mode("bf16")
    fast, compiled = teacher.fast, teacher._runner
    assert compiled is not None and compiled._orig_mod is fast
    teacher.set_mode("fp32")
    assert teacher.fast is None and teacher._runner is None
    teacher.set_mode("bf16")
    assert teacher.fast is fast and teacher._runner is compiled
    assert not any("_compiled" in k or "_orig_mod" in k for k in m.state_dict())
    with pytest.raises(UserError, match="teacher.compile: expected bool"):
        cfg_for(teacher_ckpt, **{"teacher.compile": "sometimes"})
