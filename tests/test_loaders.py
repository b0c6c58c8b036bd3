"""The training loaders: DALI (CPU pipeline here) against the torchvision reference path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedistill.config import DataConfig
from edgedistill.recipe import load_config
from edgedistill.data import build_train_loader, choose_loader, train_folder
from edgedistill.errors import UserError

from conftest import interrupt_after_checkpoint, tiny_overrides

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

CPU = torch.device("cpu")


def _jpeg_folder(root: Path, per_class: int = 24, size=(56, 40), bad: bool = False) -> Path:
    """Two classes of smooth colour JPEGs of a non-square size; optionally one truncated file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in range(2):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.uniform(0, 255, 3)
            img = np.stack([(base[k] + 80 * np.sin((xx * (k + 1) + yy * (c + 1)) / 9 + i)) for k in range(3)], -1)
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
    if bad:
        good = (root / "class0" / "000.jpg").read_bytes()
        (root / "class0" / "zzz_truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def _cfg(train: str, img_size: int, loader: str) -> DataConfig:
    return DataConfig(train=train, img_size=img_size, loader=loader, workers=1)


def _batches(cfg: DataConfig, loader: str, n: int, epoch: int = 0, skip: int = 0, batch: int = 16, views: int = 2):
    cfg = DataConfig(**{**cfg.__dict__, "loader": loader})
    folder = train_folder(cfg, seed=0)
    tl = build_train_loader(cfg, folder, views, batch, seed=3, device=CPU)
    out = []
    if n == 0:
        return tl, out
    for i, b in enumerate(tl.epoch(epoch, skip=skip)):
        out.append(b)
        if i + 1 == n:
            break
    return tl, out


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory) -> Path:
    return _jpeg_folder(tmp_path_factory.mktemp("jpegs"), bad=True)


@pytest.mark.parametrize("dataset", ["digits", "jpeg"])
def test_dali_cpu_matches_torchvision_interface(dataset, jpeg_dir):
    cfg = _cfg("embedded:digits", 32, "auto") if dataset == "digits" else _cfg(str(jpeg_dir), 24, "auto")
    tv, tv_b = _batches(cfg, "torchvision", 3)
    dl, dl_b = _batches(cfg, "dali-cpu", 3)
    assert (tv.name, dl.name) == ("torchvision", "dali-cpu")
    assert tv.steps_per_epoch == dl.steps_per_epoch
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    stats = {}
    for name, batches in (("tv", tv_b), ("dali", dl_b)):
        assert len(batches) == 3
        for views, labels in batches:
            assert len(views) == 2
            for v in views:
                assert v.shape == (16, 3, cfg.img_size, cfg.img_size) and v.dtype == torch.float32
                assert v.device == CPU
                assert (v >= lo - 1e-4).all() and (v <= hi + 1e-4).all()
            assert labels.dtype == torch.int64 and labels.shape == (16,) and labels.device == CPU
        x = torch.cat([v for views, _ in batches for v in views])
        stats[name] = (x.mean((0, 2, 3)), x.std((0, 2, 3)))
    # Same order and sharding: identical labels batch by batch.
    for (_, a), (_, b) in zip(tv_b, dl_b):
        assert torch.equal(a, b)
    # Same recipe: per-channel statistics close (not bit-identical pixels, see dali_loader).
    assert torch.allclose(stats["tv"][0], stats["dali"][0], atol=0.25), stats
    assert torch.allclose(stats["tv"][1], stats["dali"][1], rtol=0.25), stats


def test_dali_cpu_deterministic_and_skip(jpeg_dir):
    cfg = _cfg(str(jpeg_dir), 24, "dali-cpu")
    tl, first = _batches(cfg, "dali-cpu", 0)
    run1 = list(tl.epoch(0))
    run2 = list(tl.epoch(0))
    assert len(run1) == tl.steps_per_epoch == 3
    for (va, la), (vb, lb) in zip(run1, run2):
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))
    # The two views of a batch differ, and another epoch is another draw.
    assert not torch.equal(run1[0][0][0], run1[0][0][1])
    assert not torch.equal(list(tl.epoch(1))[0][0][0], run1[0][0][0])
    # --resume: skipping k batches yields exactly the uninterrupted run's remaining batches.
    resumed = list(tl.epoch(0, skip=1))
    assert len(resumed) == 2
    for (va, la), (vb, lb) in zip(resumed, run1[1:]):
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))


