"""SPD-Conv's inner convolution in eager CPU inference: oneDNN, called directly, in pieces.

SPD-Conv's inner convolution has 4x the input channels of the layer it replaces, on an input
4x smaller, so it carries 4x the weights for the same few output positions. Two of PyTorch's CPU
choices then cost it far more than its MACs (1 thread, batch 1, docs/benchmarks.md):

- With one thread and a batch under 16, PyTorch runs a 1x1 stride-1 convolution as a GEMM
  rather than through oneDNN ("THNN is faster single-threaded"); on the AMD EPYC measured here
  that GEMM runs at half oneDNN's rate (7.7 vs 3.9 ms for resnet50's layer2 SPD 1x1,
  1024 -> 512 channels at 28x28; 8.4 vs 4.2 ms at layer3).
- oneDNN lays the weight out afresh on every call, into a new buffer of the weight's size; from
  32 MiB up glibc serves that buffer with new pages from the kernel on each call, and faulting
  them in costs more than the convolution (25 vs 10 ms for resnet50's layer4 SPD conv, 36 MiB
  of weights, 11.7 vs 6.7 ms for its 32 MiB 1x1).

`conv2d` therefore calls oneDNN's convolution itself, over slices of the output channels whose
weights each stay under 32 MiB. It serves contiguous (NCHW) float32 inputs in eager inference
with oneDNN enabled (`torch.backends.mkldnn`), when calling the module would only run its
forward (an `nn.Conv2d`, no hooks, no autocast); otherwise the caller runs the module. Results
equal the module's to float32 rounding (a different summation order).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from surgeon.layers.eager import inference_route

__all__ = ["MMAP_CEILING", "conv2d", "slice_channels"]

# glibc's largest mmap threshold: a block this size or larger is mapped afresh on every malloc
MMAP_CEILING = 32 << 20


def slice_channels(weight: Tensor, ceiling: int = MMAP_CEILING) -> int:
    """Output channels per slice: as few equal slices as keep each one's weight, laid out by
    oneDNN (which pads channel counts up to a block of 16), below `ceiling` bytes."""
    per_channel = weight[0].numel() * weight.element_size()
    most = max(ceiling // per_channel - _BLOCK, 1)
    count = -(-weight.shape[0] // most)
    return -(-weight.shape[0] // count)


_BLOCK = 16


def conv2d(x: Tensor, conv: nn.Conv2d) -> Tensor | None:
    """`conv(x)` through oneDNN in output-channel slices, or None where that route does not
    apply (the caller then calls `conv`)."""
    if not _applies(x, conv):
        return None
    weight, bias = conv.weight, conv.bias
    padding = [int(p) for p in conv.padding]  # a tuple: `_applies` ruled out 'same'/'valid'
    stride, dilation = list(conv.stride), list(conv.dilation)
    size = slice_channels(weight, MMAP_CEILING)
    if size == weight.shape[0]:
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, 1)
    weights = weight.split(size)
    biases = [None] * len(weights) if bias is None else bias.split(size)
    outputs = [
        torch.mkldnn_convolution(x, w, b, padding, stride, dilation, 1)
        for w, b in zip(weights, biases, strict=True)
    ]
    return torch.cat(outputs, dim=1)


def _applies(x: Tensor, conv: nn.Conv2d) -> bool:
    tensors = [x, conv.weight] if conv.bias is None else [x, conv.weight, conv.bias]
    return (
        inference_route(*tensors)  # first: nothing below may run under a tracer
        and type(conv) is nn.Conv2d
        and "forward" not in conv.__dict__
        and not _observed(conv)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and x.dim() == 4
        and x.numel() > 0
        and x.is_contiguous()
        and conv.weight.is_contiguous()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch, "mkldnn_convolution")
        and bool(torch.backends.mkldnn.enabled)
        and not torch.is_autocast_enabled("cpu")
    )


def _observed(conv: nn.Module) -> bool:
    # what nn.Module.__call__ checks before skipping straight to forward: hooks would not run
    return bool(
        conv._forward_hooks
        or conv._forward_pre_hooks
        or conv._backward_hooks
        or conv._backward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )
