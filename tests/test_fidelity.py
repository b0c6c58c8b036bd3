"""Issue 12, method fidelity: shuffle-BN, the centred teacher target, DoGo's own views and
SimCLR augmentation, the simclr method, fp32 losses, lr schedules, the papers' linear protocol."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import EXACT_TEACHER, interrupt_after_checkpoint, tiny_overrides
from edgedistill.config import DataConfig
from edgedistill.recipe import load_config
from edgedistill.errors import UserError
from edgedistill.methods.components import (
    TEACHER_CENTER_FILE,
    ShuffleBN,
    auto_shuffle_bn_splits,
    mean_pairwise_cosine,
    resolve_shuffle_bn_splits,
)
from edgedistill.train import CHECKPOINT_FILE, build_scheduler, train


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A random CIFAR ResNet-20 as a plain state dict: a supervised-style teacher without a head."""
    from edgedistill.config import ModelConfig
    from edgedistill.models import create_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(create_backbone(ModelConfig(arch="resnet20_cifar")).state_dict(), path)
    return path


FAST = {"train.batch_size": 64, "train.max_steps": 2, "student.stem_stride": "null", "method.queue_size": 128,
        **EXACT_TEACHER}


def tiny(method: str, **extra) -> list[str]:
    """conftest's tiny settings at FAST's sizes; no queue for the methods that have none."""
    items = tiny_overrides(**{"method.name": method, **FAST, **extra})
    return [i for i in items if method not in ("dogo", "simclr") or not i.startswith("method.queue_size=")]


# ---------------------------------------------------------------- shuffle-BN

