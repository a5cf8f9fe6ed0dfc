"""Independent float references shared by the calibration-algorithm tests."""

from __future__ import annotations

import torch


def int_quant(bits: int):
    """Independent float reference: symmetric INT with scale amax/qmax, round half to even."""
    qmax = 2 ** (bits - 1) - 1

    def quant(x, amax):
        scale = amax / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe), -qmax - 1, qmax) * safe
        return torch.where(scale > 0, q, torch.zeros_like(q))

    return quant


def blockwise_ref(w, amax, block, bits=4):
    """Independent float64 block quantization of column slices of ``block`` (the last one short)."""
    quant = int_quant(bits)
    out = torch.empty(w.shape, dtype=torch.float64)
    for b, start in enumerate(range(0, w.shape[-1], block)):
        cols = slice(start, start + block)
        out[..., cols] = quant(w[..., cols].double(), amax[..., b : b + 1].double())
    return out


def block_max(w, block):
    """Max |w| of each column slice of ``block`` (the last one short), by explicit slicing."""
    return torch.stack(
        [w[..., s : s + block].abs().amax(-1) for s in range(0, w.shape[-1], block)], -1
    )
