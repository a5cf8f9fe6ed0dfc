"""Shape checks for a quantizer's state, so that a wrong amax or pre-quant scale is refused by name
instead of being silently broadcast (or failing inside torch with no quantizer named)."""

from __future__ import annotations

import torch

import quant_kernels as qk

__all__ = ["check_amax_shape", "check_pre_quant_scale"]


def check_amax_shape(
    amax: torch.Tensor, axis: int | tuple[int, ...] | None, fmt: qk.QuantFormat, name: str
) -> None:
    """Refuse an amax whose shape does not fit the quantizer's granularity.

    One element always fits. A per-tensor quantizer (``axis=None``, no blocks) needs one element;
    a per-channel one needs a keepdim shape that varies only along ``axis`` (``(out, 1)`` for
    ``axis=0`` of a weight). Block and dynamic quantizers are checked by the kernels.
    """
    if amax.numel() <= 1 or fmt.block_axes or fmt.dynamic:
        return
    who = f"quantizer {name or '(unnamed)'}"
    shape = tuple(amax.shape)
    if axis is None:
        raise ValueError(
            f"{who} is per-tensor (axis=None), but was given an amax of shape {shape}; a "
            "per-tensor amax has one element"
        )
    axes = axis if isinstance(axis, tuple) else (axis,)
    if any(not -amax.dim() <= a < amax.dim() for a in axes):
        raise ValueError(
            f"{who} keeps one amax per index of axis {axis}, but its amax of shape {shape} has "
            f"only {amax.dim()} dim(s); give a keepdim amax (as reduce_amax(x, axis={axis}) returns)"
        )
    kept = {a % amax.dim() for a in axes}
    wrong = [d for d, n in enumerate(shape) if n > 1 and d not in kept]
    if wrong:
        raise ValueError(
            f"{who} keeps one amax per index of axis {axis}, but was given an amax of shape "
            f"{shape}, which varies along dim(s) {wrong}; it would be broadcast over the wrong "
            f"dims. Give a keepdim amax (as reduce_amax(x, axis={axis}) returns)"
        )


def check_pre_quant_scale(pqs: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """Refuse a per-channel pre-quant scale whose length is not the input's last dim."""
    if pqs.numel() > 1 and (x.dim() == 0 or pqs.shape[-1] != x.shape[-1]):
        raise ValueError(
            f"pre_quant_scale of quantizer {name or '(unnamed)'} has shape {tuple(pqs.shape)}, but "
            f"its input has shape {tuple(x.shape)}: it needs one scale per input channel "
            f"({x.shape[-1] if x.dim() else 1} values, the input's last dim)"
        )
