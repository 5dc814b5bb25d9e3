"""Per-dimension spatial arguments: `3` or `(3,)` or `[3, 5]` as one int per spatial dim.

PyTorch layers accept an int or a sequence for kernel, stride, padding and dilation; the
replacement layers store a tuple with one entry per spatial dim so their arithmetic can loop.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["per_dim"]


def per_dim(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """`value` as a tuple of `dims` ints: an int (or a 1-sequence) is repeated.

    A sequence of another length raises ValueError naming the argument.
    """
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ValueError(f"{name} {values} has {len(values)} entries for {dims} spatial dims")
    return values
