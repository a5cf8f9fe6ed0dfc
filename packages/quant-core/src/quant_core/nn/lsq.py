"""Learned step size (LSQ) mode of a static block quantizer, as ModelOpt 0.47's ``lsq`` sets it up.

``y = cast_ste(x / s_pre) * s_post`` per block, with ``s = amax / M`` (``M`` the grid's largest
magnitude: 6 for E2M1, qmax for INT). The block amaxes are learned instead of the scales:
``_amax_pre`` (quantization) and ``_amax_post`` (dequantization), each an ``nn.Parameter`` when
learnable and a buffer when frozen, one tensor when tied. NVFP4 block scales are rounded to E4M3
under the global scale ``g = G / (6 * E4M3_MAX)``, ``G`` the largest calibrated block amax, fixed when
LSQ starts (``_lsq_global_amax``); the rounding passes the gradient where ``amax <= G``.
``cast_ste`` rounds to the element grid and passes the gradient where ``lo <= v <= hi``, so
``d y / d s`` is the LSQ paper's ``round(v) - v`` inside the range and ``lo`` / ``hi`` outside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import quant_kernels as qk

TensorQuantizer = nn.Module  # annotations only: a quant_core TensorQuantizer (no import cycle)

LSQ_TENSORS = ("_amax_pre", "_amax_post", "_lsq_global_amax")


@dataclass(frozen=True)
class LSQState:
    """Which LSQ amaxes learn and how the scales are rounded (JSON-safe through `asdict`)."""

    learnable_amax: tuple[str, ...] = ("post",)
    tied_amax: bool = False
    quantize_scales: bool = True
    quantize_pre_scale: bool = True

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LSQState:
        """The state saved by `to_json`."""
        return cls(**{**data, "learnable_amax": tuple(data["learnable_amax"])})

    def to_json(self) -> dict[str, Any]:
        """The state as JSON values."""
        return {**asdict(self), "learnable_amax": list(self.learnable_amax)}


def learnable_set(learnable_amax: Any) -> tuple[str, ...]:
    """``"pre"`` / ``"post"`` / a list of them, as a sorted tuple (ValueError names a bad value)."""
    learn = (learnable_amax,) if isinstance(learnable_amax, str) else tuple(learnable_amax)
    if not set(learn) <= {"pre", "post"}:
        raise ValueError(f"learnable_amax must name 'pre' and/or 'post', got {learnable_amax!r}")
    return tuple(sorted(set(learn)))


def lsq_unsupported_reason(quantizer: TensorQuantizer) -> str | None:
    """Why ``quantizer`` cannot enter LSQ mode, or None when it can."""
    fmt = quantizer.format
    if not quantizer.is_enabled or fmt.dynamic or quantizer.amax is None:
        return "it is not an enabled, calibrated static quantizer"
    if list(fmt.sized_blocks) != [-1] or dict(fmt.blocks) != fmt.sized_blocks:
        return f"LSQ learns per-block scales of blocks along the last axis; it has {fmt.label}"
    if fmt.scale_mode is qk.ScaleMode.E8M0 or fmt.four_over_six:
        return f"its {fmt.label} scales are not learnable here"
    return None


def enable_lsq(
    quantizer: TensorQuantizer,
    state: LSQState,
    values: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Put ``quantizer`` in LSQ mode: amaxes (in ``dtype``) from ``values`` (restore) or its
    calibrated amax."""
    reason = lsq_unsupported_reason(quantizer) if values is None else None
    if reason:
        raise ValueError(f"quantizer {quantizer._name or '(unnamed)'} cannot use lsq: {reason}")
    if values is None:
        amax = quantizer.amax.detach().float().clone()
        values = {"_amax_post": amax, "_amax_pre": amax}
        if quantizer.format.has_global_amax:
            values["_lsq_global_amax"] = amax.max().reshape(())
        quantizer.amax = None
    quantizer._lsq_state = state
    for key in LSQ_TENSORS:
        quantizer._buffers.pop(key, None)
        quantizer._parameters.pop(key, None)
        if key not in values or (key == "_amax_pre" and state.tied_amax):
            continue
        value = values[key].detach()
        value = value.to(torch.float32 if key == "_lsq_global_amax" else dtype).clone()
        if key.removeprefix("_amax_") in state.learnable_amax:
            quantizer.register_parameter(key, nn.Parameter(value))
        else:
            quantizer.register_buffer(key, value)


