"""Shared fixtures: tiny real runs on the embedded digits dataset (CPU, seconds).

Every test that needs a trained run or an evaluated run uses these session-scoped fixtures, so
the (small) training cost is paid once per test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
SHARED_TEACHERS = SHARED / "teachers" / "resnet-cifar10"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the embedded dataset and verification cache inside the test session."""
    if "EDGEDISTILL_CACHE" not in os.environ:
        os.environ["EDGEDISTILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def bench_script(name: str):
    """bench/<name>.py as a module (the bench scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# DisCo/SEED tests that are not about teacher.precision run the exact fp32 target, without `auto`'s
# fidelity and timing pass at every start (tests/test_teacher_precision.py tests that).
EXACT_TEACHER = {"teacher.precision": "fp32"}


def tiny_overrides(**extra) -> list[str]:
    """A few optimizer steps of a small student on 32x32 digits with the torchvision loader."""
    base = {
        "student.arch": "mobilenetv3_small_100",
        "student.stem_stride": 1,
        "data.loader": "torchvision",
        "data.workers": 0,
        "train.batch_size": 32,
        "train.max_steps": 4,
        "train.log_every": 2,
        "train.checkpoint_every": 2,
        "method.queue_size": 256,
        "eval.linear_epochs": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def interrupt_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make `train` stop as Ctrl-C would (KeyboardInterrupt) right after its checkpoint at `at_step`."""
    import edgedistill.train as train_module

    save = train_module._save_checkpoint

    def save_then_interrupt(path, method, optimizers, scaler, step, *args):
        save(path, method, optimizers, scaler, step, *args)
        if step == at_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_interrupt)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished mocov2 run folder (no eval yet)."""
    from edgedistill.recipe import load_config
    from edgedistill.train import train

    out = tmp_path_factory.mktemp("runs") / "mocov2"
    cfg = load_config(None, tiny_overrides(**{"method.name": "mocov2"}))
    train(cfg, out)
    return out


@pytest.fixture(scope="session")
def evaluated_run(trained_run) -> Path:
    """`trained_run` after `edgedistill eval`: has eval.json and classifier.safetensors."""
    from edgedistill.evaluate import evaluate_run

    evaluate_run(trained_run)
    return trained_run


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """../shared/data/cifar10-jpg.tgz extracted once per session (skips when absent)."""
    import tarfile

    tgz = SHARED_DATA / "cifar10-jpg.tgz"
    if not tgz.is_file():
        pytest.skip(f"{tgz} is absent (real-data tests need ../shared/data beside the checkout)")
    dest = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(tgz) as tar:
        tar.extractall(dest, filter="data")
    return dest / "cifar10-jpg"


def interrupt_after_log(monkeypatch, at_step: int, partial_line: bool = True) -> None:
    """Make `train` stop as a kill would right after logging `at_step` (between checkpoints), with
    half a metrics.jsonl record written after it when `partial_line`."""
    import edgedistill.train as train_module

    record = train_module._MetricsLog.record

    def record_then_interrupt(self, step, *args, **kwargs):
        out = record(self, step, *args, **kwargs)
        if step == at_step:
            if partial_line and self.file is not None:
                self.file.write('{"step": %d, "loss": 1.2' % (step + 1))
                self.file.flush()
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(train_module._MetricsLog, "record", record_then_interrupt)
