"""Convolutions whose weight gradient stays fast on the CPU when their input is smaller than their kernel.

oneDNN computes a convolution's weight gradient with its direct kernels while the input is at
least as large as the (dilated) kernel. Below that, the late layers of the students and the
teacher at 32 px (a MobileNetV3's 5x5 depthwise layers on 2x2 maps, a ResNet-18's 3x3 layers on
1x1 maps), it falls back to an im2col GEMM (`x64:gemm:jit` in ONEDNN_VERBOSE) that spends its
time on the padding: on an AVX2 core pair 26 ms for a 5x5 depthwise layer on [64, 576, 2, 2]
against 0.3 ms for its forward, 86 ms for a 3x3 512->512 layer on [64, 512, 1, 1] against 3 ms.

`SmallMapConv2d` computes that one gradient tap by tap instead: for each kernel tap whose
window touches the input (most taps of a 3x3 kernel on a 1x1 map see only padding and have a zero
gradient), the output gradient times the input shifted by the tap, summed over batch and
positions (a GEMM for a dense layer, a multiply-sum per channel for a depthwise one). It is the
same sum in another order: the gradient differs from oneDNN's by float rounding only (tested).
The forward and the input gradient stay oneDNN's (under CPU autocast in autocast's dtype, as
autocast would run the layer), and everything else (GPU, no gradient, a frozen weight, inputs at
least as large as the kernel, grouped layers that are not depthwise) takes `nn.Conv2d`'s own
path, so the module is an `nn.Conv2d` with the same parameters and state dict.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight_shape: torch.Size, stride: tuple[int, int],
                     padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """d loss / d weight of a dense (groups 1) or depthwise (groups = channels) 2-d convolution
    with zero padding, from its input `x` and the gradient of its output, tap by tap."""
    out_channels, _, kh, kw = weight_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    (height, width), (out_h, out_w) = x.shape[-2:], grad_out.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph))
    grad = x.new_zeros(weight_shape)
    rows = [i for i in range(kh) if i * dh <= ph + height - 1 and i * dh + sh * (out_h - 1) >= ph]
    cols = [j for j in range(kw) if j * dw <= pw + width - 1 and j * dw + sw * (out_w - 1) >= pw]
    if groups == 1:  # [out, N*h*w] @ [N*h*w, in] per tap
        grad_rows = grad_out.permute(1, 0, 2, 3).reshape(out_channels, -1)
    for i in rows:
        for j in cols:
            window = padded[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
            if groups == 1:
                grad[:, :, i, j] = grad_rows @ window.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            else:
                grad[:, 0, i, j] = (window * grad_out).sum((0, 2, 3))
    return grad


class _SmallMapConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, dilation, groups
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], groups, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad(x, grad_out, weight.shape, stride, padding, dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


class SmallMapConv2d(nn.Conv2d):
    """An `nn.Conv2d` (dense or depthwise, zero padding) whose weight gradient on the CPU, for an
    input smaller than the dilated kernel, is `conv_weight_grad` (see the module doc)."""

    def _conv_forward(self, input, weight, bias):
        reach_h, reach_w = ((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation))
        if not (input.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled()
                and (input.shape[-2] < reach_h or input.shape[-1] < reach_w)):
            return super()._conv_forward(input, weight, bias)
        if torch.is_autocast_enabled("cpu"):  # the layer in autocast's dtype, as autocast runs a convolution
            dtype = torch.get_autocast_dtype("cpu")
            input, weight = input.to(dtype), weight.to(dtype)  # differentiable casts: fp32 weight gradients
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast("cpu", enabled=False):  # a no-op without autocast
            return _SmallMapConv.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def takes_small_map_grad(module: nn.Module) -> bool:
    """A plain `nn.Conv2d`, dense or depthwise, with a kernel larger than 1x1 and zero (or no)
    padding given as sizes."""
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and max(module.kernel_size) > 1
            and (module.groups == 1 or module.groups == module.in_channels == module.out_channels))


def use_small_map_grad(model: nn.Module) -> int:
    """Turn every such `nn.Conv2d` of `model` into a `SmallMapConv2d`, in place (the same parameter
    objects, so an optimizer built before or after sees them); returns how many."""
    swapped = 0
    for module in model.modules():
        if takes_small_map_grad(module):
            module.__class__ = SmallMapConv2d
            swapped += 1
    return swapped
