"""The one dispatcher: `fake_quantize` validates, picks a backend, and wraps it with a straight-through gradient.

Backend choice: ``"triton"`` for CUDA tensors when Triton imports and has a kernel for the plan,
else ``"reference"`` (pure PyTorch). ``backend=`` or the ``QUANT_KERNELS_BACKEND`` environment
variable forces one (``"triton"`` on a CPU tensor runs under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from quant_kernels.formats import QuantFormat
from quant_kernels.plan import QuantPlan, keyword_format, plan_for_format
from quant_kernels.reference import fake_quantize_reference

__all__ = [
    "available_backends",
    "fake_quantize",
    "fake_quantize_format",
    "select_backend",
    "ste_mask",
]

Backend = Callable[[torch.Tensor, QuantPlan], tuple[torch.Tensor, torch.Tensor]]


def _triton_backend() -> Backend | None:
    try:
        from quant_kernels import triton_kernels
    except ImportError:
        return None
    return triton_kernels.fake_quantize_triton


def available_backends() -> list[str]:
    """Names of the backends that can run here (``"reference"`` always)."""
    return ["reference"] + (["triton"] if _triton_backend() is not None else [])


def select_backend(
    x: torch.Tensor, plan: QuantPlan, backend: str | None = None
) -> tuple[str, Backend]:
    """Pick the backend for ``x`` and ``plan``: forced by name, else Triton for CUDA tensors it supports."""
    name = backend or os.environ.get("QUANT_KERNELS_BACKEND") or "auto"
    if name not in ("auto", "reference", "triton"):
        raise ValueError(f"backend={name!r} is unknown; choose 'auto', 'reference' or 'triton'")
    if name == "reference":
        return "reference", fake_quantize_reference
    triton_fn = _triton_backend()
    if name == "triton":
        if triton_fn is None:
            raise ValueError("backend='triton' was requested but triton does not import")
        return "triton", triton_fn
    if x.is_cuda and triton_fn is not None:
        from quant_kernels.triton_kernels import supports

        if supports(x, plan):
            return "triton", triton_fn
    return "reference", fake_quantize_reference


class _StraightThrough(torch.autograd.Function):
    """Forward: fake quantization. Backward: the gradient passes where saturation did not change the value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: QuantPlan, fn: Backend) -> torch.Tensor:  # type: ignore[override]
        y, scale = fn(x, plan)
        ctx.save_for_backward(x, scale)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        return grad * ste_mask(x, scale, ctx.plan), None, None


class _PassThrough(torch.autograd.Function):
    """Forward: fake quantization. Backward: the gradient passes unchanged everywhere (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: QuantPlan, fn: Backend) -> torch.Tensor:  # type: ignore[override]
        return fn(x, plan)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def ste_mask(x: torch.Tensor, scale: torch.Tensor, plan: QuantPlan) -> torch.Tensor:
    """True where ``x / scale`` lies in the grid's range widened by half its end step (values that round
    to the end code anyway); False where saturation clipped the value, and everywhere in a zero-scale group."""
    layout = plan.layout
    xv = layout.to_view(x.detach().reshape(layout.shape))
    v = xv.float() / torch.where(scale == 0, 1.0, scale)
    half = plan.element.top_step / 2
    inside = (v >= plan.lo - half) & (v <= plan.hi + half) & (scale != 0)
    return layout.from_view(inside).reshape(x.shape)


def fake_quantize(
    x: torch.Tensor,
    num_bits: int | tuple[int, int] = 8,
    amax: torch.Tensor | float | None = None,
    block_sizes: dict | None = None,
    scale_bits: tuple[int, int] | None = None,
    global_amax: torch.Tensor | float | None = None,
    unsigned: bool = False,
    narrow_range: bool = False,
    backend: str | None = None,
    validate_amax: bool = True,
    pass_through_bwd: bool = False,
) -> torch.Tensor:
    """Quantize then dequantize ``x`` (same dtype and shape); static when ``amax`` is given, dynamic when not.

    The ModelOpt-style keyword form of `fake_quantize_format`: the format attributes are parsed by
    `QuantFormat.parse` (see the package README for them). ``validate_amax=False`` skips checking
    that ``amax`` and ``global_amax`` are finite and non-negative, a check that waits for the device
    on CUDA: for callers that validated them already (``TensorQuantizer`` does when its amax is
    set); a bad value then gives NaN or wrong outputs instead of a ValueError. Nothing else in a
    call reads tensor values on the host. Gradients are straight-through where saturation did
    not change the value (see `ste_mask`) and zero where it did; ``amax`` gets no gradient.
    ``pass_through_bwd=True`` passes the gradient unchanged everywhere, saturated values included
    (ModelOpt's ``pass_through_bwd``; nothing is saved for backward).
    """
    fmt = keyword_format(num_bits, block_sizes, scale_bits, unsigned, narrow_range)
    return fake_quantize_format(
        x, fmt, amax, global_amax, backend=backend, validate_amax=validate_amax,
        pass_through_bwd=pass_through_bwd,
    )  # fmt: skip


def fake_quantize_format(
    x: torch.Tensor,
    fmt: QuantFormat,
    amax: torch.Tensor | float | None = None,
    global_amax: torch.Tensor | float | None = None,
    *,
    backend: str | None = None,
    validate_amax: bool = True,
    pass_through_bwd: bool = False,
) -> torch.Tensor:
    """`fake_quantize` in the typed format ``fmt``: static when ``amax`` is given, dynamic when not
    (a dynamic quantizer passes none); the other arguments as `fake_quantize`'s."""
    plan = plan_for_format(x, fmt, amax, global_amax, validate_amax)
    if x.numel() == 0:
        return x.clone()
    _, fn = select_backend(x, plan, backend)
    if x.requires_grad and torch.is_grad_enabled():
        return (_PassThrough if pass_through_bwd else _StraightThrough).apply(x, plan, fn)
    return fn(x, plan)[0]
