import logging

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import SHARED_TEACHERS
from edgedistill.config import ModelConfig
from edgedistill.errors import UserError
from edgedistill.models import count_params, create_backbone, head_from_state, load_encoder, projection_head, simclr_head


def test_unknown_architecture_suggests_close_matches():
    with pytest.raises(UserError, match="mobilenetv3_large_100"):
        create_backbone(ModelConfig(arch="mobilenetv3_large"))


@pytest.mark.parametrize("arch", ["mobilenetv3_large_100", "efficientnet_b0", "resnet18", "resnet20_cifar"])
@pytest.mark.parametrize("size", [32, 224])
def test_backbones_take_32_and_224_inputs(arch, size):
    model = create_backbone(ModelConfig(arch=arch)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.ndim == 2 and out.shape[0] == 1


def test_stem_stride_keeps_parameters_and_resolution():
    plain = create_backbone(ModelConfig(arch="mobilenetv3_large_100"))
    cifar = create_backbone(ModelConfig(arch="mobilenetv3_large_100", stem_stride=1))
    assert count_params(plain) == count_params(cifar)
    feats = {}
    cifar.blocks.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    cifar(torch.randn(1, 3, 32, 32))
    assert feats["x"].shape[-1] == 2  # 32 / 16 instead of 32 / 32


def _write_moco_checkpoint(path, arch="resnet18"):
    """A MoCo v2 checkpoint as the MoCo reference writes it: module.encoder_q.* with an MLP fc."""
    backbone = timm.create_model(arch, num_classes=0)
    head = projection_head(512, 512, 128)
    state = {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"module.encoder_q.fc.{k}": v for k, v in head.state_dict().items()})
    state.update({f"module.encoder_k.{k}": v for k, v in backbone.state_dict().items()})
    torch.save({"epoch": 200, "arch": arch, "state_dict": state}, path)
    return backbone, head


def test_moco_checkpoint_gives_projection_embedding(tmp_path):
    ckpt = tmp_path / "moco.pth.tar"
    backbone, head = _write_moco_checkpoint(ckpt)
    enc = load_encoder(ModelConfig(arch="resnet18", checkpoint=str(ckpt))).eval()
    assert enc.out_dim == 128
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = head(backbone.eval()(x))
        assert torch.allclose(enc(x), expected, atol=1e-5)


def test_torchvision_state_dict_drops_classifier_and_logs(tmp_path, caplog):
    import torchvision

    ckpt = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), ckpt)
    with caplog.at_level(logging.INFO, logger="edgedistill"):
        enc = load_encoder(ModelConfig(arch="resnet18", checkpoint=str(ckpt)))
    assert enc.out_dim == 512
    assert "dropped classifier" in caplog.text and "pooled features" in caplog.text


def test_checkpoint_that_does_not_fit_lists_keys(tmp_path):
    ckpt = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), ckpt)
    with pytest.raises(UserError) as e:
        load_encoder(ModelConfig(arch="resnet34", checkpoint=str(ckpt)))
    assert "missing keys" in str(e.value) and "layer1.2" in str(e.value) and str(ckpt) in str(e.value)
    enc = load_encoder(ModelConfig(arch="resnet34", checkpoint=str(ckpt), allow_mismatch=True))
    assert enc.out_dim == 512


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_encoder(ModelConfig(arch="resnet18", checkpoint=str(tmp_path / "missing.pth")))


def test_pickled_code_is_refused(tmp_path):
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "callback": logging.getLogger}, ckpt)
    with pytest.raises(UserError, match="weights_only"):
        load_encoder(ModelConfig(arch="resnet18", checkpoint=str(ckpt)))


@pytest.mark.skipif(not SHARED_TEACHERS.is_dir(), reason="../shared/teachers is absent")
def test_legacy_cifar_teacher_loads_and_classifies():
    # The checkpoint's own classifier on top of our backbone must reproduce a confident model.
    path = SHARED_TEACHERS / "resnet56-4bfd9763.th"
    enc = load_encoder(ModelConfig(arch="resnet56_cifar", checkpoint=str(path))).eval()
    assert enc.out_dim == 64
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    full = timm.create_model("resnet56_cifar", num_classes=10)
    full.load_state_dict({k[len("module."):]: v for k, v in state.items()}, strict=False)
    full.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(full.forward_head(full.forward_features(x), pre_logits=True), enc(x), atol=1e-5)