def test_dali_sharding_covers_epoch_once(jpeg_dir):
    cfg = _cfg(str(jpeg_dir), 24, "dali-cpu")
    folder = train_folder(cfg, seed=0)
    seen = []
    for rank in range(2):
        tl = build_train_loader(cfg, folder, 2, 8, seed=3, device=CPU, rank=rank, world=2)
        files, _ = tl._files(0)
        assert len(files) == tl.steps_per_epoch * 8
        seen += files
    assert len(seen) == len(set(seen)) == (len(folder) // 16) * 16


def test_auto_picks_dali_cpu_and_gpu_needs_cuda():
    assert choose_loader("auto", CPU) == "dali-cpu"
    with pytest.raises(UserError, match="dali-gpu needs a CUDA device"):
        choose_loader("dali-gpu", CPU)
    from edgedistill.data.dali_loader import DaliTrainLoader

    cfg = _cfg("embedded:digits", 32, "dali-gpu")
    with pytest.raises(UserError, match="CUDA"):
        DaliTrainLoader(train_folder(cfg, 0), cfg, 2, 16, 0, CPU, gpu=True)


def test_truncated_jpeg_is_skipped_with_dali(jpeg_dir):
    cfg = _cfg(str(jpeg_dir), 24, "dali-cpu")
    folder = train_folder(cfg, seed=0)
    assert [Path(p).name for p in folder.skipped] == ["zzz_truncated.jpg"]
    assert all("truncated" not in p for p, _ in folder.samples)
    tl = build_train_loader(cfg, folder, 2, 16, seed=0, device=CPU)
    assert sum(1 for _ in tl.epoch(0)) == tl.steps_per_epoch  # DALI never sees the bad file
    with pytest.raises(UserError, match="zzz_truncated.jpg"):
        train_folder(DataConfig(**{**cfg.__dict__, "strict": True}), seed=0)


def test_train_with_dali_cpu(tmp_path):
    from edgedistill.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP stalls on a busy machine
    try:
        _train_with_dali_cpu(tmp_path, train)
    finally:
        torch.set_num_threads(threads)


def _train_with_dali_cpu(tmp_path, train):
    cfg = load_config(None, tiny_overrides(**{"method.name": "mocov2", "data.loader": "dali-cpu", "data.workers": 1,
                                              "data.img_size": 16, "train.batch_size": 16,
                                              "train.max_steps": 2}))
    result = train(cfg, tmp_path / "run")
    assert result.loader == "dali-cpu" and result.steps == 2
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["loader"] == "dali-cpu" and summary["status"] == "complete"


def test_resume_with_dali_cpu_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    """--resume with dali-cpu: the skipped batches are run and discarded, so the resumed run
    trains on exactly the batches (and augmentations) of the uninterrupted one."""
    from safetensors.torch import load_file

    import edgedistill.train as train_module

    overrides = tiny_overrides(**{"method.name": "mocov2", "data.loader": "dali-cpu", "data.workers": 1,
                                  "data.img_size": 16, "train.batch_size": 16, "train.max_steps": 4,
                                  "train.checkpoint_every": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_module.train(load_config(None, overrides), tmp_path / "full")

        interrupt_after_checkpoint(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            train_module.train(load_config(None, overrides), tmp_path / "part")
        monkeypatch.undo()
        train_module.train(load_config(None, overrides), tmp_path / "part", resume=True)
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(tmp_path / "full" / "student.safetensors"))
    b = load_file(str(tmp_path / "part" / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_auto_falls_back_when_a_dali_pipeline_cannot_be_built(monkeypatch, caplog):
    """auto picks dali-gpu where CUDA and DALI import; a GPU pipeline that cannot be built (a driver
    older than the wheel's CUDA) falls back to dali-cpu, then to torchvision, with a warning. Asked
    for by name, dali-gpu stays an error."""
    import edgedistill.data as data
    import edgedistill.data.dali_loader as dali_loader

    monkeypatch.setattr(data, "choose_loader", lambda requested, device: "dali-gpu")  # as on a CUDA machine
    cfg = _cfg("embedded:digits", 32, "auto")
    folder = train_folder(cfg, 0)
    with caplog.at_level("WARNING"):
        loader = build_train_loader(cfg, folder, 2, 16, 0, CPU)
    assert loader.name == "dali-cpu" and "dali-gpu pipeline cannot run here" in caplog.text

    def no_pipeline(*args, **kwargs):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(dali_loader, "_build_pipeline", no_pipeline)
    caplog.clear()
    with caplog.at_level("WARNING"):
        loader = build_train_loader(cfg, folder, 2, 16, 0, CPU)
    assert loader.name == "torchvision" and "falling back to torchvision" in caplog.text
    assert next(iter(loader.epoch(0)))[0][0].shape == (16, 3, 32, 32)
    for name in ("dali-gpu", "dali-cpu"):
        with pytest.raises(UserError):
            build_train_loader(_cfg("embedded:digits", 32, name), folder, 2, 16, 0, CPU)


def test_workers_fork_safely_after_an_onnxruntime_session_became_garbage(tmp_path):
    """An ONNX Runtime session with a thread pool, run, then left in cyclic garbage (as a run's
    fp32-ort teacher is after training): a forked worker that collects it would wait forever on
    its thread pool's locks (a plain DataLoader times out here). ForkSafeDataLoader collects it in
    this process before forking, so its workers load."""
    import gc
    import time

    from edgedistill.data.torch_loader import ForkSafeDataLoader
    from edgedistill.deploy.onnx_module import export_module
    from edgedistill.deploy.runtime import session

    export_module(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()), tmp_path / "m.onnx", 16, "embedding")
    sess = session(tmp_path / "m.onnx", threads=2)
    sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 16, 16), np.float32)})

    class Holder:
        pass

    gc.disable()  # only the collections below: none of this process's own may free the session first
    try:
        holder = Holder()
        holder.session, holder.itself = sess, holder
        del holder, sess
        time.sleep(1)  # the pool's thread now sleeps on its condition variable
        loader = ForkSafeDataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 3)), batch_size=4, num_workers=1,
                                    timeout=60, worker_init_fn=lambda _: gc.collect())
        assert sum(len(batch) for batch, in loader) == 8
    finally:
        gc.enable()
