"""Every method trains a few steps through the real trainer and deploys only the backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torch.nn.functional as F

from edgedistill.recipe import load_config
from edgedistill.losses import mutual_kl, view_similarity_log_probs
from edgedistill.models import count_params, create_backbone, feature_dim, load_into
from edgedistill.train import train
from conftest import EXACT_TEACHER, tiny_overrides


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised CIFAR ResNet-20 saved as a plain state dict (the format users hand in)."""
    from edgedistill.config import ModelConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(create_backbone(ModelConfig(arch="resnet20_cifar")).state_dict(), path)
    return path


# Smaller than conftest's tiny settings (the CPU is shared): 2 steps of 16 images, default stem.
FAST = {"train.batch_size": 16, "train.max_steps": 2, "student.stem_stride": "null"}


def _overrides(method: str, teacher: Path | None, **extra) -> list[str]:
    items = tiny_overrides(**{"method.name": method, **FAST, **extra})
    if method in ("supervised", "dogo", "simclr"):  # no queue in these methods
        items = [i for i in items if not i.startswith("method.queue_size=")]
    if teacher is not None:
        items += ["teacher.arch=resnet20_cifar", f"teacher.checkpoint={teacher}",
                  *(f"{k}={v}" for k, v in EXACT_TEACHER.items())]
    return items


def _check_backbone_file(path: Path, model_cfg) -> None:
    state = load_file(str(path))
    backbone = create_backbone(model_cfg)
    # No projection head at deployment: exactly the plain timm backbone's parameters.
    params = sum(v.numel() for k, v in state.items() if k in dict(backbone.named_parameters()))
    assert params == count_params(backbone)
    load_into(backbone, state, str(path), allow_mismatch=False)


CASES = {
    "mocov2": {},
    "disco": {"teacher": True},
    "seed": {"teacher": True},
    "dogo": {"method.peer.arch": "resnet20_cifar"},
    "simclr": {},
    "supervised": {},
}


@pytest.mark.parametrize("method", list(CASES))
def test_method_trains_and_deploys_backbone(method, tmp_path, teacher_ckpt):
    extra = dict(CASES[method])
    teacher = teacher_ckpt if extra.pop("teacher", False) else None
    cfg = load_config(None, _overrides(method, teacher, **extra))
    result = train(cfg, tmp_path / method)

    assert result.steps == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())
    run = json.loads((tmp_path / method / "run.json").read_text())
    assert run["status"] == "complete"
    _check_backbone_file(tmp_path / method / "student.safetensors", cfg.student)
    if method == "dogo":
        _check_backbone_file(tmp_path / method / "peer.safetensors", cfg.method.peer)
        assert {"ntxent_student", "ntxent_peer", "kl_student", "kl_peer"} <= set(result.final_losses)
    if method in ("disco", "seed"):
        # The frozen teacher is rebuilt from its checkpoint, never stored in the run's checkpoint.
        ckpt = torch.load(tmp_path / method / "checkpoint.pt", weights_only=True)
        assert not any(k.startswith("teacher.") for k in ckpt["method"])


def test_seed_uses_one_shared_view_and_teacher_width(teacher_ckpt):
    from edgedistill.methods import create_method, method_class

    cfg = load_config(None, _overrides("seed", teacher_ckpt))
    assert method_class("seed").num_views == 1
    m = create_method(cfg, num_classes=10)
    assert m.student.head[0].out_features == feature_dim(m.student.backbone)  # hidden = the student's feature width
    assert m.student.head[-1].out_features == 64 == m.queue.embeddings.shape[1]  # = ResNet-20's embedding
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert m.teacher.encoder.training is False  # teacher_bn: eval by default
    m.train()
    assert m.teacher.encoder.training is False


def test_seed_teacher_gets_no_gradient_and_queue_advances(teacher_ckpt):
    from edgedistill.methods import create_method

    cfg = load_config(None, _overrides("seed", teacher_ckpt, **{"method.queue_size": 64}))
    m = create_method(cfg, num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    before = m.queue.embeddings.clone()
    out = m([x], torch.zeros(16, dtype=torch.long))
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None for p in m.student.parameters())
    assert int(m.queue.ptr) == 16 and not torch.equal(before[:16], m.queue.embeddings[:16])
    assert torch.equal(before[16:], m.queue.embeddings[16:])


def test_dogo_two_optimizers_and_separate_gradients():
    from edgedistill.methods import create_method

    cfg = load_config(None, _overrides("dogo", None, **{"method.peer.arch": "resnet20_cifar"}))
    m = create_method(cfg, num_classes=10)
    groups = m.optimizer_groups()
    assert [g.name for g in groups] == ["student", "peer"]
    assert all(g.optimizer == "adam" and g.lr == 3e-4 and g.weight_decay == 1e-6 for g in groups)
    student_ids = {id(p) for p in groups[0].params}
    assert student_ids.isdisjoint(id(p) for p in groups[1].params)
    assert set(m.deployable()) == {"student", "head", "peer"}

    # The KL terms move each model only: the peer's KL gives the student no gradient.
    x1, x2, x3, x4 = (torch.randn(8, 3, 32, 32) for _ in range(4))
    out = m([x1, x2, x3, x4], torch.zeros(8, dtype=torch.long))
    assert torch.isfinite(out["loss"])
    m.zero_grad()
    s = [F.normalize(m.student(x), dim=1) for x in (x1, x2)]
    p = [F.normalize(m.peer(x), dim=1) for x in (x3, x4)]
    kl_p = mutual_kl(view_similarity_log_probs(*p), view_similarity_log_probs(*s))
    kl_p.backward()
    assert all(q.grad is None for q in m.student.parameters())
    assert any(q.grad is not None for q in m.peer.parameters())


def test_dogo_rejects_peer_checkpoint(tmp_path):
    from edgedistill.errors import UserError
    from edgedistill.methods import create_method

    cfg = load_config(None, _overrides("dogo", None, **{"method.peer.checkpoint": str(tmp_path / "x.pt")}))
    with pytest.raises(UserError, match="from scratch"):
        create_method(cfg, num_classes=10)


def test_seed_without_teacher_is_a_clear_error():
    from edgedistill.errors import UserError
    from edgedistill.methods import create_method

    # Refused when the recipe is validated (or, for a config built by hand, by the method).
    with pytest.raises(UserError, match="needs a teacher"):
        create_method(load_config(None, _overrides("seed", None)), num_classes=10)


def test_queue_push_is_out_of_place():
    """The queue is replaced, not written in place: under `train.compile` the loss's backward may
    read the queue tensor itself (torch.compile recomputes the snapshot's clone rather than saving
    it), and an in-place push then failed the step ("modified by an inplace operation")."""
    import torch

    from edgedistill.methods.components import EmbeddingQueue

    queue = EmbeddingQueue(8, 4)
    before = queue.embeddings
    saved = before.clone()
    queue.push(torch.ones(4, 4))
    assert torch.equal(before, saved)
    assert torch.equal(queue.embeddings[:4], torch.ones(4, 4)) and torch.equal(queue.embeddings[4:], saved[4:])
    assert int(queue.ptr) == 4 and "embeddings" in dict(queue.named_buffers())
    queue.push(torch.zeros(4, 4))
    assert int(queue.ptr) == 0 and not queue.embeddings[4:].any()
