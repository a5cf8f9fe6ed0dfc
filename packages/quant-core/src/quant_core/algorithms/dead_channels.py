"""Input channels that calibration never saw non-zero: how Hessian-based weight rounding treats them.

The classic GPTQ rule zeroes the weights of a channel whose Hessian diagonal is 0 (its input was
0 in every calibration token). That is exact only while the channel stays 0; when it is live at
inference the layer loses that channel's whole contribution (about twice round-to-nearest's
output error), and with all-zero calibration data it zeroes the whole layer. Here such a channel
is weighted as an average channel instead: its Hessian diagonal becomes the mean of the live
channels' (1 when none is live) with no correlation to the others, so its weight is rounded to
nearest (no error compensation flows in or out of it) and clip searches account for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant_core.diagnostics import warn

__all__ = ["fill_dead_channels"]


def fill_dead_channels(hessian: Tensor, names: list[str] | None = None) -> Tensor:
    """A copy of ``hessian`` (..., n, n) whose zero diagonal entries hold the mean live diagonal.

    With ``names`` (one per leading batch entry), a layer whose channels are all dead gets a
    :class:`QuantWarning`: its calibration data was all zeros, so GPTQ degenerates to
    round-to-nearest for it.
    """
    h = hessian.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    live = (~dead).sum(-1, keepdim=True)
    mean_live = torch.where(
        live > 0, (diag * ~dead).sum(-1, keepdim=True) / live.clamp(min=1), torch.ones_like(live)
    ).to(diag.dtype)
    diag.copy_(torch.where(dead, mean_live.expand_as(diag), diag))
    if names is not None:
        all_dead = (live == 0).reshape(-1).tolist()
        for name, degenerate in zip(names, all_dead):
            if degenerate:
                warn(
                    f"gptq: layer {name} saw only zeros in the calibration data (all input channels "
                    "0), so its weights are rounded to nearest without error compensation. Remedy: "
                    "calibrate with batches of real data that reach this layer.",
                    stacklevel=3,
                )
    return h
