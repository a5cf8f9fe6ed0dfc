"""Text descriptions of one TensorQuantizer: its format, granularity and amax range (summaries, repr)."""

from __future__ import annotations

from typing import Any


def format_name(quantizer: Any) -> str:
    """A short name of the quantizer's format: INT8, FP8 E4M3, NVFP4, MXFP4, ... (its ``format.label``),
    or the custom backend's name and ``num_bits``; ``rotated`` is added after a Hadamard rotation."""
    backend = getattr(quantizer, "backend", None)
    name = f"backend {backend!r} ({quantizer.num_bits})" if backend else quantizer.format.label
    return name + (" rotated" if getattr(quantizer, "rotate_is_enabled", False) else "")


def granularity(quantizer: Any) -> str:
    """Per-tensor, per-channel, per-token or block-wise, and static or dynamic."""
    kind = "dynamic" if quantizer.is_dynamic else "static"
    block = quantizer.format.block_axes
    fallback = getattr(quantizer, "fallback", None)
    if fallback is not None and quantizer.is_dynamic:
        kind += f" (fallback from static: error -{fallback.gain_db:.1f} dB)"
    if block:
        if list(block.values()) == [None]:
            return f"per-token {kind}" if next(iter(block)) == -1 else f"per-slice {block} {kind}"
        return f"blocks {block} {kind}"
    if quantizer.axis is None:
        return f"per-tensor {kind}"
    return f"per-channel (axis {quantizer.axis}) {kind}"


def amax_range(quantizer: Any) -> str:
    """The amax range as text (LSQ: of the dequantization amax), or why there is none."""
    lsq = getattr(quantizer, "lsq_state", None)
    if lsq is not None:
        learned = "+".join(lsq.learnable_amax) or "frozen"
        return f"lsq ({learned}) post {amax_text(quantizer.amax_post)}"
    amax = quantizer.amax
    if amax is None:
        return "dynamic" if quantizer.is_dynamic else "uncalibrated"
    return amax_text(amax)


def amax_text(amax: Any) -> str:
    """``hi`` or ``[lo, hi]`` of an amax tensor."""
    lo, hi = float(amax.detach().min()), float(amax.detach().max())
    return f"{hi:.4g}" if lo == hi else f"[{lo:.4g}, {hi:.4g}]"


def describe_quantizer(quantizer: Any) -> tuple[str, str, str]:
    """(format, granularity, amax range) of one TensorQuantizer."""
    return format_name(quantizer), granularity(quantizer), amax_range(quantizer)
