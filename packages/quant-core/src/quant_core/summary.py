"""print_quant_summary: one line per quantizer with module, format, granularity, amax range, enabled."""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_core.conversion import iter_quantizers
from quant_core.nn.describe import amax_range, describe_quantizer, format_name, granularity
from quant_core.nn.sequential import SequentialQuantizer

__all__ = [
    "amax_range",
    "describe",
    "format_name",
    "granularity",
    "print_quant_summary",
    "quant_summary",
]


def describe(quantizer: Any) -> tuple[str, str, str]:
    """(format, granularity, amax range) of a TensorQuantizer or SequentialQuantizer."""
    if isinstance(quantizer, SequentialQuantizer):
        parts = [describe(q) for q in quantizer]
        return tuple(" -> ".join(p[i] for p in parts) for i in range(3))  # type: ignore[return-value]
    return describe_quantizer(quantizer)


def quant_summary(model: nn.Module) -> str:
    """The summary table as text (what :func:`print_quant_summary` prints)."""
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