def disable_lsq(quantizer: TensorQuantizer) -> None:
    """Leave LSQ mode, dropping its amaxes."""
    quantizer._lsq_state = None
    for key in LSQ_TENSORS:
        quantizer._buffers.pop(key, None)
        quantizer._parameters.pop(key, None)


class _CastSTE(torch.autograd.Function):
    """Round to the element grid (scale 1); the gradient passes where ``lo <= v <= hi``."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, fmt: qk.QuantFormat) -> torch.Tensor:  # type: ignore[override]
        lo, hi = fmt.bounds
        ctx.save_for_backward(v)
        ctx.bounds = (lo, hi)
        return qk.fake_quantize(
            v.detach(),
            num_bits=fmt.num_bits,
            amax=torch.tensor(hi),
            unsigned=fmt.unsigned,
            narrow_range=fmt.narrow_range,
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        return torch.where((v >= lo) & (v <= hi), grad, 0.0), None


def cast_ste(v: torch.Tensor, fmt: qk.QuantFormat) -> torch.Tensor:
    """``v`` rounded to ``fmt``'s element grid at scale 1 (clamped to its range); the gradient
    passes unchanged where ``lo <= v <= hi`` and is zero outside."""
    return _CastSTE.apply(v, fmt)


def _block_scale(amax: torch.Tensor, quantizer: TensorQuantizer, rounded: bool) -> torch.Tensor:
    """``amax / M``; with ``rounded`` (NVFP4), E4M3-rounded under the global scale as the kernels do,
    the gradient passing where ``amax`` is at most the global amax."""
    top = quantizer.format.bounds[1]
    linear = amax.float() / top  # float32 whatever dtype the amaxes are held in
    if not rounded:
        return linear
    global_amax = quantizer._buffers["_lsq_global_amax"]
    # 0-d divisors keep IEEE division on CUDA, as the kernels' scales do.
    gscale = global_amax / global_amax.new_tensor(top * qk.E4M3_MAX)
    exact = qk.fake_quantize_with_scale(
        amax.detach().float() / amax.new_tensor(top, dtype=torch.float32), gscale, _E4M3
    )
    return torch.where(amax.detach() <= global_amax, linear - linear.detach() + exact, exact)


_E4M3 = qk.QuantFormat.parse((4, 3))  # per-tensor FP8 E4M3: the NVFP4 block-scale grid


def _per_block(scale: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """One scale per block of ``blocks`` (..., n, block): a scale tensor with one element per
    block (a flat amax, as ModelOpt stores it, included) takes their shape, others broadcast."""
    if scale.numel() == blocks[..., 0].numel():
        return scale.reshape(*blocks.shape[:-1], 1)
    return scale.unsqueeze(-1)


def lsq_forward(quantizer: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
    """``cast_ste(x / s_pre) * s_post`` per block of the last axis (see the module docstring)."""
    state = quantizer._lsq_state
    fmt = quantizer.format
    post = quantizer._amax_post
    pre = post if state.tied_amax else quantizer._amax_pre
    rounded = state.quantize_scales and fmt.has_global_amax
    block = fmt.sized_blocks[-1]
    if x.shape[-1] % block:
        raise ValueError(
            f"quantizer {quantizer._name or '(unnamed)'} in LSQ mode needs the last dim ({x.shape[-1]}) "
            f"to be a multiple of the block size {block}"
        )
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    s_pre = _per_block(_block_scale(pre, quantizer, rounded and state.quantize_pre_scale), blocks)
    s_post = _per_block(_block_scale(post, quantizer, rounded), blocks)
    y = cast_ste(blocks / torch.where(s_pre == 0, 1.0, s_pre), fmt) * s_post
    return y.reshape(x.shape).to(x.dtype)