def test_saved_student_has_exactly_the_plain_backbone_parameters(trained_run):
    state = load_file(str(trained_run / "student.safetensors"))
    plain = create_backbone(ModelConfig(arch="mobilenetv3_small_100"))
    n_saved = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_saved == count_params(plain)
    assert not any(k.startswith(("head", "fc", "encoder")) for k in state)


@pytest.mark.parametrize("make", [lambda: projection_head(16, 32, 8), lambda: simclr_head(16, 32, 8)], ids=["moco", "simclr"])
def test_saved_heads_of_every_method_rebuild(make):
    head = make().eval()
    rebuilt = head_from_state(head.state_dict(), "head.safetensors").eval()
    x = torch.randn(4, 16)
    assert torch.allclose(head(x), rebuilt(x))
    with pytest.raises(UserError, match="unrecognised projection head"):
        head_from_state({"weight": torch.zeros(2, 2)}, "odd.safetensors")



@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("kernel,stride,dilation,size,bias", [(5, 1, 1, 2, False), (3, 2, 1, 1, True), (3, 1, 2, 4, False),
                                                               (5, 2, 1, 3, True), (3, 1, 1, 1, False)])
def test_small_map_grad_matches_pytorch_where_the_kernel_is_larger_than_the_input(groups, kernel, stride, dilation,
                                                                                 size, bias):
    """The tap-by-tap weight gradient (models/small_map_conv.py) takes over exactly where oneDNN
    would fall back to its slow GEMM, for dense and depthwise layers, and computes PyTorch's
    gradients (float64: to rounding)."""
    from edgedistill.models.small_map_conv import SmallMapConv2d, use_small_map_grad

    torch.manual_seed(0)
    padding = kernel // 2 * dilation

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(6, 6, 1), torch.nn.Conv2d(6, 6, kernel, stride, padding, dilation,
                                                                           groups=groups, bias=bias)).double()

    plain, fast = net(), net()
    fast.load_state_dict(plain.state_dict())
    assert use_small_map_grad(fast) == 1 and type(fast[1]) is SmallMapConv2d  # a 1x1 kernel is never larger
    x = torch.randn(3, 6, size, size + 1, dtype=torch.double)
    out, out_fast = plain(x.clone().requires_grad_()), fast(x.clone().requires_grad_())
    assert type(out_fast.grad_fn).__name__ == "_SmallMapConvBackward"
    torch.testing.assert_close(out_fast, out, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_fast.backward(grad)
    for name, param in plain.named_parameters():
        torch.testing.assert_close(dict(fast.named_parameters())[name].grad, param.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_small_map_grad_leaves_large_inputs_frozen_weights_and_other_groupings_to_pytorch():
    from edgedistill.models.small_map_conv import use_small_map_grad

    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert use_small_map_grad(torch.nn.Sequential(conv, torch.nn.Conv2d(4, 8, 3, groups=2))) == 1
    assert type(conv(torch.randn(2, 4, 3, 3)).grad_fn).__name__ != "_SmallMapConvBackward"
    conv.requires_grad_(False)
    assert conv(torch.randn(2, 4, 2, 2)).grad_fn is None
    with torch.no_grad():
        assert conv.requires_grad_(True)(torch.randn(2, 4, 2, 2)).grad_fn is None


def test_small_map_grad_under_cpu_autocast_runs_in_its_dtype():
    """Under bf16 autocast the layer runs in bf16 as autocast would run it, and the fp32 weight gets
    PyTorch's gradient to bf16 rounding."""
    from edgedistill.models.small_map_conv import use_small_map_grad

    torch.manual_seed(0)
    plain, fast = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
    fast.load_state_dict(plain.state_dict())
    use_small_map_grad(fast)
    x = torch.randn(4, 8, 2, 2)
    grads = []
    for conv in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        grads.append(conv.weight.grad)
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not (__import__("shutil").which("g++") or __import__("shutil").which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_small_map_grad_under_torch_compile():
    """`train.compile` compiles the student with its small-map layers: the compiled model's weight
    gradients are PyTorch's eager ones (dense and depthwise layers on a 2x2 map)."""
    from edgedistill.models.small_map_conv import SmallMapConv2d, use_small_map_grad

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 8, 5, padding=2, groups=8), torch.nn.Flatten(), torch.nn.Linear(32, 3))

    x = torch.randn(4, 8, 2, 2)
    eager, model = make(), make()
    eager(x).sum().backward()
    use_small_map_grad(model)
    assert isinstance(model[0], SmallMapConv2d) and isinstance(model[2], SmallMapConv2d)
    torch.compile(model)(x).sum().backward()
    for ours, reference in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-6)
