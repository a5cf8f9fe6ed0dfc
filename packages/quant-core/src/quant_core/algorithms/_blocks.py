"""Cutting the last axis into blocks that need not divide it, as the kernels do.

A block size ``b`` that does not divide an axis of length ``d`` pads the axis with zeros to a
multiple of ``b``: the last block is short, the padding never changes an amax (zeros) and is
sliced off again, and a per-block amax has ``ceil(d / b)`` entries (``quant_kernels``' rule).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["from_blocks", "num_blocks", "pad_gram", "to_blocks"]


def num_blocks(length: int, size: int) -> int:
    """Blocks of ``size`` covering an axis of ``length`` (the last one may be short): ``ceil(length / size)``."""
    if size < 1:
        raise ValueError(f"block size must be >= 1, got {size}")
    return -(-length // size)


def to_blocks(x: Tensor, size: int) -> Tensor:
    """View ``x`` (..., d) as (..., ceil(d / size), size), zero-padding the last block."""
    pad = num_blocks(x.shape[-1], size) * size - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (x.shape[-1] // size, size))


def from_blocks(x: Tensor, length: int) -> Tensor:
    """Inverse of :func:`to_blocks`: flatten (..., nb, size) to (..., length), dropping the padding."""
    return x.flatten(-2)[..., :length]


def pad_gram(gram: Tensor, size: int) -> Tensor:
    """Zero-pad a square matrix (..., n, n) on both axes to a multiple of ``size``.

    Padded input channels carry no signal, so their rows and columns of ``X^T X`` are zero and
    a weight error there adds nothing to the output error.
    """
    pad = num_blocks(gram.shape[-1], size) * size - gram.shape[-1]
    return F.pad(gram, (0, pad, 0, pad)) if pad else gram