class TaggedBN(nn.Module):
    """Passes column 0 (a sample id) through and batch-normalises the rest; records each call's batch means."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3, affine=False)
        self.means: list[torch.Tensor] = []

    def forward(self, x):
        self.means.append(x[:, 1:].mean(0))
        return torch.cat([x[:, :1], self.bn(x[:, 1:])], dim=1)


def test_auto_splits_keep_64_samples_per_group():
    assert [auto_shuffle_bn_splits(b) for b in (16, 32, 64, 96, 128, 192, 256, 512, 1024)] == [1, 1, 1, 1, 2, 3, 4, 8, 8]
    assert resolve_shuffle_bn_splits(4, 64) == 4
    with pytest.raises(UserError, match="method.shuffle_bn_splits=3.*divisor"):
        resolve_shuffle_bn_splits(3, 64)


def test_shuffle_bn_uses_per_split_statistics_and_restores_order():
    torch.manual_seed(0)
    ids = torch.arange(64, dtype=torch.float32).unsqueeze(1)
    x = torch.cat([ids, torch.randn(64, 3) + ids / 8], dim=1)  # group statistics differ with the ids drawn
    encoder = TaggedBN().train()
    out = ShuffleBN(splits=4, seed=0)(encoder, x, call=0)
    assert len(encoder.means) == 4  # four groups, each with its own BN batch statistics
    means = torch.stack(encoder.means)
    assert (means - means.mean(0)).abs().max() > 0.05
    torch.testing.assert_close(out[:, 0], ids[:, 0])  # every output back in its input's place
    plain = TaggedBN().train()(x)
    assert not torch.allclose(out[:, 1:], plain[:, 1:])  # not the full-batch statistics
    # The permutation is a function of (seed, call): the same call count gives the same groups.
    again = ShuffleBN(splits=4, seed=0)(TaggedBN().train(), x, call=0)
    torch.testing.assert_close(out, again)
    other = ShuffleBN(splits=4, seed=0)(TaggedBN().train(), x, call=1)
    assert not torch.allclose(out, other)


def test_mocov2_key_encoder_runs_in_groups_and_query_encoder_in_one(teacher_ckpt):
    from edgedistill.methods import create_method

    assert create_method(load_config(None, tiny("mocov2")), 10).shuffle_bn.splits == 1  # batch 64: off by default
    cfg = load_config(None, tiny("mocov2", **{"method.shuffle_bn_splits": 2}))
    m = create_method(cfg, num_classes=10)
    assert m.shuffle_bn.splits == 2  # two groups of 32
    key_bn = next(mod for mod in m.encoder_k.modules() if isinstance(mod, nn.BatchNorm2d))
    query_bn = next(mod for mod in m.encoder_q.modules() if isinstance(mod, nn.BatchNorm2d))
    sizes = {"key": [], "query": []}
    key_bn.register_forward_hook(lambda mod, inp, out: sizes["key"].append(inp[0].shape[0]))
    query_bn.register_forward_hook(lambda mod, inp, out: sizes["query"].append(inp[0].shape[0]))
    m.train()
    m([torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32)], torch.zeros(64, dtype=torch.long))
    assert sizes == {"key": [32, 32], "query": [64]}
    assert int(m.shuffle_calls) == 1
    off = create_method(load_config(None, tiny_overrides(**{"method.name": "mocov2", **FAST,
                                                           "method.shuffle_bn_splits": 1})), 10)
    assert off.shuffle_bn.splits == 1


def test_resume_with_shuffle_bn_is_exact(tmp_path, monkeypatch):

    overrides = tiny_overrides(**{"method.name": "mocov2", **FAST, "method.shuffle_bn_splits": 2,
                                  "train.max_steps": 4, "train.checkpoint_every": 2})
    train(load_config(None, overrides), tmp_path / "full")

    interrupt_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), tmp_path / "part")
    monkeypatch.undo()
    train(load_config(None, overrides), tmp_path / "part", resume=True)
    a, b = load_file(str(tmp_path / "full" / "student.safetensors")), load_file(str(tmp_path / "part" / "student.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    ckpt = torch.load(tmp_path / "part" / CHECKPOINT_FILE, weights_only=True)
    assert int(ckpt["method"]["shuffle_calls"]) == 4


# ---------------------------------------------------------------- teacher centre

def test_mean_pairwise_cosine():
    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_disco_centres_a_headless_teacher_once_and_reuses_it_on_resume(tmp_path, teacher_ckpt, monkeypatch):

    overrides = tiny_overrides(**{"method.name": "disco", **FAST, "teacher.arch": "resnet20_cifar",
                                  "teacher.checkpoint": str(teacher_ckpt), "train.max_steps": 2,
                                  "train.checkpoint_every": 1})
    run = tmp_path / "disco"

    interrupt_after_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), run)
    monkeypatch.undo()
    stats = json.loads((run / TEACHER_CENTER_FILE).read_text())
    assert len(stats["mean"]) == 64 and stats["images"] > 0
    # Post-ReLU pooled features share one orthant; centring spreads them.
    assert stats["mean_pairwise_cosine_before"] > 0.3
    assert stats["mean_pairwise_cosine_after"] < stats["mean_pairwise_cosine_before"] - 0.2
    assert "mean pairwise cosine" in (run / "train.log").read_text()

    # On resume the stored centre is used, not recomputed: a doctored file shows through.
    stats["mean"] = [0.5] * 64
    (run / TEACHER_CENTER_FILE).write_text(json.dumps(stats))
    seen = {}
    from edgedistill.methods.components import FrozenTeacher

    original = FrozenTeacher.prepare

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen["center"] = self.center.clone()
        return result

    monkeypatch.setattr(FrozenTeacher, "prepare", spy)
    train(load_config(None, overrides), run, resume=True)
    torch.testing.assert_close(seen["center"], torch.full((64,), 0.5))


def test_centring_off_and_teacher_target_is_centred(teacher_ckpt, tmp_path):
    from edgedistill.data import train_folder
    from edgedistill.methods import create_method

    base = {"method.name": "disco", **FAST, "teacher.arch": "resnet20_cifar", "teacher.checkpoint": str(teacher_ckpt)}
    cfg = load_config(None, tiny_overrides(**base))
    m = create_method(cfg, num_classes=10)
    m.prepare(tmp_path, train_folder(cfg.data, 0), torch.device("cpu"))
    x = torch.randn(8, 3, 32, 32)
    raw = m.teacher.encoder.eval()(x)
    torch.testing.assert_close(m.teacher(x), torch.nn.functional.normalize(raw - m.teacher.center, dim=1))
    off = create_method(load_config(None, tiny_overrides(**base, **{"method.teacher_center": "false"})), 10)
    off.prepare(tmp_path / "off", None, torch.device("cpu"))
    assert not (tmp_path / "off" / TEACHER_CENTER_FILE).exists()
    torch.testing.assert_close(off.teacher(x), torch.nn.functional.normalize(raw, dim=1))


# ---------------------------------------------------------------- DoGo, SimCLR, augmentation

def test_simclr_augmentation_recipe():
    from edgedistill.data.torch_loader import augmentation_recipe, view_transform

    small = augmentation_recipe("simclr", DataConfig(img_size=32, min_scale=0.2))
    assert (small.min_scale, small.jitter, small.hue, small.p_jitter, small.p_gray, small.p_blur) == (0.08, 0.8, 0.2, 0.8, 0.2, 0.0)
    assert augmentation_recipe("simclr", DataConfig(img_size=96)).p_blur == 0.5
    moco = augmentation_recipe("mocov2", DataConfig(img_size=32, min_scale=0.2))
    assert (moco.min_scale, moco.jitter, moco.hue, moco.p_blur) == (0.2, 0.4, 0.1, 0.5)
    import torchvision.transforms.v2 as T

    def kinds(size):
        steps = view_transform(DataConfig(img_size=size), "simclr").transforms
        return [type(inner).__name__ for step in steps for inner in getattr(step, "transforms", [step])], steps

    names, steps = kinds(32)
    assert "GaussianBlur" not in names and "ColorJitter" in names and "RandomGrayscale" in names
    assert "GaussianBlur" in kinds(96)[0]
    jitter = next(inner for step in steps for inner in getattr(step, "transforms", []) if isinstance(inner, T.ColorJitter))
    assert jitter.brightness == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx((-0.2, 0.2))


@pytest.mark.parametrize("loader", ["torchvision", "dali-cpu"])
def test_dogo_loader_gives_four_independent_simclr_views(loader):
    from edgedistill.data import build_train_loader, dali_available, train_folder
    from edgedistill.methods import method_class

    if loader.startswith("dali") and not dali_available():
        pytest.skip("DALI is not installed")
    dogo = method_class("dogo")
    assert dogo.num_views == 4 and dogo.augmentation == "simclr" and method_class("simclr").augmentation == "simclr"
    cfg = DataConfig(train="embedded:digits", img_size=32, loader=loader, workers=1)
    tl = build_train_loader(cfg, train_folder(cfg, 0), dogo.num_views, 16, 0, torch.device("cpu"),
                            augmentation=dogo.augmentation)
    assert tl.augmentation == "simclr"
    views, labels = next(iter(tl.epoch(0)))
    assert len(views) == 4 and all(v.shape == (16, 3, 32, 32) for v in views) and labels.shape == (16,)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(views[i], views[j])


def test_dogo_peer_gets_its_own_pair_of_views():
    from edgedistill.methods import create_method

    cfg = load_config(None, tiny("dogo", **{"method.peer.arch": "resnet20_cifar"}))
    cfg.train.batch_size = 8
    m = create_method(cfg, num_classes=10)
    assert m.hp.student_kl_weight == 100.0 and m.hp.peer_kl_weight == 1.0
    views = [torch.full((8, 3, 32, 32), float(i)) for i in range(4)]
    seen = {"student": [], "peer": []}
    m.student.register_forward_pre_hook(lambda mod, args: seen["student"].append(float(args[0][0, 0, 0, 0])))
    m.peer.register_forward_pre_hook(lambda mod, args: seen["peer"].append(float(args[0][0, 0, 0, 0])))
    m(views, torch.zeros(8, dtype=torch.long))
    assert seen == {"student": [0.0, 1.0], "peer": [2.0, 3.0]}


def test_simclr_is_nt_xent_of_one_model():
    from edgedistill.losses import nt_xent
    from edgedistill.methods import create_method

    cfg = load_config(None, tiny("simclr"))
    m = create_method(cfg, num_classes=10).eval()
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    out = m([x1, x2], torch.zeros(8, dtype=torch.long))
    z1 = torch.nn.functional.normalize(m.student(x1), dim=1)
    z2 = torch.nn.functional.normalize(m.student(x2), dim=1)
    torch.testing.assert_close(out["loss"], nt_xent(z1, z2, 0.5))
    assert [g.name for g in m.optimizer_groups()] == ["student"] and set(m.deployable()) == {"student", "head"}


# ---------------------------------------------------------------- fp32 losses

def test_losses_ignore_autocast():
    from edgedistill.losses import info_nce, nt_xent, seed_loss

    torch.manual_seed(0)
    s, t = (torch.nn.functional.normalize(torch.randn(16, 64), dim=1) for _ in range(2))
    t = torch.nn.functional.normalize(t + 3 * s, dim=1)  # cosines near 1, where bf16 hurts at T = 1e-4
    queue = torch.nn.functional.normalize(torch.randn(256, 64), dim=1)
    plain = [seed_loss(s, t, queue), info_nce(s, t, queue, 0.2), nt_xent(s, t, 0.5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [seed_loss(s.bfloat16(), t, queue), info_nce(s, t, queue, 0.2), nt_xent(s, t, 0.5)]
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32
    torch.testing.assert_close(plain[1], mixed[1])
    torch.testing.assert_close(plain[2], mixed[2])
    # The student side was handed over in bf16: only its own rounding remains, not bf16 logits.
    assert abs(float(plain[0] - mixed[0])) < 0.05 * float(plain[0])


# ---------------------------------------------------------------- schedules, config

def test_schedule_choices_and_constant_lr(tmp_path):
    with pytest.raises(UserError, match="train.schedule: 'linear' is not one of cosine, constant"):
        load_config(None, ["train.schedule=linear"])
    with pytest.raises(UserError, match="eval.protocol"):
        load_config(None, ["eval.protocol=fast"])
    param = nn.Parameter(torch.zeros(1))

    def lrs_over(opt, sched, steps: int) -> list[float]:
        seen = []
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    opt = torch.optim.Adam([param], lr=1e-3)
    lrs = lrs_over(opt, build_scheduler(opt, total=20, warmup=4, schedule="constant"), 20)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and lrs[4:] == pytest.approx([1e-3] * 16)
    opt = torch.optim.SGD([param], lr=1.0)
    lrs = lrs_over(opt, build_scheduler(opt, total=10, warmup=0, schedule="cosine"), 10)
    assert lrs[0] == 1.0 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.03


def test_constant_schedule_in_a_run_and_tensorboard(tmp_path):
    import importlib.util

    overrides = tiny("simclr", **{"train.batch_size": 32, "train.max_steps": 4, "train.warmup_steps": 0,
                                  "train.schedule": "constant", "train.log_every": 1, "train.tensorboard": "true"})
    cfg = load_config(None, overrides)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match="pip install tensorboard"):
            train(cfg, tmp_path / "run")
        return
    train(cfg, tmp_path / "run")
    lrs = {json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()}
    assert lrs == {pytest.approx(3e-4 * 32 / 256)}
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- the papers' linear protocol

def test_paper_protocol_reports_both(tmp_path):
    from edgedistill.evaluate import evaluate_run

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(**{"method.name": "mocov2", **FAST, "train.batch_size": 32})), run)
    result = evaluate_run(run, overrides=["eval.protocol=paper", "eval.paper_epochs=1", "eval.linear_epochs=2"])
    data = json.loads((run / "eval.json").read_text())
    assert data["protocol"] == "paper"
    student = data["student"]
    assert 0 <= student["linear_top1"] <= 100 and 0 <= student["paper_linear_top1"] <= 100
    assert student["paper_probe"]["weight_decay"] == 0.0 and student["paper_probe"]["epochs"] == 1
    assert result.student.paper_linear_top1 == student["paper_linear_top1"]
    frozen = evaluate_run(run, overrides=["eval.linear_epochs=2"])
    assert frozen.protocol == "frozen" and frozen.student.paper_linear_top1 is None
