import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import interrupt_after_checkpoint, interrupt_after_log, tiny_overrides
from edgedistill.cli import app
from edgedistill.recipe import load_config
from edgedistill.data.folder import embedded_digits
from edgedistill.errors import TrainingDiverged, UserError
from edgedistill.train import CHECKPOINT_FILE, train

runner = CliRunner()


def test_run_folder_contract(trained_run):
    for name in ("config.yaml", "metrics.jsonl", CHECKPOINT_FILE, "student.safetensors", "head.safetensors", "run.json"):
        assert (trained_run / name).is_file(), name
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["images_per_s"] > 0 and r["loss"] > 0 for r in records)
    summary = json.loads((trained_run / "run.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 4 and summary["loader"] == "torchvision"
    assert summary["environment"]["versions"]["torch"]
    # The resolved config is a valid recipe that reproduces the run.
    assert load_config(trained_run / "config.yaml").train.max_steps == 4


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):

    overrides = tiny_overrides(**{"method.name": "mocov2", "train.max_steps": 6, "train.checkpoint_every": 3})
    full = tmp_path / "full"
    train(load_config(None, overrides), full)

    # Interrupt (as Ctrl-C would) right after the step-3 checkpoint, then resume.

    part = tmp_path / "part"
    interrupt_after_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), part)
    monkeypatch.undo()
    assert torch.load(part / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    assert not (part / "student.safetensors").exists()
    train(load_config(None, overrides), part, resume=True)

    a, b = load_file(str(full / "student.safetensors")), load_file(str(part / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path, trained_run):
    with pytest.raises(UserError, match="--resume"):
        train(load_config(None, tiny_overrides(**{"method.name": "mocov2"})), trained_run)
    with pytest.raises(UserError, match="nothing to resume"):
        train(load_config(None, tiny_overrides(**{"method.name": "mocov2"})), tmp_path / "new", resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # lr 1e30 makes the weights explode after the first steps.
    overrides = tiny_overrides(**{"method.name": "mocov2", "train.max_steps": 40, "train.checkpoint_every": 1,
                                  "train.lr": 1e30, "train.weight_decay": 0})
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="non-finite") as e:
        train(load_config(None, overrides), out)
    assert "last good checkpoint" in str(e.value)
    ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())


def test_cli_nan_exit_code(tmp_path):
    args = ["train", "--out", str(tmp_path / "nan")]
    for o in tiny_overrides(**{"method.name": "mocov2", "train.max_steps": 40, "train.lr": 1e30}):
        args += ["--set", o]
    result = runner.invoke(app, args)
    assert result.exit_code == 3


def _digits_copy(tmp_path, n_per_class=None):
    train_dir, _ = embedded_digits(32)
    dst = tmp_path / "data"
    shutil.copytree(train_dir, dst)
    if n_per_class is not None:
        for cls in dst.iterdir():
            for f in sorted(cls.iterdir())[n_per_class:]:
                f.unlink()
    return dst


def _train_on(folder, tmp_path, **extra):
    return train(load_config(None, tiny_overrides(**{"method.name": "mocov2", "data.train": str(folder), **extra})),
                 tmp_path / "run")


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        _train_on(tmp_path / "nowhere", tmp_path)


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        _train_on(tmp_path / "empty", tmp_path)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        _train_on(tmp_path / "flat", tmp_path)


def test_fewer_images_than_one_batch(tmp_path):
    folder = _digits_copy(tmp_path, n_per_class=2)
    with pytest.raises(UserError, match="fewer than one global batch"):
        _train_on(folder, tmp_path)


def _truncate_one(folder):
    victim = sorted((folder / "3").iterdir())[0]
    jpg = victim.with_suffix(".jpg")
    Image.open(victim).convert("RGB").save(jpg, quality=90)
    victim.unlink()
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    return jpg


def test_truncated_image_is_skipped_and_counted(tmp_path):
    folder = _digits_copy(tmp_path)
    bad = _truncate_one(folder)
    result = _train_on(folder, tmp_path)
    summary = json.loads((result.run_dir / "run.json").read_text())
    assert summary["skipped_images"] == [str(bad)]


def test_truncated_image_is_an_error_when_strict(tmp_path):
    folder = _digits_copy(tmp_path)
    bad = _truncate_one(folder)
    with pytest.raises(UserError, match="unreadable image") as e:
        _train_on(folder, tmp_path, **{"data.strict": "true"})
    assert str(bad) in str(e.value)


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["train", "--set", "method.name=mocov2", "--set", "student.arch=mobilenet_v9",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "unknown architecture" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_disco_without_teacher_is_a_recipe_error():
    with pytest.raises(UserError, match="needs a teacher"):
        load_config(None, ["method.name=disco"])


def test_channels_last_is_a_memory_format_only(tmp_path):
    """train.channels_last puts the weights in NHWC (2-2.5x faster steps on CPU, docs/results.md) and
    computes the same step: after it the students agree with NCHW's to float rounding (~1e-5; the
    difference then grows step by step as any rounding difference does)."""
    from edgedistill.methods import create_method
    from edgedistill.train import setup_training

    cfg = load_config(None, tiny_overrides(**{"method.name": "mocov2", "train.channels_last": "true"}))
    method = create_method(cfg, num_classes=10)
    setup_training(cfg, method, torch.device("cpu"), 1, 4)
    convs = [p for p in method.parameters() if p.dim() == 4 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)

    runs = {}
    for flag in ("false", "true"):
        overrides = {"method.name": "mocov2", "train.channels_last": flag, "train.max_steps": 1}
        train(load_config(None, tiny_overrides(**overrides)), tmp_path / flag)
        runs[flag] = load_file(str(tmp_path / flag / "student.safetensors"))
        assert f"channels_last={flag.capitalize()}" in (tmp_path / flag / "train.log").read_text()
    for key, nchw in runs["false"].items():
        torch.testing.assert_close(runs["true"][key], nchw, rtol=1e-3, atol=1e-4, msg=key)


def test_cpu_small_map_grad_is_a_kernel_choice_only(tmp_path):
    """train.cpu_small_map_grad (the default on CPU) turns the student's convolutions into
    SmallMapConv2d, whose weight gradients on maps smaller than the kernel are computed tap by tap:
    one step of training with it and without it gives the same student to float rounding."""
    from edgedistill.methods import create_method
    from edgedistill.models.small_map_conv import SmallMapConv2d
    from edgedistill.train import setup_training

    for flag, expected in (("true", True), ("false", False)):
        cfg = load_config(None, tiny_overrides(**{"method.name": "mocov2", "train.cpu_small_map_grad": flag}))
        method = create_method(cfg, num_classes=10)
        setup_training(cfg, method, torch.device("cpu"), 1, 4)
        kinds = {type(m) is SmallMapConv2d for m in method.encoder_q.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.kernel_size[0] > 1}
        assert kinds == {expected}
    runs = {}
    for flag in ("false", "true"):
        overrides = {"method.name": "mocov2", "train.cpu_small_map_grad": flag, "train.max_steps": 1}
        train(load_config(None, tiny_overrides(**overrides)), tmp_path / flag)
        runs[flag] = load_file(str(tmp_path / flag / "student.safetensors"))
    for key, reference in runs["false"].items():
        torch.testing.assert_close(runs["true"][key], reference, rtol=1e-3, atol=1e-5, msg=key)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_kill_between_checkpoints(tmp_path, monkeypatch):
    """Killed at step 5 (checkpoint at 3, a half-written metrics line): --resume refuses a changed
    recipe naming the key and leaves config.yaml alone; with the recipe it continues from step 3
    to the uninterrupted run's weights, and metrics.jsonl holds each step once."""
    overrides = tiny_overrides(**{"method.name": "mocov2", "train.max_steps": 6, "train.checkpoint_every": 3,
                                  "train.log_every": 1})
    full = tmp_path / "full"
    train(load_config(None, overrides), full)
    part = tmp_path / "part"
    interrupt_after_log(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), part)
    monkeypatch.undo()
    assert torch.load(part / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    assert (part / "metrics.jsonl").read_text().count("\n") == 5  # steps 1-5 and half of 6

    config = (part / "config.yaml").read_text()
    changed = overrides + ["train.lr=0.5", "method.temperature=0.1"]
    with pytest.raises(UserError, match=r"another recipe \(method.temperature: 0.2 -> 0.1; train.lr") as e:
        train(load_config(None, changed), part, resume=True)
    assert "train.max_steps" in str(e.value) and "config.yaml" in str(e.value)  # what may change, the fix
    assert (part / "config.yaml").read_text() == config

    train(load_config(None, overrides + ["train.log_every=1", "data.workers=0"]), part, resume=True)
    assert [r["step"] for r in _metrics(part)] == [1, 2, 3, 4, 5, 6]
    a, b = load_file(str(full / "student.safetensors")), load_file(str(part / "student.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["loss"] for r in _metrics(part)] == pytest.approx([r["loss"] for r in _metrics(full)], abs=1e-5)


def test_resume_with_a_longer_budget_replans_the_schedule(tmp_path):
    """train.max_steps may change on resume: the lr schedule is planned again for the new length
    from the checkpoint's step (the lr of a run planned for 8 steps from the start), and run.json
    records the change."""
    base = {"method.name": "mocov2", "train.log_every": 1, "train.warmup_steps": 1}
    fresh = tmp_path / "fresh"
    train(load_config(None, tiny_overrides(**base, **{"train.max_steps": 8})), fresh)
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(**base)), run)  # 4 steps, complete
    train(load_config(None, tiny_overrides(**base, **{"train.max_steps": 8})), run, resume=True)
    lrs = {r["step"]: r["lr"] for r in _metrics(run)}
    assert sorted(lrs) == list(range(1, 9))
    want = {r["step"]: r["lr"] for r in _metrics(fresh)}
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(want[step], rel=1e-9), step
    summary = json.loads((run / "run.json").read_text())
    assert summary["steps"] == 8 and summary["resumes"] == [{"step": 4, "changed": {"train.max_steps": [4, 8]}}]
    assert load_config(run / "config.yaml").train.max_steps == 8


@pytest.mark.parametrize("extra", [{"train.precision": "bf16"}, {"train.precision": "fp16"}])
def test_reduced_precision_trains_on_cpu(tmp_path, extra):
    """bf16 autocast and fp16 (autocast + grad scaler) run the same loop on the CPU: finite losses,
    the precision in the log, a checkpoint that resumes (fp16 carries the scaler state)."""
    overrides = tiny_overrides(**{"method.name": "mocov2", "train.max_steps": 2, **extra})
    result = train(load_config(None, overrides), tmp_path / "run")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[extra["train.precision"]]
    assert f"precision=torch.{dtype}" in (tmp_path / "run" / "train.log").read_text()
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert (ckpt["scaler"] is not None) == (extra["train.precision"] == "fp16")
    assert ckpt["cuda_rng"] is None  # no GPU in this run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_restores_the_cuda_rng_state(tmp_path):
    from edgedistill.methods import create_method
    from edgedistill.train import _load_checkpoint, _save_checkpoint, setup_training

    cfg = load_config(None, tiny_overrides(**{"method.name": "mocov2"}))
    device = torch.device("cuda")
    method = create_method(cfg, num_classes=10).to(device)
    state = setup_training(cfg, method, device, 1, 4)
    torch.cuda.manual_seed(123)
    _save_checkpoint(tmp_path / "c.pt", method, state.optimizers, state.scaler, 1, 0, 1, cfg, state.schedulers)
    expected = torch.rand(4, device=device)
    torch.rand(100, device=device)  # move the generator on
    _load_checkpoint(tmp_path / "c.pt", method, state)
    assert torch.equal(torch.rand(4, device=device), expected)
