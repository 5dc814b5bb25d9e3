"""Convolution arithmetic (Dumoulin & Visin, arXiv 1603.07285) as PyTorch implements it.

Pure integer functions shared by the walker (to check every site against the forward pass)
and by the replacement layers (to reproduce the original output size for any input size).
"""

from __future__ import annotations

__all__ = ["conv_output_size", "pool_output_size", "same_padding", "transposed_output_size"]


def conv_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    """Output length of a convolution: floor((i + 2p - d(k-1) - 1) / s) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(
    size: int,
    kernel: int,
    stride: int,
    padding: int = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
) -> int:
    """Output length of max/avg/lp pooling, including PyTorch's ceil_mode rule.

    With ceil_mode the last window may hang over the end, but it must start inside the input
    or the left padding; otherwise it is dropped.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (left, right) as timm's Conv2dSame/MaxPool2dSame compute it."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def transposed_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    output_padding: int = 0,
) -> int:
    """Output length of a transposed convolution: (i-1)s - 2p + d(k-1) + output_padding + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
