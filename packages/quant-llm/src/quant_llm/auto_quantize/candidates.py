"""Candidate formats: resolve names, calibrate one quantized copy of the model per candidate, read costs.

A candidate's cost per weight element comes from the quant-kernels format table through
:func:`format_row`, the one place that maps a quantizer to its ``FORMATS`` row.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

import quant_core as mtq
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_kernels.formats import FORMATS, FormatSpec
from quant_llm.hf_moe import ExpertProjection

_EXPERT_OWNER = re.compile(r"\.quant_\w+\.\d+$")
UNQUANTIZED_BITS = 16.0  # cost of a layer left unquantized (as ModelOpt counts it)


def resolve_formats(formats: Iterable[Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """``(name, config)`` per candidate: a built-in ``*_CFG`` name, a config dict, or None (unquantized)."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    for i, fmt in enumerate(formats):
        if fmt is None:
            out.append(("None", None))
        elif isinstance(fmt, str):
            cfg = getattr(mtq.config, fmt, None) if fmt.endswith("_CFG") else None
            if not isinstance(cfg, dict):
                names = sorted(n for n in mtq.config.__all__ if n.endswith("_CFG"))
                raise ValueError(
                    f"unknown quantization format {fmt!r}; choose one of {names}, a config dict or None"
                )
            out.append((fmt, cfg))
        elif isinstance(fmt, dict):
            out.append((f"custom_{i}", fmt))
        else:
            raise ValueError(
                f"quantization_formats[{i}] must be a config name, a config dict or None, got {fmt!r}"
            )
    if not out:
        raise ValueError("quantization_formats is empty; give at least one format")
    return out


def format_row(quantizer: nn.Module) -> FormatSpec | None:
    """The ``FORMATS`` row of a weight quantizer's stored format (first stage of a chain), None if disabled."""
    q = quantizer[0] if isinstance(quantizer, SequentialQuantizer) else quantizer
    if not isinstance(q, TensorQuantizer) or not q.is_enabled:
        return None
    blocks = q.format.block_axes or None
    for spec in FORMATS.values():
        if (
            spec.num_bits == q.num_bits
            and spec.scale_bits == q.scale_bits
            and (spec.block_sizes or None) == blocks
        ):
            return spec
    raise ValueError(
        f"weight format num_bits={q.num_bits}, block_sizes={q.block_sizes} has no row in quant_kernels FORMATS; "
        "auto_quantize needs its effective bits"
    )


def _weight_quantizer(unit: nn.Module) -> nn.Module | None:
    """A unit's weight quantizer: its own, or its first expert projection's (fused experts share a config)."""
    if hasattr(unit, "weight_quantizer"):
        return unit.weight_quantizer
    return next(
        (m.weight_quantizer for m in unit.modules() if isinstance(m, ExpertProjection)), None
    )


def weight_bits(unit: nn.Module) -> float:
    """Effective bits per weight element of a searched unit: the weight quantizer's
    ``effective_bits`` attribute when set (ModelOpt's per-format cost override), else its format
    row's; 16 when its weight is not quantized."""
    quantizer = _weight_quantizer(unit)
    first = quantizer[0] if isinstance(quantizer, SequentialQuantizer) else quantizer
    if isinstance(first, TensorQuantizer) and first.is_enabled:
        override = first.attribute_config.effective_bits
        if override is not None:
            return override
    row = format_row(quantizer)
    return UNQUANTIZED_BITS if row is None else row.effective_bits


def weight_params(module: nn.Module) -> int:
    """Number of weight elements of a layer (its direct parameters except biases)."""
    return sum(p.numel() for n, p in module.named_parameters(recurse=False) if "bias" not in n)


def calibrate_candidates(
    model: nn.Module,
    candidates: list[tuple[str, dict[str, Any] | None]],
    forward_loop: Callable[[nn.Module], None],
) -> list[nn.Module | None]:
    """One deep copy of ``model`` quantized and calibrated with each candidate (None for the unquantized one).

    A candidate that needs no data (weight-only with max: `mtq.need_calibration` is False) is
    calibrated from its weights alone, without running ``forward_loop``.
    """
    out: list[nn.Module | None] = []
    for _name, cfg in candidates:
        out.append(
            None
            if cfg is None
            else mtq.quantize(copy.deepcopy(model), cfg, loop_for(cfg, forward_loop))
        )
    return out


def loop_for(
    config: dict[str, Any], forward_loop: Callable[[nn.Module], None]
) -> Callable[[nn.Module], None] | None:
    """``forward_loop`` when ``config`` calibrates activations or runs a data algorithm, else None."""
    return forward_loop if mtq.need_calibration(config) else None


def searchable_layers(copies: list[nn.Module | None]) -> dict[str, list[nn.Module | None]]:
    """Units whose weight some candidate quantizes: name -> that unit in each candidate copy.

    A unit is a module with a ``weight_quantizer`` (a linear layer) or a fused experts module.
    """
    quantized = [c for c in copies if c is not None]
    if not quantized:
        raise ValueError("quantization_formats holds only None; give at least one format")
    names: list[str] = []
    for name, module in quantized[0].named_modules():
        if isinstance(
            module, ExpertProjection
        ):  # runs inside its fused experts module: search that
            name = _EXPERT_OWNER.sub("", name)
        elif not hasattr(module, "weight_quantizer"):
            continue
        if name not in names:
            names.append(name)
    layers: dict[str, list[nn.Module | None]] = {}
    for name in names:
        per = [None if c is None else c.get_submodule(name) for c in copies]
        if any(m is not None and format_row(_weight_quantizer(m)) is not None for m in per):
            layers[name] = per
    if not layers:
        raise ValueError("no candidate format quantizes any layer's weight; nothing to search")
    return layers
