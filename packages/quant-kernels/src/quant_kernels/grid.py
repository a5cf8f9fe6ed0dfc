"""Fake quantization on a plain element grid, batched: many amaxes (or scales) against one tensor.

For formats with float32 scales (``QuantFormat.scale_mode`` is ``ScaleMode.FLOAT32``: INT and FP elements per
tensor, channel or block) these are exactly `fake_quantize`'s reference arithmetic, without its
layout work: ``amax`` only has to broadcast against ``x``, so searches (MSE clipping, GPTQ's column
loop) quantize many candidates in one call. Results are float32.
"""

from __future__ import annotations

import torch

from quant_kernels.formats import QuantFormat, ScaleMode
from quant_kernels.reference import divide, round_to_grid_

__all__ = ["fake_quantize_grid", "fake_quantize_with_scale", "grid_scale"]


def _check(fmt: QuantFormat) -> None:
    if fmt.scale_mode is not ScaleMode.FLOAT32:
        raise ValueError(
            f"{fmt.label} has {fmt.scale_mode.value} scales; the grid primitives take formats with "
            "float32 scales (use fake_quantize for block-scaled formats)"
        )


def grid_scale(amax: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """float32 scale ``amax / M`` (``M`` the grid's largest magnitude), correctly rounded on every device."""
    _check(fmt)
    return divide(amax.float(), fmt.bounds[1])


def fake_quantize_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    fmt: QuantFormat,
    divisor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grid_round(clamp(x / scale, lo, hi)) * scale`` in float32, ``scale`` broadcasting against ``x``.

    A zero scale gives zeros. ``divisor`` (``scale`` with zeros replaced by 1) may be passed when
    precomputed; ``out`` (float32, the broadcast shape) receives the result when given.
    """
    _check(fmt)
    if divisor is None:
        divisor = torch.where(scale == 0, 1.0, scale)
    lo, hi = fmt.bounds
    v = torch.div(x.float(), divisor, out=out)
    return round_to_grid_(v.clamp_(lo, hi), fmt.element).mul_(scale)


def fake_quantize_grid(
    x: torch.Tensor, amax: torch.Tensor, fmt: QuantFormat, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`fake_quantize` of ``x`` with a static ``amax`` broadcasting against it (one per element,
    block, row or candidate), bit-identical to the dispatcher's result, in float32."""
    return fake_quantize_with_scale(x, grid_scale(amax, fmt), fmt, out=out)
