"""Validate fake-quantization arguments once and turn them into a `QuantPlan` every backend reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quant_kernels.blocking import BlockLayout, block_axes, layout_for
from quant_kernels.formats import (
    E4M3_MAX,
    ElementFormat,
    QuantFormat,
    ScaleMode,
    nvfp4_global_amax,
)

__all__ = [
    "QuantPlan",
    "check_amax",
    "global_amax_of",
    "keyword_format",
    "make_plan",
    "plan_for_format",
]

FOUR_OVER_SIX_E4M3_MAX = 256.0
"""NVFP4 "four over six": the E4M3 value a block scale of the global amax maps to (448 without it),
so that a block whose amax maps to 4 instead of 6 (scale 1.5 times larger) still fits E4M3: 384."""


@dataclass(frozen=True)
class QuantPlan:
    """Everything a backend needs: element grid, group layout, scale format and the static amaxes.

    ``lo``/``hi`` bound the grid in element units (INT codes, or ±max of the FP format);
    ``amax`` is None (dynamic) or float32 shaped ``layout.scale_view_shape``.
    """

    element: ElementFormat
    layout: BlockLayout
    scale_mode: ScaleMode
    lo: float
    hi: float
    amax: torch.Tensor | None
    global_amax: torch.Tensor | None
    four_over_six: bool = False

    @property
    def scale_norm(self) -> float:
        """The E4M3 value a block at the global amax maps to: 448, or 256 with four over six."""
        return FOUR_OVER_SIX_E4M3_MAX if self.four_over_six else E4M3_MAX

    @property
    def dynamic(self) -> bool:
        """True when the amax is computed from the input, per group."""
        return self.amax is None


def check_amax(amax: torch.Tensor, name: str = "amax", values: bool = True) -> torch.Tensor:
    """Return ``amax`` as float32 after checking it is a non-empty real tensor and, with ``values``,
    that it is finite and non-negative (ValueError naming it). The value check reads the tensor on
    the host, which waits for the device on CUDA; ``values=False`` skips it."""
    if not isinstance(amax, torch.Tensor):
        amax = torch.tensor(amax, dtype=torch.float32)
    if amax.is_complex() or amax.dtype == torch.bool:
        raise ValueError(f"{name} must be a real tensor, got dtype {amax.dtype}")
    amax = amax.detach().float()
    if amax.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(amax.shape)})")
    if not values:
        return amax
    # one pass and one device sync: NaN propagates to both ends, so this covers every bad value
    lo, hi = torch.stack(torch.aminmax(amax)).tolist()
    if math.isfinite(lo) and math.isfinite(hi) and lo >= 0:
        return amax
    bad = ~torch.isfinite(amax) | (amax < 0)
    raise ValueError(
        f"{name} must be finite and >= 0; got {int(bad.sum())} bad value(s), e.g. "
        f"{amax[bad].reshape(-1)[0].item()} (shape {tuple(amax.shape)})"
    )


def keyword_format(
    num_bits: int | tuple[int, int],
    block_sizes: dict | None,
    scale_bits: tuple[int, int] | None,
    unsigned: bool,
    narrow_range: bool,
) -> QuantFormat:
    """The `QuantFormat` of `fake_quantize`'s ModelOpt-style keywords (``scale_bits`` overrides
    ``block_sizes["scale_bits"]``; ``block_sizes["type"]`` is ignored: an amax makes a call static)."""
    if scale_bits is not None:
        block_sizes = {**(block_sizes or {}), "scale_bits": tuple(scale_bits)}
    return QuantFormat.parse(
        num_bits, block_sizes=block_sizes, unsigned=unsigned, narrow_range=narrow_range
    )


def make_plan(
    x: torch.Tensor,
    num_bits: int | tuple[int, int],
    amax: torch.Tensor | float | None,
    block_sizes: dict | None,
    scale_bits: tuple[int, int] | None,
    global_amax: torch.Tensor | float | None,
    unsigned: bool,
    narrow_range: bool,
    validate_amax: bool = True,
) -> QuantPlan:
    """`plan_for_format` of `fake_quantize`'s keyword arguments (ValueError names a bad one)."""
    fmt = keyword_format(num_bits, block_sizes, scale_bits, unsigned, narrow_range)
    return plan_for_format(x, fmt, amax, global_amax, validate_amax)


def _check_input(x: torch.Tensor) -> None:
    """ValueError unless ``x`` is a float32, float16 or bfloat16 tensor."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor, got {got}")


def plan_for_format(
    x: torch.Tensor,
    fmt: QuantFormat,
    amax: torch.Tensor | float | None = None,
    global_amax: torch.Tensor | float | None = None,
    validate_amax: bool = True,
) -> QuantPlan:
    """The plan that quantizes ``x`` in ``fmt``: static with ``amax``, dynamic without (whatever
    ``fmt.dynamic`` says; a caller passes no amax for a dynamic quantizer).

    ``validate_amax=False`` skips the value check of ``amax`` and ``global_amax`` (see `check_amax`),
    so that no call waits for the device."""
    _check_input(x)
    axes = block_axes(fmt.blocks, max(x.dim(), 1))
    if fmt.scale_mode is not ScaleMode.FLOAT32 and axes is None:
        raise ValueError(f"scale_bits={fmt.scale_bits!r} needs block_sizes (e.g. {{-1: 16}})")
    if global_amax is not None and fmt.scale_mode is not ScaleMode.E4M3:
        raise ValueError(
            "global_amax is only used with scale_bits=(4, 3) (NVFP4-style two-level scales)"
        )
    shape = tuple(x.shape) if x.dim() else (1,)
    amax_t = check_amax(amax, "amax", validate_amax).to(x.device) if amax is not None else None
    layout = layout_for(shape, axes, None, amax_t)
    amax_view = layout.amax_to_view(amax_t) if amax_t is not None else None
    gamax = None
    if global_amax is not None:
        gamax = check_amax(global_amax, "global_amax", validate_amax).to(x.device)
        if gamax.numel() != 1:
            raise ValueError(f"global_amax must have one value, got shape {tuple(gamax.shape)}")
        gamax = gamax.reshape(())
    elif fmt.scale_mode is ScaleMode.E4M3:
        gamax = nvfp4_global_amax(block_amax=amax_view)  # None when dynamic: see global_amax_of
    lo, hi = fmt.bounds
    return QuantPlan(
        fmt.element, layout, fmt.scale_mode, lo, hi, amax_view, gamax, fmt.four_over_six
    )


def global_amax_of(plan: QuantPlan, amax: torch.Tensor) -> torch.Tensor | None:
    """The global amax a plan quantizes with, given the group ``amax`` of this call (NVFP4 only)."""
    if plan.scale_mode is not ScaleMode.E4M3 or plan.global_amax is not None:
        return plan.global_amax
    return nvfp4_global_amax(block_amax=amax)
