"""print_quant_summary: one line per quantizer with module, format, granularity, amax range, enabled."""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_core.config.schema import FP_FORMATS

_FP_NAMES = {(4, 3): "FP8", (5, 2): "FP8", (3, 2): "FP6", (2, 3): "FP6", (2, 1): "FP4"}
_MX_NAMES = {(4, 3): "MXFP8", (3, 2): "MXFP6", (2, 3): "MXFP6", (2, 1): "MXFP4", 8: "MXINT8"}


def format_name(quantizer: Any) -> str:
    """A short name of the quantizer's format: INT8, FP8 E4M3, NVFP4, MXFP4, ..."""
    nb, scale_bits = quantizer.num_bits, quantizer.scale_bits
    block = quantizer._block_axes or {}
    if scale_bits == (8, 0) and nb in _MX_NAMES:
        return _MX_NAMES[nb]
    if scale_bits == (4, 3) and nb == (2, 1):
        return (
            "NVFP4"
            if list(block.values()) == [16]
            else f"NVFP4 (block {next(iter(block.values()))})"
        )
    if isinstance(nb, tuple):
        return f"{_FP_NAMES[nb]} {FP_FORMATS[nb]}"
    return f"{'U' if quantizer.unsigned else ''}INT{nb}"


def granularity(quantizer: Any) -> str:
    """Per-tensor, per-channel, per-token or block-wise, and static or dynamic."""
    kind = "dynamic" if quantizer.is_dynamic else "static"
    block = quantizer._block_axes
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
    """The amax range as text, or why there is none."""
    amax = quantizer.amax
    if amax is None:
        return "dynamic" if quantizer.is_dynamic else "uncalibrated"
    lo, hi = float(amax.detach().min()), float(amax.detach().max())
    return f"{hi:.4g}" if lo == hi else f"[{lo:.4g}, {hi:.4g}]"


def describe(quantizer: Any) -> tuple[str, str, str]:
    """(format, granularity, amax range) of a TensorQuantizer or SequentialQuantizer."""
    from quant_core.nn.sequential import SequentialQuantizer

    if isinstance(quantizer, SequentialQuantizer):
        parts = [describe(q) for q in quantizer]
        return tuple(" -> ".join(p[i] for p in parts) for i in range(3))  # type: ignore[return-value]
    return format_name(quantizer), granularity(quantizer), amax_range(quantizer)


def quant_summary(model: nn.Module) -> str:
    """The summary table as text (what :func:`print_quant_summary` prints)."""
    from quant_core.conversion import iter_quantizers

    rows = [("quantizer", "format", "granularity", "amax", "enabled")]
    enabled = 0
    for name, quantizer, _parent in iter_quantizers(model):
        on = quantizer.is_enabled
        enabled += on
        fmt, gran, amax = describe(quantizer) if on else ("-", "-", "-")
        rows.append((name, fmt, gran, amax, "yes" if on else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    switched = sum(
        getattr(q, "fallback", None) is not None and q.is_dynamic
        for _n, q, _p in iter_quantizers(model)
    )
    note = f", {switched} switched to per-token dynamic by calibration" if switched else ""
    lines.append(f"{len(rows) - 1} quantizers, {enabled} enabled{note}")
    return "\n".join(lines + _compressed_lines(model))


def _compressed_lines(model: nn.Module) -> list[str]:
    """One line per compressed linear: its weight format and matmul backend."""
    from quant_core.compress import CompressedLinear

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    lines = [f"{n}.weight  compressed {m.format_key}  backend {m.backend.name}" for n, m in found]
    return lines + ([f"{len(found)} compressed linears"] if found else [])


def print_quant_summary(model: nn.Module) -> None:
    """Print every quantizer of ``model``: module, format, granularity, amax range, enabled."""
    print(quant_summary(model))
